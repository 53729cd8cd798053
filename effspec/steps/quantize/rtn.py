"""Round-to-nearest weight quantization (RTN): the baseline every PTQ paper compares against.

Each targeted linear layer's weight W (out, in) is put on an integer grid
(`effspec.quant`): per group of `group_size` input columns (0 = per output
channel) a scale and minimum are fitted to the group's range, and every weight
is rounded to the nearest code, q = clamp(round((w - min) / scale), 0, 2^b - 1).
No data is needed. The layer is replaced by a packed `QuantLinear`, so the stored
model really is smaller (~4x at 8 bits, ~7x at 4 bits with group 64, on the
linear layers). A layer pruned by an earlier step keeps its mask: on a
symmetric grid its zeros are the exact zero code, and it becomes a
`SparseQuantLinear` (bitmask + kept codes).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from effspec.config import expect
from effspec.layers import QuantLinear, pruned_mask
from effspec.progress import track
from effspec.quant import SUPPORTED_BITS, Grid
from effspec.registry import register
from effspec.surgery import linear_layers, replace_module

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RTNConfig:
    bits: int = 4
    # 64, not the common 128: smollm2's hidden width 576 is not a multiple of 128 (BENCHMARKS.md)
    group_size: int = 64
    # symmetric by default, as llm-compressor's W4A16 preset; asymmetric fits skewed groups better
    symmetric: bool = True
    targets: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = ("lm_head",)

    def __post_init__(self):
        expect(self.bits in SUPPORTED_BITS, "bits", self.bits, f"one of {SUPPORTED_BITS}")
        expect(self.group_size >= 0, "group_size", self.group_size, "0 (per-channel) or a positive divisor of the input width")

    @property
    def grid(self) -> Grid:
        return Grid(self.bits, self.group_size, self.symmetric)


@register("rtn", family="quantize", stage="inference", config=RTNConfig)
def apply(model: nn.Module, cfg: RTNConfig, calib=None) -> nn.Module:
    layers = linear_layers(model, cfg.targets, cfg.ignore, sparse=True, step="rtn")  # a pruned layer stays sparse
    for name in layers:  # check every layer before touching any
        cfg.grid.group_for(layers[name].in_features, name)
        pruned_mask(layers[name], cfg.grid, name)  # a pruned layer on an asymmetric grid: UserError
    for name, linear in track(layers.items(), f"rtn w{cfg.bits}", total=len(layers)):
        replace_module(model, name, QuantLinear.from_linear(linear, cfg.grid, name))
    log.info("rtn: quantized %d linear layers to %d bits", len(layers), cfg.bits)
    return model
