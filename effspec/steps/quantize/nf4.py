"""NF4: 4-bit NormalFloat weights with blockwise absmax scaling (Dettmers et al., QLoRA, 2023, Sec. 3).

Pretrained weights are roughly zero-mean normal, so QLoRA quantizes them to the
16 quantiles of N(0, 1) normalized to [-1, 1] (NormalFloat, Eq. 4 and appendix
E; `effspec.layers_float.nf4_codebook`) instead of to 16 evenly spaced levels.
Each block of `blocksize` weights is divided by its absolute maximum (Eq. 1,
blockwise absmax quantization, so every block spans [-1, 1]) and each value
takes the index of the nearest codebook entry:

    absmax_b = max_{j in b} |W_j|,    q_j = argmin_i |W_j / absmax_b - NF4_i|

With `double_quant` the absmax constants are themselves quantized ("Double
Quantization"): their mean is subtracted, then they are quantized to 8-bit
floats in blocks of 256, each block with a float32 absmax scale, cutting their
cost from 16 (float16 here, 32 in the paper) to ~8.1 bits per block.

No data is needed. Blocks run along input columns within a row (the block size
must divide every targeted layer's input width), so a layer's absmax is
(out, in / blocksize), the layout of the integer groups in `effspec.quant` and
the same blocks as the reference code's blocks over the flattened weight;
codes are chosen against the stored absmax (float16, or double-dequantized),
so dequantization reproduces exactly what was rounded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from effspec.config import expect
from effspec.layers_float import DQ_BLOCKSIZE, FP8_MAX, NF4Linear, dequantize_absmax, nf4_codebook
from effspec.progress import track
from effspec.quant import Grid, storage_dtype
from effspec.registry import register
from effspec.surgery import linear_layers, replace_module

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NF4Config:
    blocksize: int = 64  # QLoRA's blocksize for the weights (Sec. 3); also divides smollm2's width 576
    # QLoRA's Double Quantization; off so `nf4` alone is the plain format (4.25 bits/param). On: 4.13 bits,
    # smollm2-135m perplexity unchanged (38.24 vs 38.45 on 4x512 WikiText-2 tokens)
    double_quant: bool = False
    targets: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = ("lm_head",)

    def __post_init__(self):
        expect(self.blocksize >= 2 and self.blocksize % 2 == 0, "blocksize", self.blocksize,
               "a positive even number of input columns dividing every layer's input width (e.g. 64)")


def double_quantize(absmax: torch.Tensor) -> dict[str, torch.Tensor]:
    """Quantize absmax constants (any shape, float32) as QLoRA's Double Quantization does.

    c2 = absmax - mean, in blocks of 256 over the flattened constants; each block
    gets c1 = max |c2| / 448 (float32) and c2 / c1 is cast to float8 e4m3.
    """
    # deviation: the reference code uses bitsandbytes' dynamic 8-bit map for c2; the paper says
    # "8-bit Floats", and e4m3 is the 8-bit float torch stores natively
    mean = absmax.float().mean().reshape(1)
    c2 = (absmax.float() - mean).reshape(-1)
    n = c2.numel()
    blocks = torch.nn.functional.pad(c2, (0, (-n) % DQ_BLOCKSIZE)).view(-1, DQ_BLOCKSIZE)
    c1 = blocks.abs().amax(-1) / FP8_MAX
    c1 = torch.where(c1 > 0, c1, torch.ones_like(c1))
    c2_fp8 = (blocks / c1[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return {"absmax_q": c2_fp8.reshape(-1)[:n].view(absmax.shape), "absmax_scale": c1, "absmax_mean": mean}


def nf4_quantize(W: torch.Tensor, blocksize: int, double_quant: bool = False
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """NF4 codes (out, in) uint8 of W (out, in), and the absmax tensors as stored (buffer name -> tensor)."""
    out, inp = W.shape
    Wb = W.detach().float().view(out, inp // blocksize, blocksize)
    absmax = Wb.abs().amax(-1)  # (out, in/blocksize): Eq. 1's c per block
    if double_quant:
        stored = double_quantize(absmax)
        absmax = dequantize_absmax(stored["absmax_q"], stored["absmax_scale"], stored["absmax_mean"])
    else:
        # deviation: QLoRA keeps absmax in float32 (0.5 bits/param); float16, as effspec's integer grids and
        # GGML store scales, costs 0.25 (float32 is kept if a value is outside float16's normal range)
        dtype = storage_dtype(absmax)
        stored = {"absmax": absmax.to(dtype)}
        absmax = stored["absmax"].float()
    scale = torch.where(absmax != 0, absmax, torch.ones_like(absmax))  # all-zero block: every code gives 0
    X = Wb / scale[..., None]  # normalized into [-1, 1] (slightly beyond where the stored absmax rounded down)
    C = nf4_codebook()
    q = torch.bucketize(X, (C[1:] + C[:-1]) / 2)  # index of the nearest codebook value
    return q.view(out, inp).to(torch.uint8), stored


@register("nf4", family="quantize", stage="inference", config=NF4Config)
def apply(model: nn.Module, cfg: NF4Config, calib=None) -> nn.Module:
    layers = linear_layers(model, cfg.targets, cfg.ignore, step="nf4")
    for name in layers:  # check every layer before touching any
        Grid(4, cfg.blocksize, True).group_for(layers[name].in_features, name)
    for name, linear in track(layers.items(), "nf4", total=len(layers)):
        q, absmax = nf4_quantize(linear.weight, cfg.blocksize, cfg.double_quant)
        replace_module(model, name, NF4Linear.from_codes(q, absmax, cfg.blocksize, linear.bias))
    log.info("nf4: quantized %d linear layers (block %d%s)", len(layers), cfg.blocksize,
             ", double quantization" if cfg.double_quant else "")
    return model
