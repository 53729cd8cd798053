"""OWL: outlier-weighted layer-wise sparsity (Yin et al., ICML 2024).

Uniform sparsity removes the same fraction from every decoder block, yet blocks
differ in how many "outlier" weights they hold -- weights whose Wanda score
A_ij = |W_ij| * ||X_j||_2 is far above the block's mean -- and pruning those
hurts most. OWL measures, on the dense model and calibration data, each block's
Layerwise Outlier Distribution

    D_l = #{A_ij > M * mean(A)} / #A     over all target linear layers of block l

(M = 5 by default, as the paper uses for LLaMA) and gives blocks with more
outliers a lower sparsity: the ratios are min-max scaled into [0, 2 lambda],
shifted to mean 1 - S (the target density), and block l's sparsity is
1 - that value. So sparsities span [S - lambda, S + lambda] and average S
(lambda = 0.08 by default), and the whole model keeps the target sparsity when
its blocks are the same size, as in every decoder here.

The scores come from one calibration pass through the dense model with only
the input norms collected (Wanda's cost), before the pruning pass.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Sequence

import logging

import torch
from torch import nn

from effspec.layerwise import solve_layerwise

log = logging.getLogger(__name__)


def outlier_ratio(scores: Sequence[torch.Tensor], m: float) -> float:
    """D_l: the share of all `scores` (one block's) above m times their common mean."""
    flat = torch.cat([s.flatten().float() for s in scores])
    return float((flat > m * flat.mean()).float().mean())


def allocate(ratios: Sequence[float], sparsity: float, lam: float) -> list[float]:
    """Per-block sparsities from outlier ratios: more outliers, fewer weights removed; mean `sparsity`."""
    d = torch.tensor(list(ratios), dtype=torch.float64)
    spread = d.max() - d.min()
    if len(d) < 2 or spread == 0:
        return [sparsity] * len(d)
    density = (d - d.min()) / spread * (2 * lam)
    density = density - density.mean() + (1 - sparsity)
    return [float(1 - x) for x in density]


def block_outlier_ratios(model: nn.Module, calib: torch.Tensor, targets: dict[str, nn.Module],
                         m: float, dtype: str = "float32") -> dict[str, float]:
    """D_l of every block holding targets, keyed by the block's module name, from the dense model."""
    names = {id(mod): n for n, mod in model.named_modules()}
    scores: dict[str, list[torch.Tensor]] = {}
    ratios: dict[str, float] = {}

    def record(block: nn.Module, group: list[str], H: torch.Tensor) -> None:
        name = names[id(block)]
        for finished in [b for b in scores if b != name]:  # blocks run in order: an earlier one is complete
            ratios[finished] = outlier_ratio(scores.pop(finished), m)
        x_norm = H.clamp(min=0).sqrt()
        scores.setdefault(name, []).extend(block.get_submodule(n).weight.detach().abs().float() * x_norm[None, :]
                                           for n in group)

    solve_layerwise(model, calib, targets, record, False, dtype, "owl", diagonal=True)
    ratios.update({b: outlier_ratio(s, m) for b, s in scores.items()})
    return ratios


def block_sparsities(model: nn.Module, calib: torch.Tensor, targets: dict[str, nn.Module], sparsity: float,
                     m: float, lam: float, dtype: str = "float32") -> dict[str, float]:
    """OWL's sparsity for every block holding targets, keyed by block name."""
    ratios = block_outlier_ratios(model, calib, targets, m, dtype)
    order = list(ratios)
    return dict(zip(order, allocate([ratios[b] for b in order], sparsity, lam)))


def block_configs(model: nn.Module, calib: torch.Tensor, targets: dict[str, nn.Module], cfg) -> Callable[[nn.Module], object]:
    """`config_of(block)`: `cfg` itself when its allocation is uniform, else `cfg` with the block's OWL sparsity."""
    if cfg.allocation != "owl":
        return lambda block: cfg
    sparsities = block_sparsities(model, calib, targets, cfg.sparsity, cfg.owl_m, cfg.owl_lambda, cfg.calibration_dtype)
    log.info("owl: block sparsities %.3f..%.3f (mean %.3f)", min(sparsities.values()), max(sparsities.values()),
             sum(sparsities.values()) / len(sparsities))
    names = {id(mod): n for n, mod in model.named_modules()}
    configs = {b: replace(cfg, sparsity=s, allocation="uniform") for b, s in sparsities.items()}
    return lambda block: configs[names[id(block)]]
