"""Magnitude pruning: zero the weights of smallest |W|, unstructured or N:M (Han et al., 2015; Zhu & Gupta, 2017).

Unstructured: in each targeted linear layer, the `sparsity` fraction of weights
with the smallest magnitude is removed (layer-wise, the baseline of the Wanda
and SparseGPT papers). N:M: in every run of M consecutive input weights of a
row, only the N of largest magnitude are kept (NVIDIA's 2:4 pattern keeps 2 of
4), so sparsity is 1 - N/M. Pruned layers are stored as `SparseLinear`
(bitmask + kept values, `effspec.sparsity`), so the stored model shrinks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from effspec.progress import track
from effspec.registry import register
from effspec.sparsity import PruneConfig, SparseLinear, nm_mask, unstructured_mask
from effspec.surgery import linear_layers, replace_module

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MagnitudeConfig(PruneConfig):
    pass


@register("magnitude", family="prune", stage="inference", config=MagnitudeConfig)
def apply(model: nn.Module, cfg: MagnitudeConfig, calib=None) -> nn.Module:
    layers = linear_layers(model, cfg.targets, cfg.ignore, step="magnitude")
    cfg.check_widths(layers)
    for name, linear in track(layers.items(), "magnitude", total=len(layers)):
        score = linear.weight.detach().abs()
        keep = nm_mask(score, *cfg.pattern) if cfg.pattern else unstructured_mask(score, cfg.sparsity)
        replace_module(model, name, SparseLinear.from_weight(linear.weight.detach(), keep, linear.bias))
    log.info("magnitude: pruned %d linear layers", len(layers))
    return model
