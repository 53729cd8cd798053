"""AWQ: activation-aware per-channel weight scaling, then clipping and rounding (Lin et al., MLSys 2024).

"AWQ: Activation-aware Weight Quantization for On-Device LLM Compression and
Acceleration", Lin et al., MLSys 2024; reference code mit-han-lab/llm-awq.

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

Both searches score Eq. 4 on the outputs of the group's linear layers, through
the Gram matrix G = X^T X / N of their input summed once over every
calibration token: ||dW X||^2 / N = sum((dW G) * dW), so no grid point re-runs
any part of the model, and the clip search (each weight group's diagonal block
of G) sees every token where the reference samples 512. Calibration runs block
by block (`effspec.calibrate`). Deviations from the reference code are marked
in `_awq_block` and `apply`.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from effspec.calibrate import block_forward, run_blocks, trace_block
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
    clip_ignore: tuple[str, ...] = ("*q_proj", "*k_proj")  # reference: q/k meet a q k^T product, not clipped
    targets: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = ("lm_head",)

    def __post_init__(self):
        expect(self.bits in SUPPORTED_BITS, "bits", self.bits, f"one of {SUPPORTED_BITS}")
        expect(self.group_size >= 0, "group_size", self.group_size, "0 (per-channel) or a positive divisor of the input width")
        expect(self.n_grid >= 1, "n_grid", self.n_grid, "at least 1 grid point")
        expect(0 <= self.max_shrink < 1, "max_shrink", self.max_shrink, "a fraction in [0, 1)")

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
    prev: str | None  # the module whose output channels absorb diag(s)^-1; None: left unscaled


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


def _trace(block: nn.Module, x: torch.Tensor, kwargs: dict) -> tuple[list[tuple[str, tuple]], dict]:
    """Every submodule call (name, args) of one forward pass in run order, and each module's first output."""
    calls: list[tuple[str, tuple]] = []
    outputs: dict[str, object] = {}
    trace_block(block, x, kwargs, lambda n, a, k: calls.append((n, a)), lambda n, a, o: outputs.setdefault(n, o))
    return calls, outputs


def _plan(block: nn.Module, names: list[str], x: torch.Tensor, kwargs: dict) -> list[_Group]:
    """Group `names` by the input tensor they share and find the op each group's scales fold into.

    Works on a copy of the block and one calibration sequence. A candidate op (one that ran before the
    group, nearest first, the op whose output *is* the input before all) is accepted only if folding
    random scales into it and the group leaves the block's output unchanged.
    """
    block = copy.deepcopy(block)
    calls, outputs = _trace(block, x, kwargs)
    first: dict[str, int] = {}
    for i, (n, _) in enumerate(calls):
        first.setdefault(n, i)
    inputs = {n: calls[first[n]][1][0] for n in names if n in first and calls[first[n]][1]}
    with torch.inference_mode():
        ref = block_forward(block, x, kwargs)
    gen = torch.Generator().manual_seed(0)

    def folds_exactly(prev: str, group: tuple[str, ...]) -> bool:
        lins = [_linear(block, n) for n in group]
        params = _channel_params(block.get_submodule(prev), lins[0].in_features)
        if not params:
            return False
        weights = (*params, *(lin.weight for lin in lins))
        saved = [w.detach().clone() for w in weights]
        _fold(block.get_submodule(prev), lins, 0.5 + 1.5 * torch.rand(lins[0].in_features, generator=gen))
        with torch.inference_mode():
            out = block_forward(block, x, kwargs)
        with torch.no_grad():
            for w, v in zip(weights, saved):
                w.copy_(v)
        return bool((out - ref).abs().max() <= 1e-4 * (ref - x).abs().max())  # vs the block's own change

    by_input: dict[int, list[str]] = {}
    for n in sorted(inputs, key=first.__getitem__):
        by_input.setdefault(id(inputs[n]), []).append(n)
    plan = []
    for members in by_input.values():
        group = tuple(members)
        before = list(dict.fromkeys(n for n, _ in calls[:first[group[0]]]))
        makes_x = [n for n in before if outputs.get(n) is inputs[group[0]]]
        prev = next((c for c in dict.fromkeys(makes_x + before[::-1]) if folds_exactly(c, group)), None)
        if prev is None:
            log.info("awq: no op before %s absorbs the scales exactly (or its output feeds other layers); "
                     "left unscaled", ", ".join(group))
        plan.append(_Group(group, prev))
    return plan


class _Stats:
    """One group's input statistics: sum of x x^T, sum of |x| per channel, token count."""

    def __init__(self, channels: int):
        self.G = torch.zeros(channels, channels)
        self.abs_sum = torch.zeros(channels)
        self.tokens = 0

    def add(self, module, args) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # (tokens, in)
        self.G.addmm_(x.t(), x)
        self.abs_sum += x.abs().sum(0)
        self.tokens += x.shape[0]


class _Stop(Exception):
    """Ends a block's forward pass once the last group has seen its input."""


def _raise_stop(*_):
    raise _Stop


def _collect(block: nn.Module, plan: list[_Group], xs: list[torch.Tensor], kwargs: dict) -> dict[str, _Stats]:
    """Input statistics of every group over all calibration sequences, from the block as it is."""
    stats = {g.linears[0]: _Stats(_linear(block, g.linears[0]).in_features) for g in plan}
    hooks = [block.get_submodule(n).register_forward_pre_hook(st.add) for n, st in stats.items()]
    hooks.append(block.get_submodule(plan[-1].linears[0]).register_forward_pre_hook(_raise_stop))
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


@torch.inference_mode()
def _awq_block(block: nn.Module, plan: list[_Group], xs: list[torch.Tensor], kwargs: dict, cfg: AWQConfig) -> None:
    """Search and fold every group's scales (Eq. 4-5), then clip the weights; they stay float."""
    stats = _collect(block, plan, xs, kwargs)
    scales = {}
    # deviation: the reference scores q/k/v on the attention module's output and gate/up on the MLP's
    # ("module2inspect"), re-running them on every token for each alpha; here every group is scored on
    # its linears' outputs (Eq. 4 as written). On smollm2-135m w3 g64 (4x2048 calibration tokens, 4
    # WikiText test windows) scoring gate/up on the MLP output moved perplexity by -0.3% (1024 sampled
    # tokens) and +1.4% (4096), noise, for 1.3x and 2.3x the run time.
    for g in plan:  # in run order, as the reference; each search sees the float weights of its own group
        lins = [_linear(block, n) for n in g.linears]
        st = stats[g.linears[0]]
        s = torch.ones(lins[0].in_features)
        if g.prev is not None:
            W = torch.cat([lin.weight.float() for lin in lins])  # (sum of out, in)
            group = cfg.grid.group_for(W.shape[1], g.linears[0])
            s, alpha = search_scale(W, st.abs_sum / st.tokens, gram_error(W, st.G / st.tokens), cfg.grid,
                                    group, cfg.n_grid)
            _fold(block.get_submodule(g.prev), lins, s)
            log.debug("awq: %s alpha %.2f", ", ".join(g.linears), alpha)
        scales[g] = s
    for g in plan if cfg.clip else []:  # after every fold, so each weight is clipped as it will be rounded
        st, s = stats[g.linears[0]], scales[g]
        G = st.G / st.tokens / s[:, None] / s[None, :]  # the Gram of the scaled input x / s
        for n in g.linears:
            if any(fnmatch.fnmatchcase(n, p) for p in cfg.clip_ignore):
                continue
            lin = _linear(block, n)
            group = cfg.grid.group_for(lin.in_features, n)
            clip = search_clip(lin.weight.float(), G, cfg.grid, group, cfg.n_grid, cfg.max_shrink)
            c = clip.repeat_interleave(group, 1).to(lin.weight.dtype)  # (out, in)
            lin.weight.copy_(torch.maximum(torch.minimum(lin.weight, c), -c))


@register("awq", family="quantize", stage="inference", config=AWQConfig, calibration=True)
def apply(model: nn.Module, cfg: AWQConfig, calib=None) -> nn.Module:
    targets = linear_layers(model, cfg.targets, cfg.ignore, step="awq")
    for name, lin in targets.items():  # check every shape before any work
        cfg.grid.group_for(lin.in_features, name)
    if calib is None:
        raise ValueError("awq needs calibration data")
    block_names = {id(m): n for n, m in model.named_modules()}
    plans: dict[tuple, list[_Group]] = {}  # one plan per block class and target set, found on its first block

    def process(i: int, block: nn.Module, xs: list[torch.Tensor], kwargs: dict) -> None:
        prefix = block_names[id(block)] + "."
        names = [n for n in linear_layers(block, ("*",), ()) if prefix + n in targets]
        if not names:
            return
        key = (type(block), tuple(names))
        if key not in plans:
            plans[key] = _plan(block, names, xs[0], kwargs)
        if plans[key]:
            _awq_block(block, plans[key], xs, kwargs, cfg)
        if cfg.quantize:  # every target, also one the calibration text never reached
            for n in names:
                replace_module(block, n, QuantLinear.from_linear(_linear(block, n), cfg.grid, prefix + n))
        log.info("awq: block %d done (%d layers)", i, len(names))

    # deviation: the reference fits every block to the float model's activations; run_blocks feeds block i
    # the outputs of blocks < i as processed (quantized when `quantize`), so later blocks see earlier errors
    run_blocks(model, calib, process)
    return model
