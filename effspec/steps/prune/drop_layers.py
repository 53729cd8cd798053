"""Depth pruning: remove whole decoder blocks, ranked on calibration data (ShortGPT, Men et al. 2024).

Block influence (the paper's BI): a block whose output hidden state points the
same way as its input changes little, so

    BI_i = 1 - mean over tokens of cos(x_i, x_{i+1})

with x_i the hidden state entering block i, and the `n` blocks of lowest BI
are removed in one shot. `metric: perplexity` ranks instead by how much the
calibration perplexity rises when each block alone is skipped (n + 1 more
passes over the calibration set; slower, sometimes better at large n).
`metric: last` removes the last n blocks, leaving the model's first blocks:
an early-exit draft for speculative decoding (LayerSkip's shape), to be
trained by `distill` toward the whole model's next-token distributions.

The model really has fewer blocks afterwards: the block list, the config's
`num_hidden_layers` (and `layer_types` where present) and each attention's
cache index are rewritten, so it saves, reloads and decodes as a smaller model
-- fewer weights read per token, a proportionally shorter KV cache.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from effspec.config import expect
from effspec.errors import UserError
from effspec.progress import track
from effspec.registry import register

log = logging.getLogger(__name__)
METRICS = ("bi", "perplexity", "last")


@dataclass(frozen=True)
class DropLayersConfig:
    n: int = 4  # blocks to remove
    metric: str = "bi"  # "bi" (ShortGPT's block influence), "perplexity", or "last" (the deepest n go)
    keep_first: bool = True  # never remove block 0 (it turns embeddings into the residual stream)

    def __post_init__(self):
        expect(self.n >= 1, "n", self.n, "at least one block")
        expect(self.metric in METRICS, "metric", self.metric, f"one of {METRICS}")


def _blocks(model: nn.Module) -> nn.ModuleList:
    body = getattr(model, "model", None)
    layers = getattr(body, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UserError(f"drop-layers: {type(model).__name__} has no decoder block list at model.layers")
    return layers


@torch.inference_mode()
def block_influence(model: nn.Module, calib: torch.Tensor) -> list[float]:
    """BI_i = 1 - mean cos(input, output) of block i over every calibration token."""
    blocks = _blocks(model)
    sums = [0.0] * len(blocks)
    tokens = 0

    def hook(i):
        def record(module, args, output):
            x = args[0]
            y = output[0] if isinstance(output, tuple) else output
            sums[i] += float(F.cosine_similarity(x.float(), y.float(), dim=-1).sum())
        return record

    handles = [b.register_forward_hook(hook(i)) for i, b in enumerate(blocks)]
    try:
        for ids in track(calib, "block influence", total=len(calib)):
            model(ids[None], use_cache=False)
            tokens += ids.numel()
    finally:
        for h in handles:
            h.remove()
    return [1.0 - s / tokens for s in sums]


class _Skip(nn.Module):
    """Stands in for a block during a perplexity probe: passes the hidden state through."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


@torch.inference_mode()
def skip_perplexity(model: nn.Module, calib: torch.Tensor) -> list[float]:
    """Calibration perplexity of the model with each block skipped in turn."""
    blocks = _blocks(model)
    out = []
    for i in track(range(len(blocks)), "skip perplexity", total=len(blocks)):
        block = blocks[i]
        blocks[i] = _Skip()
        try:
            nll = sum(float(model(ids[None], labels=ids[None], use_cache=False).loss) for ids in calib)
        finally:
            blocks[i] = block
        out.append(math.exp(nll / len(calib)))
    return out


def drop_blocks(model: nn.Module, drop: list[int]) -> nn.Module:
    """Remove blocks `drop` and rewrite everything that counts or indexes blocks."""
    blocks = _blocks(model)
    kept = [b for i, b in enumerate(blocks) if i not in set(drop)]
    model.model.layers = nn.ModuleList(kept)
    cfg = model.config
    types = getattr(cfg, "layer_types", None)
    if types is not None:
        cfg.layer_types = [t for i, t in enumerate(types) if i not in set(drop)]
    cfg.num_hidden_layers = len(kept)
    for j, block in enumerate(kept):  # KV caches are indexed by these
        for m in block.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = j
    return model


@register("drop-layers", family="prune", stage="inference", config=DropLayersConfig, calibration=True)
def apply(model: nn.Module, cfg: DropLayersConfig, calib=None) -> nn.Module:
    blocks = _blocks(model)
    first = 1 if cfg.keep_first else 0
    if cfg.n > len(blocks) - 1 - first:
        raise UserError(f"drop-layers: n={cfg.n} but the model has {len(blocks)} blocks; at most "
                        f"{max(0, len(blocks) - 1 - first)} can go (one must stay{', and block 0 with keep_first' if first else ''})")
    if cfg.metric == "last":
        drop = list(range(len(blocks) - cfg.n, len(blocks)))
        log.info("drop-layers: removing the last %d of %d blocks", cfg.n, len(blocks))
        return drop_blocks(model, drop)
    if calib is None:
        raise ValueError("drop-layers needs calibration data")
    score = block_influence(model, calib) if cfg.metric == "bi" else skip_perplexity(model, calib)
    candidates = sorted(range(first, len(blocks)), key=lambda i: score[i])
    drop = sorted(candidates[: cfg.n])
    log.info("drop-layers: removing blocks %s of %d (%s: %s)", drop, len(blocks), cfg.metric,
             ", ".join(f"{score[i]:.4g}" for i in drop))
    return drop_blocks(model, drop)
