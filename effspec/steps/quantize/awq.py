"""AWQ: activation-aware weight quantization (Lin et al., "AWQ: Activation-aware Weight Quantization for
On-Device LLM Compression and Acceleration", MLSys 2024).

Weights that meet large activations matter most. Instead of keeping them in
float, AWQ scales every input channel of a linear layer by s > 0 before
rounding and divides its input by s, which leaves the float function unchanged
but lowers the relative rounding error of salient channels (Sec. 3.2):

    L(s) = || Q(W diag(s)) (diag(s)^-1 X) - W X ||                    (Eq. 4)
    s = s_X^alpha,  alpha* = argmin_alpha L(s_X^alpha)                   (Eq. 5)

with s_X the mean |x| of each input channel over the calibration tokens and
alpha on a grid of `n_grid` points in [0, 1) (the reference code normalises s
by sqrt(max(s) min(s))). alpha = 0 is plain round-to-nearest, so the chosen
scale never does worse on the objective. diag(s)^-1 is folded into the op that
produces X (an RMSNorm's weight, or the output rows of the previous linear), so
nothing is added at inference. Then, as the reference code does, each weight
group's range is clipped to the shrink factor in (1 - max_shrink, 1] that
minimises that group's output error ("auto_clip"), and the layer is rounded to
the grid (`effspec.quant`) and packed. With `quantize: false` the scaled and
clipped weights stay in float for a following step (e.g. `gptq`) to round.

Layers are grouped by the input tensor they share (q/k/v, gate/up), found by
hooks, not by name. The op to fold into is the nearest module that ran before
the group and whose output channels can absorb diag(s)^-1 exactly -- checked
numerically once per block architecture by folding random scales into a copy
of the block and comparing its output. So v_proj -> o_proj is used only where
it is exact (not with grouped-query attention, as in the reference), and a
group with no such op is quantized unscaled, with a log line.

The loss of Eq. 4 is computed from the Gram matrix G = X^T X / N of each
group's input (collected over every calibration token in one pass):
||dW X||^2 / N = sum(dW G * dW), for the output of the linear layers
themselves. A group whose common parent is token-wise (an MLP, called with the
group's input alone) is scored on that parent's output instead, as the
reference does, on `sample_tokens` calibration tokens.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call

from effspec.calibrate import block_forward, run_blocks
from effspec.config import expect
from effspec.layers import QuantLinear
from effspec.quant import SUPPORTED_BITS, Grid, dequantize, grid_params, quantize
from effspec.registry import register
from effspec.surgery import linear_layers, replace_module

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AWQConfig:
    bits: int = 4
    group_size: int = 64  # 64, not the paper's 128: smollm2's width 576 is not a multiple of 128
    symmetric: bool = False  # the paper's and reference's default: a zero point (asymmetric grid)
    n_grid: int = 20  # reference: 20 alphas k/20 for the scale, 20 shrink steps for the clip
    clip: bool = True  # reference: auto_clip after auto_scale
    max_shrink: float = 0.5  # reference: clip ranges down to 50% of the group's absmax
    quantize: bool = True  # False: leave scaled, clipped float weights for the next step to round
    # deviation: the reference scores the MLP's output on every calibration token; a sample as large as
    # the reference's whole clip sample x8 (it uses 512) keeps this search from dominating the run
    sample_tokens: int = 4096
    clip_ignore: tuple[str, ...] = ("*q_proj", "*k_proj")  # reference: q/k meet a q k^T product, not clipped
    targets: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = ("lm_head",)

    def __post_init__(self):
        expect(self.bits in SUPPORTED_BITS, "bits", self.bits, f"one of {SUPPORTED_BITS}")
        expect(self.group_size >= 0, "group_size", self.group_size, "0 (per-channel) or a positive divisor of the input width")
        expect(self.n_grid >= 1, "n_grid", self.n_grid, "at least 1 grid point")
        expect(0 <= self.max_shrink < 1, "max_shrink", self.max_shrink, "a fraction in [0, 1)")
        expect(self.sample_tokens >= 1, "sample_tokens", self.sample_tokens, "at least 1 token")

    @property
    def grid(self) -> Grid:
        return Grid(self.bits, self.group_size, self.symmetric)


# ---- the algorithm, on tensors ------------------------------------------------------------------
def pseudo_quantize(W: torch.Tensor, grid: Grid, group: int) -> torch.Tensor:
    """Q(W): round-to-nearest on the grid, returned dequantized (out, in)."""
    scale, minimum = grid_params(W, grid, group)
    return dequantize(quantize(W, scale, minimum, grid), scale, minimum)


def awq_scale(s_X: torch.Tensor, alpha: float) -> torch.Tensor:
    """Eq. 5's s = s_X^alpha, floored at 1e-4 and normalised by sqrt(max * min) as the reference does."""
    s = s_X.pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def gram_error(W: torch.Tensor, G: torch.Tensor) -> Callable[[torch.Tensor], float]:
    """Eq. 4 for linear outputs: ||(W_hat - W) X||^2 / N = sum((dW G) * dW), with G = X^T X / N (in, in)."""
    def error(W_hat: torch.Tensor) -> float:
        dW = W_hat - W
        return float(((dW @ G) * dW).sum())
    return error


def search_scale(W: torch.Tensor, s_X: torch.Tensor, error: Callable[[torch.Tensor], float], grid: Grid,
                 group: int, n_grid: int) -> tuple[torch.Tensor, float]:
    """Grid search of Eq. 5: the s = s_X^alpha (in,) whose Q(W diag(s)) diag(s)^-1 has the least `error`."""
    best: tuple[float, torch.Tensor, float] = (float("inf"), torch.ones_like(s_X), 0.0)
    for k in range(n_grid):
        alpha = k / n_grid
        s = awq_scale(s_X, alpha)
        e = error(pseudo_quantize(W * s, grid, group) / s)
        if e < best[0]:
            best = (e, s, alpha)
    return best[1], best[2]


def search_clip(W: torch.Tensor, G: torch.Tensor, grid: Grid, group: int, n_grid: int,
                max_shrink: float) -> torch.Tensor:
    """The reference's auto_clip: per (row, group) the clip value max|w| (1 - i/n_grid), i < max_shrink n_grid,
    whose rounded group gives the least output error dw G_gg dw^T (G_gg: the group's diagonal block of G).

    Returns the clip values (out, in/group); w is clamped to [-clip, clip] as in the reference.
    """
    out, n = W.shape
    ng = n // group
    Wg = W.reshape(out, ng, group)
    Gb = torch.stack([G[g * group:(g + 1) * group, g * group:(g + 1) * group] for g in range(ng)])  # (ng, gs, gs)
    w_max = Wg.abs().amax(-1)  # (out, ng)
    best_err = torch.full_like(w_max, float("inf"))
    best = w_max.clone()
    for i in range(max(1, int(max_shrink * n_grid))):
        clip = w_max * (1 - i / n_grid)
        Wc = torch.maximum(torch.minimum(Wg, clip[..., None]), -clip[..., None])
        dW = (pseudo_quantize(Wc.reshape(out, n), grid, group).reshape(out, ng, group) - Wg).transpose(0, 1)
        err = (torch.bmm(dW, Gb) * dW).sum(-1).t()  # (out, ng)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, clip, best)
    return best


# ---- wiring to a model --------------------------------------------------------------------------
@dataclass(frozen=True)
class _Group:
    linears: tuple[str, ...]  # block-relative names of the linears reading one input, in run order
    prev: str | None  # the module whose output channels absorb diag(s)^-1, None: left unscaled
    inspect: str | None  # token-wise parent scored on its output (an MLP), None: the linears' outputs


def _linear(block: nn.Module, name: str) -> nn.Linear:
    lin = block.get_submodule(name)
    assert isinstance(lin, nn.Linear)  # names come from surgery.linear_layers
    return lin


def _channel_params(module: nn.Module, channels: int) -> list[nn.Parameter]:
    """The module's own parameters if every one is indexed by output channel along dim 0, else []."""
    params = list(module.parameters(recurse=False))
    return params if params and all(p.shape[0] == channels for p in params) else []


@torch.no_grad()
def _fold(prev: nn.Module, linears: list[nn.Linear], s: torch.Tensor) -> None:
    """prev's output channels /= s, the linears' input columns *= s: the float function is unchanged."""
    for p in _channel_params(prev, s.numel()):
        p.div_(s.view(-1, *[1] * (p.dim() - 1)).to(p.dtype))
    for lin in linears:
        lin.weight.mul_(s.to(lin.weight.dtype))


def _trace(block: nn.Module, x: torch.Tensor, kwargs: dict) -> tuple[list[tuple[str, tuple, dict]], dict]:
    """Every submodule call (name, args, kwargs) of one forward pass in run order, and each one's first output."""
    calls: list[tuple[str, tuple, dict]] = []
    outputs: dict[str, object] = {}
    hooks = []
    for n, m in block.named_modules():
        if n:
            hooks.append(m.register_forward_pre_hook(lambda m, a, k, n=n: calls.append((n, a, k)), with_kwargs=True))
            hooks.append(m.register_forward_hook(lambda m, a, o, n=n: outputs.setdefault(n, o)))
    try:
        with torch.inference_mode():
            block_forward(block, x, kwargs)
    finally:
        for h in hooks:
            h.remove()
    return calls, outputs


def _common_parent(names: tuple[str, ...]) -> str:
    parts = [n.split(".")[:-1] for n in names]
    common = []
    for level in zip(*parts):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return ".".join(common)


@torch.inference_mode()
def _token_wise_parent(block: nn.Module, group: tuple[str, ...], x_in: torch.Tensor, calls: list) -> str | None:
    """The group's common parent if it is called with the group's input alone and maps token rows to rows."""
    parent = _common_parent(group) if len(group) > 1 else ""
    call = next(((a, k) for n, a, k in calls if n == parent), None)
    if not parent or call is None or len(call[0]) != 1 or call[0][0] is not x_in or call[1]:
        return None
    module = block.get_submodule(parent)
    rows = x_in.reshape(-1, x_in.shape[-1])
    idx = torch.arange(0, rows.shape[0], max(1, rows.shape[0] // 16))
    full, part = module(x_in), module(rows[idx][None])
    if not isinstance(full, torch.Tensor) or not isinstance(part, torch.Tensor):
        return None
    full = full.reshape(-1, full.shape[-1])[idx]
    return parent if torch.allclose(part.reshape(full.shape), full, rtol=1e-4, atol=1e-6) else None


def _plan(block: nn.Module, names: list[str], x: torch.Tensor, kwargs: dict) -> list[_Group]:
    """Group `names` by shared input; find each group's foldable op and token-wise parent (on a copy)."""
    block = copy.deepcopy(block)
    calls, outputs = _trace(block, x, kwargs)
    first: dict[str, int] = {}
    for i, (n, _, _) in enumerate(calls):
        first.setdefault(n, i)
    inputs = {n: calls[first[n]][1][0] for n in names if n in first and calls[first[n]][1]}
    with torch.inference_mode():
        ref = block_forward(block, x, kwargs)
    gen = torch.Generator().manual_seed(0)

    def folds_exactly(prev: str, group: tuple[str, ...]) -> bool:
        """Fold random scales into a candidate op and the group: is the block's output unchanged?"""
        lins = [_linear(block, n) for n in group]
        params = _channel_params(block.get_submodule(prev), lins[0].in_features)
        if not params:
            return False
        saved = [p.detach().clone() for p in (*params, *(lin.weight for lin in lins))]
        _fold(block.get_submodule(prev), lins, 0.5 + 1.5 * torch.rand(lins[0].in_features, generator=gen))
        with torch.inference_mode():
            out = block_forward(block, x, kwargs)
        with torch.no_grad():
            for p, v in zip((*params, *(lin.weight for lin in lins)), saved):
                p.copy_(v)
        return bool((out - ref).abs().max() <= 1e-4 * (ref - x).abs().max())  # vs the block's own change

    by_input: dict[int, list[str]] = {}
    for n in sorted(inputs, key=first.__getitem__):
        by_input.setdefault(id(inputs[n]), []).append(n)
    plan = []
    for members in by_input.values():
        group, x_in = tuple(members), inputs[members[0]]
        before = list(dict.fromkeys(n for n, _, _ in calls[:first[group[0]]]))
        makes_x = [n for n in before if outputs.get(n) is x_in]  # the op whose output is the input, first
        prev = next((c for c in dict.fromkeys(makes_x + before[::-1]) if folds_exactly(c, group)), None)
        if prev is None:
            log.info("awq: no op before %s absorbs the scales exactly (or its output feeds other layers); "
                     "left unscaled", ", ".join(group))
        plan.append(_Group(group, prev, _token_wise_parent(block, group, x_in, calls)))
    return plan


class _Stats:
    """Per group input: G = sum x x^T, sum |x| per channel, token count, and a strided token sample."""

    def __init__(self, channels: int, stride: int, keep_sample: bool):
        self.G = torch.zeros(channels, channels)
        self.abs_sum = torch.zeros(channels)
        self.tokens = 0
        self.stride, self.keep = stride, keep_sample
        self.sample: list[torch.Tensor] = []

    def add(self, module, args) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # (tokens, in)
        self.G.addmm_(x.t(), x)
        self.abs_sum += x.abs().sum(0)
        self.tokens += x.shape[0]
        if self.keep:
            self.sample.append(x[:: self.stride])


class _Stop(Exception):
    """Ends a block's forward pass once the last group has seen its input."""


def _collect(block: nn.Module, plan: list[_Group], xs: list[torch.Tensor], kwargs: dict,
             sample_tokens: int) -> dict[str, _Stats]:
    total = sum(x.numel() // x.shape[-1] for x in xs)
    stats = {g.linears[0]: _Stats(_linear(block, g.linears[0]).in_features,
                                  max(1, total // sample_tokens), g.inspect is not None) for g in plan}
    last = block.get_submodule(plan[-1].linears[0])

    def stop(*_):
        raise _Stop

    hooks = [block.get_submodule(n).register_forward_pre_hook(st.add) for n, st in stats.items()]
    hooks.append(last.register_forward_pre_hook(stop))
    try:
        with torch.inference_mode():
            for x in xs:
                try:
                    block_forward(block, x, kwargs)
                except _Stop:
                    pass
    finally:
        for h in hooks:
            h.remove()
    return stats


def _parent_error(parent: nn.Module, names: list[str], sizes: list[int], X: torch.Tensor):
    """Eq. 4 scored on a token-wise parent's output (the reference's module2inspect) for a token sample X."""
    ref = parent(X[None])

    def error(W_hat: torch.Tensor) -> float:
        weights = {n + ".weight": w for n, w in zip(names, W_hat.split(sizes))}
        return float((functional_call(parent, weights, (X[None],)) - ref).pow(2).mean())
    return error


def _awq_block(block: nn.Module, plan: list[_Group], xs: list[torch.Tensor], kwargs: dict, cfg: AWQConfig) -> None:
    """Scale (Eq. 4-5) and fold, then clip, every group of one block; weights stay float."""
    stats = _collect(block, plan, xs, kwargs, cfg.sample_tokens)
    scales = {}
    with torch.inference_mode():
        for g in plan:
            lins = [_linear(block, n) for n in g.linears]
            st = stats[g.linears[0]]
            group = cfg.grid.group_for(lins[0].in_features, g.linears[0])
            s = torch.ones(lins[0].in_features)
            if g.prev is not None:
                W = torch.cat([lin.weight.float() for lin in lins])  # (sum of out, in)
                if g.inspect is not None:
                    rel = [n.removeprefix(g.inspect + ".") for n in g.linears]
                    X = torch.cat(st.sample)[: cfg.sample_tokens]
                    error = _parent_error(block.get_submodule(g.inspect), rel, [lin.out_features for lin in lins], X)
                else:
                    error = gram_error(W, st.G / st.tokens)
                s, alpha = search_scale(W, st.abs_sum / st.tokens, error, cfg.grid, group, cfg.n_grid)
                _fold(block.get_submodule(g.prev), lins, s)
                log.debug("awq: %s alpha %.2f", ", ".join(g.linears), alpha)
            scales[g] = s
        for g in plan if cfg.clip else []:  # after every fold: clip the weights as they will be rounded
            st, s = stats[g.linears[0]], scales[g]
            G = st.G / st.tokens / s[:, None] / s[None, :]  # the Gram of the scaled input x / s
            for n in g.linears:
                if any(fnmatch.fnmatchcase(n, p) for p in cfg.clip_ignore):
                    continue
                lin = _linear(block, n)
                group = cfg.grid.group_for(lin.in_features, n)
                clip = search_clip(lin.weight.float(), G, cfg.grid, group, cfg.n_grid, cfg.max_shrink)
                c = clip.repeat_interleave(group, 1).to(lin.weight.dtype)
                lin.weight.copy_(torch.maximum(torch.minimum(lin.weight, c), -c))


@register("awq", family="quantize", stage="inference", config=AWQConfig, calibration=True)
def apply(model: nn.Module, cfg: AWQConfig, calib=None) -> nn.Module:
    targets = linear_layers(model, cfg.targets, cfg.ignore)
    for name, lin in targets.items():  # check every shape before any work
        cfg.grid.group_for(lin.in_features, name)
    if calib is None:
        raise ValueError("awq needs calibration data")
    block_names = {id(m): n for n, m in model.named_modules()}
    plans: dict[tuple, list[_Group]] = {}  # one plan per block architecture and target set

    def process(i: int, block: nn.Module, xs: list[torch.Tensor], kwargs: dict) -> None:
        prefix = block_names[id(block)] + "."
        names = [n for n in linear_layers(block, ("*",), ()) if prefix + n in targets]
        if not names:
            return
        key = (type(block), tuple(names))
        if key not in plans:
            plans[key] = _plan(block, names, xs[0], kwargs)
        _awq_block(block, plans[key], xs, kwargs, cfg)
        if cfg.quantize:
            for n in names:
                replace_module(block, n, QuantLinear.from_linear(_linear(block, n), cfg.grid, prefix + n))
        log.info("awq: block %d done (%d layers)", i, len(names))

    run_blocks(model, calib, process)
    return model
