"""SparseGPT: one-shot pruning with second-order weight updates (Frantar & Alistarh, ICML 2023).

For a linear layer with weight W (out, in) and H = 2 X X^T from calibration
inputs, SparseGPT removes weights column by column and, like GPTQ (whose
machinery it shares), spreads each column's error over the columns not yet
visited through the upper Cholesky factor of H^-1:

    err = (w_j - p_j) / [H^-1]_jj,    W[:, j+1:] -= err [H^-1]_{j, j+1:}

where p_j is column j with its pruned entries zeroed (Algorithm 1). The mask is
chosen lazily, block by block ("adaptive mask selection"): at the start of
each `block_size`-column block, from the OBS saliency w^2 / [H^-1]_jj^2 of the
updated weights -- the lowest `sparsity` fraction of the whole block for
unstructured sparsity, the lowest M - N of every M columns of a row for N:M.

Joint quantization (Sec. 3.5): with `bits` > 0 every surviving weight is also
rounded to the integer grid (`effspec.quant`, symmetric so a pruned weight is
exactly code 2^(bits-1) = 0) in the same sweep, its rounding error compensated
like the pruning error; group parameters come from the updated weights at each
group's first column, as in the reference code. The layer is then a
`SparseQuantLinear`: the bitmask plus the kept codes only (50% at 4 bits: 3
bits a weight before the scales, against 4 dense); without `bits` a
`SparseLinear` (bitmask + float values). By default (`refit_iters` > 0) the
weights are first pruned and refit (below), and a second sweep then rounds the
refit weights with the mask fixed: for a fixed mask the output error splits
exactly into the refit's pruning error plus the rounding error measured from
the refit weights (the refit leaves no gradient on the kept weights), so
rounding is left to a GPTQ-style sweep of its own. smollm2-135m 50% w4 g64
(8x1024 calibration, 4 eval windows, 1 thread): 54.82 against 65.63 for the
paper's single sweep (`refit_iters: 0`), 235 s against 114 s; on the full
protocol 45.96 against 54.58 (llm-compressor's SparseGPT then GPTQ: 53.27).

After Algorithm 1, SparseGPT re-solves the kept weights for the final
mask (`refit_iters`, default 20; 0 gives Algorithm 1 alone): the sweep never
revisits a column, so weights kept left of a column pruned later never
compensate for it. `refit` runs conjugate-gradient steps on the row-wise
least-squares problem the paper states (Sec. 3.1) and avoids at scale for its
cost (a different H_KK per row). On smollm2-135m at 50% (8x1024 calibration,
4 eval windows, 1 thread) it took perplexity from 49.07 to 45.62 (20 steps) or
45.76 (50 steps); the 20 steps added 109 s to Algorithm 1's 203 s (2 busy
cores). On the full protocol (`bench/prune.py`: 32x2048 calibration, 32 eval
windows) it took 50% from 40.63 to 37.10 (llm-compressor 40.04) and 2:4 from
69.20 to 58.71. Each step is one (out, in) x (in, in) product per layer.

Calibration runs block by block through `effspec.layerwise` (true-sequential
by default); H is damped by `dampening` times its mean diagonal.

`allocation: owl` prunes each decoder block to its own OWL sparsity (more
outliers, fewer weights removed; mean `sparsity`), from one extra calibration
pass over the dense model (`effspec.owl`); unstructured only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch
from torch import nn

from effspec.config import expect
from effspec.layers import SparseQuantLinear
from effspec.layerwise import solve_layerwise
from effspec.quant import SUPPORTED_BITS, Grid, grid_params
from effspec.registry import register
from effspec.owl import block_configs
from effspec.sparsity import CalibratedPruneConfig, SparseLinear, nm_mask, unstructured_mask
from effspec.surgery import linear_layers, replace_module

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SparseGPTConfig(CalibratedPruneConfig):
    bits: int = 0  # > 0: quantize jointly to this many bits (symmetric grid)
    group_size: int = 64  # of the joint quantization grid; 0 = per channel
    block_size: int = 128  # lazy-batch and mask-selection width (the paper's B_s = 128)
    dampening: float = 0.01
    true_sequential: bool = True
    refit_iters: int = 20  # re-solve the kept weights for the final mask (`refit`); 0: Algorithm 1 alone

    def __post_init__(self):
        super().__post_init__()
        expect(self.bits == 0 or self.bits in SUPPORTED_BITS, "bits", self.bits,
               f"0 (prune only) or one of {SUPPORTED_BITS} (prune and quantize jointly)")
        expect(self.group_size >= 0, "group_size", self.group_size, "0 (per-channel) or a positive divisor of the input width")
        expect(self.block_size >= 1, "block_size", self.block_size, "a positive number of columns")
        expect(0 < self.dampening < 1, "dampening", self.dampening, "a fraction in (0, 1)")
        expect(self.refit_iters >= 0, "refit_iters", self.refit_iters, "0 (Algorithm 1 alone) or a number of iterations")
        if self.pattern:
            expect(self.block_size % self.pattern[1] == 0, "block_size", self.block_size, f"a multiple of M={self.pattern[1]}")
        if self.bits and self.group_size:
            expect(self.block_size % self.group_size == 0, "block_size", self.block_size,
                   f"a multiple of group_size={self.group_size}")

    @property
    def grid(self) -> Grid | None:
        return Grid(self.bits, self.group_size, True) if self.bits else None


@dataclass
class Pruned:
    weight: torch.Tensor  # (out, in) float, zeros where pruned (dequantized values when quantized)
    keep: torch.Tensor  # (out, in) bool
    codes: torch.Tensor | None = None  # (out, in) uint8 when quantized jointly
    scale: torch.Tensor | None = None  # (out, in/group)
    minimum: torch.Tensor | None = None


def sparsegpt_prune(W: torch.Tensor, H: torch.Tensor, cfg: SparseGPTConfig) -> Pruned:
    """SparseGPT on one layer, W (out, in), H (in, in): Algorithm 1, then the refit; with bits, refit weights are
    quantized by a second sweep with the mask fixed (or, `refit_iters: 0`, pruned and quantized in one sweep)."""
    if cfg.grid and cfg.refit_iters:
        pruned = sweep(W, H, replace(cfg, bits=0))
        return sweep(pruned.weight, H, cfg, fixed=pruned.keep)
    return sweep(W, H, cfg)


def sweep(W: torch.Tensor, H: torch.Tensor, cfg: SparseGPTConfig, fixed: torch.Tensor | None = None) -> Pruned:
    """Algorithm 1: one pass over the columns, pruning (and rounding, with bits) and compensating as it goes; the
    mask chosen block by block, or `fixed` (then only rounding errors and the pruned weights' drift move weights).
    Without bits, the refit follows."""
    W = W.float().clone()
    H = H.float().clone()
    out, n = W.shape
    dead = torch.diag(H) == 0  # inputs never active: their weights can go at no cost
    H[dead, dead] = 1
    W[:, dead] = 0
    W0 = W.clone() if cfg.refit_iters and not cfg.grid else None
    H += cfg.dampening * torch.mean(torch.diag(H)) * torch.eye(n)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    grid = cfg.grid
    group = grid.group_for(n) if grid else 0
    if grid:
        codes = torch.zeros(out, n, dtype=torch.uint8)
        scale, minimum = torch.zeros(out, n // group), torch.zeros(out, n // group)
        if grid.group_size == 0:  # per channel: one grid from the whole original row
            scale, minimum = grid_params(W, grid, n)
    keep = torch.ones(out, n, dtype=torch.bool)
    Q = torch.zeros_like(W)
    for i1 in range(0, n, cfg.block_size):
        i2 = min(i1 + cfg.block_size, n)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        Err1 = torch.zeros_like(W1)
        keep1 = keep[:, i1:i2]
        if fixed is not None:
            keep1[:] = fixed[:, i1:i2]
        elif not cfg.pattern:  # the block's mask at once, from the saliency of its updated weights
            keep1[:] = unstructured_mask(W1**2 / d[None, :] ** 2, cfg.sparsity)
        for i in range(i2 - i1):
            col = i1 + i
            if fixed is None and cfg.pattern and i % cfg.pattern[1] == 0:
                m = cfg.pattern[1]
                keep1[:, i:i + m] = nm_mask(W1[:, i:i + m] ** 2 / d[None, i:i + m] ** 2, *cfg.pattern)
            w = W1[:, i]
            p = w * keep1[:, i]
            if grid:
                g = col // group
                if grid.group_size and col % group == 0:
                    s, mn = grid_params(W1[:, i:i + group], grid, group)
                    scale[:, g], minimum[:, g] = s[:, 0], mn[:, 0]
                c = torch.clamp(torch.round((p - minimum[:, g]) / scale[:, g]), 0, grid.maxq)
                codes[:, col] = c.to(torch.uint8)
                p = c * scale[:, g] + minimum[:, g]
            Q[:, col] = p
            err = (w - p) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if grid:
        return Pruned(Q, keep, codes, scale, minimum)
    if cfg.refit_iters:
        Q = refit(Q, W0, H, keep, cfg.refit_iters)
    return Pruned(Q, keep)


def refit(W: torch.Tensor, W0: torch.Tensor, H: torch.Tensor, keep: torch.Tensor, iters: int) -> torch.Tensor:
    """Lower every row's (w - w0) H (w - w0)^T over its kept weights, starting from W (pruned ones stay 0).

    Algorithm 1 freezes a column once it is visited, so kept weights left of a
    later-pruned column never compensate for it; the best weights for the final
    mask solve H_KK w_K = H_K: w0 per row. Exact solves cost a Cholesky of each
    row's own H_KK; instead, `iters` steps of Jacobi-preconditioned conjugate
    gradient run on all rows at once (one (out, in) x (in, in) product a step).
    Each step lowers every row's error, so the result is never worse than W.
    """
    M = keep.float()
    X = W.clone()
    R = ((W0 - X) @ H) * M  # minus half the gradient, on the kept weights
    Dinv = 1 / torch.diag(H)
    Z = R * Dinv
    P = Z.clone()
    rz = (R * Z).sum(1)
    for _ in range(iters):
        AP = (P @ H) * M
        pAp = (P * AP).sum(1)
        alpha = torch.where(pAp > 0, rz / pAp, torch.zeros_like(pAp))
        X += alpha[:, None] * P
        R -= alpha[:, None] * AP
        Z = R * Dinv
        rz_next = (R * Z).sum(1)
        beta = torch.where(rz > 0, rz_next / rz, torch.zeros_like(rz))
        P = Z + beta[:, None] * P
        rz = rz_next
    return X


@register("sparsegpt", family="prune", stage="inference", config=SparseGPTConfig, calibration=True)
def apply(model: nn.Module, cfg: SparseGPTConfig, calib=None) -> nn.Module:
    targets = linear_layers(model, cfg.targets, cfg.ignore, step="sparsegpt")
    cfg.check_widths(targets)
    if cfg.grid:
        for name, lin in targets.items():
            cfg.grid.group_for(lin.in_features, name)
    if calib is None:
        raise ValueError("sparsegpt needs calibration data")

    config_of = block_configs(model, calib, targets, cfg)  # per-block sparsity when allocation is owl

    def prune_group(block: nn.Module, group: list[str], H: torch.Tensor) -> None:
        for n in group:
            lin = block.get_submodule(n)
            r = sparsegpt_prune(lin.weight.detach(), H, config_of(block))
            if cfg.grid:
                layer = SparseQuantLinear.from_codes(r.codes, r.scale, r.minimum, cfg.grid, lin.bias, r.keep)
            else:
                layer = SparseLinear.from_weight(r.weight, r.keep, lin.bias)
            replace_module(block, n, layer)

    model = solve_layerwise(model, calib, targets, prune_group, cfg.true_sequential, cfg.calibration_dtype, "sparsegpt")
    log.info("sparsegpt: pruned %d linear layers%s", len(targets), f", {cfg.bits}-bit" if cfg.bits else "")
    return model
