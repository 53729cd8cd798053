"""Wanda: prune by weight magnitude times input activation norm, per output row (Sun et al., ICLR 2024).

For a linear layer with weight W (out, in) and calibration inputs X (tokens, in),
Wanda scores every weight by

    S_ij = |W_ij| * ||X_j||_2

(Eq. 1) and removes the lowest scores within each output row (the "per-output"
comparison group the paper finds best for LLMs), or within every M consecutive
inputs of a row for N:M. No weight update, no second-order information: one
pass of calibration statistics. ||X_j||^2 is the diagonal of X^T X: the
shared layer-wise engine collects only that diagonal (`diagonal=True`).

Calibration goes block by block through `effspec.layerwise`, each block seeing
the outputs of the already-pruned blocks before it, and one pass collects a
whole block's statistics, as in the reference code. Against llm-compressor's
WandaPruningModifier (16 x 2048 calibration, 4 eval windows) 4:8 gives 102.68
vs 102.66. At 2:4 the two sides' masks are identical in blocks 0-1 and then
drift apart (96.7% equal in block 29) the way two effspec runs do when the
column norms are perturbed by a relative 1e-5: a near-tie in a group of 4
flips, the block's output changes, and the next block's ties flip in turn. The
perplexity that results is that sensitive: 226.0 unperturbed, 203.0-231.7 over
six perturbed runs (mean 219.0), llm-compressor 213.1 (its masks scored by
effspec: 213.1 too). `true_sequential: true` instead lets o_proj and down_proj see their
pruned predecessors, one block pass per layer group: measured on smollm2 50%
42.67 against 42.92 one-pass, 2:4 158.6 against 149.2.

`allocation: owl` prunes each decoder block to its own OWL sparsity (more
outliers, fewer weights removed; mean `sparsity`), from one extra calibration
pass over the dense model (`effspec.owl`); unstructured only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from effspec.layerwise import solve_layerwise
from effspec.registry import register
from effspec.owl import block_configs
from effspec.sparsity import CalibratedPruneConfig, PruneConfig, SparseLinear, nm_mask, row_mask
from effspec.surgery import linear_layers, replace_module

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WandaConfig(CalibratedPruneConfig):
    true_sequential: bool = False


def wanda_mask(W: torch.Tensor, x_norm: torch.Tensor, cfg: PruneConfig) -> torch.Tensor:
    """Keep-mask of W (out, in) for input column norms x_norm (in,): Eq. 1's scores, per row or N:M."""
    score = W.abs().float() * x_norm.float()[None, :]
    return nm_mask(score, *cfg.pattern) if cfg.pattern else row_mask(score, cfg.sparsity)


@register("wanda", family="prune", stage="inference", config=WandaConfig, calibration=True)
def apply(model: nn.Module, cfg: WandaConfig, calib=None) -> nn.Module:
    targets = linear_layers(model, cfg.targets, cfg.ignore, step="wanda")
    cfg.check_widths(targets)
    if calib is None:
        raise ValueError("wanda needs calibration data")

    config_of = block_configs(model, calib, targets, cfg)  # per-block sparsity when allocation is owl

    def prune_group(block: nn.Module, group: list[str], H: torch.Tensor) -> None:
        x_norm = H.clamp(min=0).sqrt()  # sqrt(diag H), proportional to ||X_j||_2
        for n in group:
            lin = block.get_submodule(n)
            keep = wanda_mask(lin.weight.detach(), x_norm, config_of(block))
            replace_module(block, n, SparseLinear.from_weight(lin.weight.detach(), keep, lin.bias))

    model = solve_layerwise(model, calib, targets, prune_group, cfg.true_sequential, cfg.calibration_dtype, "wanda", diagonal=True)
    log.info("wanda: pruned %d linear layers", len(targets))
    return model
