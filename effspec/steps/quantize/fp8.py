"""FP8 E4M3 weights with a float scale per output channel or group (OCP 8-bit floating point, 2023).

Each weight is stored as an OCP FP8 E4M3 number (torch.float8_e4m3fn: 1 sign,
4 exponent bits with bias 7, 3 mantissa bits; largest finite value 448, no
infinities) times a float32 scale shared by its output channel (default) or by
a group of `group_size` input columns. The scale maps the row's (group's)
absolute maximum onto the largest E4M3 value,

    s = max |W_g| / 448,    W_fp8 = round_to_nearest_e4m3(W / s),    W_hat = W_fp8 * s

so no weight saturates, and rounding has 3 mantissa bits of relative precision
(error at most 2^-4 |w| for normal E4M3 numbers, 2^-10 s below 2^-6 s). This is
the weight format of the FP8 schemes vLLM and compressed-tensors ship (which
also cast activations to FP8 on GPUs with FP8 matmuls; activations stay float
here). No data is needed; layers become `effspec.layers_float.FP8Linear` (1 byte a weight plus
4 bytes a scale).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from effspec.config import expect
from effspec.layers_float import FP8_MAX, FP8Linear
from effspec.progress import track
from effspec.quant import Grid
from effspec.registry import register
from effspec.surgery import linear_layers, replace_module

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FP8Config:
    # 0 = one scale per output channel, compressed-tensors' "channel" strategy for FP8 weights
    group_size: int = 0
    targets: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = ("lm_head",)

    def __post_init__(self):
        expect(self.group_size >= 0, "group_size", self.group_size,
               "0 (per-channel) or a positive divisor of the input width")


def fp8_quantize(W: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_fp8 (out, in) float8_e4m3fn, s (out, in/group) float32) for W (out, in)."""
    out, inp = W.shape
    Wg = W.detach().float().view(out, inp // group, group)
    s = Wg.abs().amax(-1) / FP8_MAX
    s = torch.where(s > 0, s, torch.ones_like(s))  # all-zero group: any scale works
    # torch's cast rounds to nearest, ties to even (tests check it against every E4M3 value); the clamp
    # guards the +-448 ends against float rounding of W / s whatever the cast does out of range
    W_fp8 = (Wg / s[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return W_fp8.view(out, inp), s


@register("fp8", family="quantize", stage="inference", config=FP8Config)
def apply(model: nn.Module, cfg: FP8Config, calib=None) -> nn.Module:
    layers = linear_layers(model, cfg.targets, cfg.ignore, step="fp8")
    for name in layers:  # check every layer before touching any
        Grid(8, cfg.group_size, True).group_for(layers[name].in_features, name)
    for name, linear in track(layers.items(), "fp8", total=len(layers)):
        W_fp8, s = fp8_quantize(linear.weight, cfg.group_size or linear.in_features)
        replace_module(model, name, FP8Linear.from_codes(W_fp8, s, cfg.group_size, linear.bias))
    log.info("fp8: quantized %d linear layers to float8 e4m3", len(layers))
    return model
