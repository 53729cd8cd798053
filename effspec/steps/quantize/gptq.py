"""GPTQ: layer-wise quantization with second-order error compensation (Frantar et al., ICLR 2023).

For a linear layer with weight W (out, in) and calibration inputs X (in, tokens),
GPTQ minimizes the layer's output error ||W X - Q X||^2 column by column
(Algorithm 1): with H = 2 X X^T (the Hessian of that error), quantize column j,
then spread its rounding error over the columns not yet quantized,

    err = (w_j - q_j) / [H^-1]_jj,    W[:, j+1:] -= err [H^-1]_{j, j+1:}

using the upper Cholesky factor of H^-1 ("Cholesky reformulation", Sec. 3.3)
and applying the updates lazily in blocks of `block_size` columns ("lazy batch
updates"). H is damped by `dampening` times its mean diagonal. With
`act_order` columns are visited in order of decreasing diag(H) (the
"desc_act" heuristic of the reference code); group parameters are then computed
from the original weights ("static groups") so every group stays contiguous in
storage.

`apply` runs calibration through `effspec.layerwise` (shared with SparseGPT
and Wanda): block by block, one H per group of layers reading the same input
(q/k/v, gate/up), true-sequential inside a block by default. Layers pruned by
an earlier step keep their mask (`keep` of `gptq_quantize`) and become
`SparseQuantLinear`: SparseGPT then GPTQ, as llm-compressor chains them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from effspec.calibrate import check_calibration_dtype
from effspec.config import expect
from effspec.layers import packed_layer, pruned_mask
from effspec.layerwise import solve_layerwise
from effspec.quant import SUPPORTED_BITS, Grid, grid_params
from effspec.registry import register
from effspec.surgery import linear_layers, replace_module


@dataclass(frozen=True)
class GPTQConfig:
    bits: int = 4
    group_size: int = 64  # 64, not the paper's 128: smollm2's width 576 is not a multiple of 128
    symmetric: bool = True
    act_order: bool = True  # desc_act, with static groups
    dampening: float = 0.01  # "percdamp" of the reference code: 1% of the mean diagonal of H
    block_size: int = 128  # lazy-batch width (the paper's B = 128)
    true_sequential: bool = True
    # "bfloat16" runs calibration forwards under bf16 autocast (the reference code runs fp16 models on
    # GPU): ~3x faster matmuls on CPUs with AVX512-BF16, emulated and slower without it. H is still
    # accumulated in float32 (of the bf16-rounded inputs).
    calibration_dtype: str = "float32"
    targets: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = ("lm_head",)

    def __post_init__(self):
        expect(self.bits in SUPPORTED_BITS, "bits", self.bits, f"one of {SUPPORTED_BITS}")
        expect(self.group_size >= 0, "group_size", self.group_size, "0 (per-channel) or a positive divisor of the input width")
        expect(0 < self.dampening < 1, "dampening", self.dampening, "a fraction in (0, 1)")
        expect(self.block_size >= 1, "block_size", self.block_size, "a positive number of columns")
        check_calibration_dtype(self.calibration_dtype)

    @property
    def grid(self) -> Grid:
        return Grid(self.bits, self.group_size, self.symmetric)


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, grid: Grid, group: int, cfg: GPTQConfig,
                  keep: torch.Tensor | None = None):
    """GPTQ codes for W (out, in) given H (in, in); returns (q uint8 (out, in), scale, minimum (out, in/group)).

    `keep` (out, in) holds a pruned layer's mask (symmetric grids): positions outside it take the zero code, and
    the updates they received along the way are compensated like rounding errors (SparseGPT's sweep with a
    fixed mask), so the layer stays exactly as sparse."""
    W = W.float().clone()
    H = H.float().clone()
    out, n = W.shape
    dead = torch.diag(H) == 0  # inputs never active: any value works, zero them
    H[dead, dead] = 1
    W[:, dead] = 0
    scale, minimum = grid_params(W, grid, group)  # static groups: from the original weights
    perm = torch.argsort(torch.diag(H), descending=True) if cfg.act_order else torch.arange(n)
    W, H = W[:, perm], H[perm][:, perm]
    keep = keep[:, perm] if keep is not None else None
    zero = 2 ** (grid.bits - 1)  # the symmetric grid's code for 0
    col_group = perm // group  # the group each (permuted) column belongs to
    H += cfg.dampening * torch.mean(torch.diag(H)) * torch.eye(n)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    for i1 in range(0, n, cfg.block_size):
        i2 = min(i1 + cfg.block_size, n)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            w, d, g = W1[:, i], Hinv1[i, i], col_group[i1 + i]
            q = torch.clamp(torch.round((w - minimum[:, g]) / scale[:, g]), 0, grid.maxq)
            if keep is not None:
                q = torch.where(keep[:, i1 + i], q, zero)
            Q[:, i1 + i] = q
            err = (w - (q * scale[:, g] + minimum[:, g])) / d
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    q = torch.empty_like(Q)
    q[:, perm] = Q
    return q.to(torch.uint8), scale, minimum


@register("gptq", family="quantize", stage="inference", config=GPTQConfig, calibration=True)
def apply(model: nn.Module, cfg: GPTQConfig, calib=None) -> nn.Module:
    targets = linear_layers(model, cfg.targets, cfg.ignore, sparse=True, step="gptq")  # a pruned layer stays sparse
    for name, lin in targets.items():  # check every shape before any work
        cfg.grid.group_for(lin.in_features, name)
        pruned_mask(lin, cfg.grid, name)
    if calib is None:
        raise ValueError("gptq needs calibration data")

    def quantize_group(block: nn.Module, group: list[str], H: torch.Tensor) -> None:
        for n in group:
            lin = block.get_submodule(n)
            keep = pruned_mask(lin, cfg.grid, n)
            q, scale, minimum = gptq_quantize(lin.weight.detach(), H, cfg.grid,
                                              cfg.grid.group_for(lin.in_features, n), cfg, keep)
            replace_module(block, n, packed_layer(q, scale, minimum, cfg.grid, lin.bias, keep))

    return solve_layerwise(model, calib, targets, quantize_group, cfg.true_sequential, cfg.calibration_dtype, "gptq")
