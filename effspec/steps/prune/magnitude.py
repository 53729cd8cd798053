"""Magnitude pruning: zero the weights of smallest |W|, unstructured or N:M (Han et al., 2015; Zhu & Gupta, 2017).

Unstructured: in each targeted linear layer, the `sparsity` fraction of weights
with the smallest magnitude is set to zero (layer-wise, the baseline of the
Wanda and SparseGPT papers). N:M: in every run of M consecutive input weights of
a row, only the N of largest magnitude are kept (NVIDIA's 2:4 pattern keeps 2 of
4), so sparsity is 1 - N/M. The sparsity reached is measured per layer from the
weights afterwards (`effspec.measure.size.sparsity`). Weights stay dense float
tensors: no bytes are saved by this step alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from effspec.config import expect
from effspec.progress import track
from effspec.registry import register
from effspec.surgery import linear_layers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MagnitudeConfig:
    sparsity: float = 0.5  # ignored when `nm` is set
    nm: str = ""  # "N:M" keeps N of every M consecutive weights, e.g. "2:4"; "" = unstructured
    targets: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = ("lm_head",)

    def __post_init__(self):
        expect(0.0 <= self.sparsity < 1.0, "sparsity", self.sparsity, "a fraction in [0, 1)")
        if self.nm:
            n, m = parse_nm(self.nm)
            expect(0 < n < m, "nm", self.nm, "N:M with 0 < N < M, e.g. 2:4")

    @property
    def pattern(self) -> tuple[int, int] | None:
        return parse_nm(self.nm) if self.nm else None


def parse_nm(text: str) -> tuple[int, int]:
    parts = text.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"nm: got {text!r}, expected N:M with whole numbers, e.g. 2:4")
    return int(parts[0]), int(parts[1])


def unstructured_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """True where a weight is kept: all but the round(sparsity * numel) lowest scores."""
    k = int(round(sparsity * score.numel()))
    keep = torch.ones(score.numel(), dtype=torch.bool)
    if k:
        keep[torch.topk(score.flatten(), k, largest=False).indices] = False
    return keep.view_as(score)


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """True where kept: the n highest scores in every run of m consecutive columns of a row."""
    rows, cols = score.shape
    if cols % m:
        raise ValueError(f"nm: input width {cols} is not a multiple of M={m}")
    groups = score.reshape(rows, cols // m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, groups.topk(n, dim=-1).indices, True)
    return keep.view(rows, cols)


@register("magnitude", family="prune", stage="inference", config=MagnitudeConfig)
def apply(model: nn.Module, cfg: MagnitudeConfig, calib=None) -> nn.Module:
    layers = linear_layers(model, cfg.targets, cfg.ignore)
    if cfg.pattern:
        m = cfg.pattern[1]
        bad = [n for n, lin in layers.items() if lin.in_features % m]
        if bad:
            from effspec.errors import UserError

            raise UserError(f"nm={cfg.nm}: input width of {bad[0]} ({layers[bad[0]].in_features}) is not a multiple of {m}")
    for name, linear in track(layers.items(), "magnitude", total=len(layers)):
        W = linear.weight.data
        score = W.abs()
        keep = nm_mask(score, *cfg.pattern) if cfg.pattern else unstructured_mask(score, cfg.sparsity)
        W.mul_(keep)
    log.info("magnitude: pruned %d linear layers", len(layers))
    return model
