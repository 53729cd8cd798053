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

`apply` runs calibration block by block (`effspec.calibrate`): inside each block
the layers that read the same input (q/k/v, gate/up) are quantized together from
one shared H and the next ones see the already-quantized outputs ("true
sequential"). Once a block's attention or MLP has all its layers quantized, its
output is its last layer applied to inputs captured in that layer's pass, so
later passes replay it (`calibrate.Replay`) instead of recomputing it -- the
same result (tested) for about one block forward fewer per group.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from effspec.calibrate import CALIBRATION_DTYPES, Replay, block_forward, precision, rewind, run_blocks
from effspec.config import expect
from effspec.layers import QuantLinear
from effspec.quant import SUPPORTED_BITS, Grid, grid_params
from effspec.registry import register
from effspec.surgery import linear_layers, replace_module

log = logging.getLogger(__name__)


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
    # GPU): ~3x faster matmuls on CPUs with AVX512-BF16, but emulated and slower without it (as here:
    # AVX2 only). H is accumulated in float32 either way.
    calibration_dtype: str = "float32"
    targets: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = ("lm_head",)

    def __post_init__(self):
        expect(self.bits in SUPPORTED_BITS, "bits", self.bits, f"one of {SUPPORTED_BITS}")
        expect(self.group_size >= 0, "group_size", self.group_size, "0 (per-channel) or a positive divisor of the input width")
        expect(0 < self.dampening < 1, "dampening", self.dampening, "a fraction in (0, 1)")
        expect(self.block_size >= 1, "block_size", self.block_size, "a positive number of columns")
        expect(self.calibration_dtype in CALIBRATION_DTYPES, "calibration_dtype", self.calibration_dtype,
               f"one of {CALIBRATION_DTYPES}")

    @property
    def grid(self) -> Grid:
        return Grid(self.bits, self.group_size, self.symmetric)


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, grid: Grid, group: int, cfg: GPTQConfig):
    """GPTQ codes for W (out, in) given H (in, in); returns (q uint8 (out, in), scale, minimum (out, in/group))."""
    W = W.float().clone()
    H = H.float().clone()
    out, n = W.shape
    dead = torch.diag(H) == 0  # inputs never active: any value works, zero them
    H[dead, dead] = 1
    W[:, dead] = 0
    scale, minimum = grid_params(W, grid, group)  # static groups: from the original weights
    perm = torch.argsort(torch.diag(H), descending=True) if cfg.act_order else torch.arange(n)
    W, H = W[:, perm], H[perm][:, perm]
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
            Q[:, i1 + i] = q
            err = (w - (q * scale[:, g] + minimum[:, g])) / d
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    q = torch.empty_like(Q)
    q[:, perm] = Q
    return q.to(torch.uint8), scale, minimum


class _Hessian:
    """Running H = 2/N sum x x^T over every token a linear layer sees (the reference code's update)."""

    def __init__(self, n: int):
        self.H = torch.zeros(n, n)
        self.tokens = 0

    def add(self, module, inputs, output) -> None:
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
        t = x.shape[0]
        self.H *= self.tokens / (self.tokens + t)
        self.tokens += t
        x = x * (2 / self.tokens) ** 0.5
        self.H += x.t() @ x


class _Stop(Exception):
    """Ends a block's forward pass once the layers being calibrated have seen their inputs."""


def _raise_stop(*_):
    raise _Stop


def _run_until(block: nn.Module, xs: list[torch.Tensor], kwargs: dict, last: nn.Module | None,
               dtype: str = "float32") -> list[torch.Tensor]:
    """Run every calibration input through `block`, stopping after `last` runs (None: the whole block).

    Returns the block's outputs when it ran to the end.
    """
    stop = last.register_forward_hook(_raise_stop) if last is not None else None
    outs = []
    rewind(block)
    try:
        with torch.inference_mode(), precision(dtype):
            for x in xs:
                try:
                    outs.append(block_forward(block, x, kwargs))
                except _Stop:
                    pass
    finally:
        if stop is not None:
            stop.remove()
    return outs


@dataclass
class _Plan:
    """How a block runs: its target layers grouped by shared input, and which children can be replayed."""

    groups: list[list[str]]  # in execution order; layers of a group read the same tensor (q/k/v, gate/up)
    replayable: dict[str, tuple[str, tuple | None]]  # child -> (its last layer, rest of its output tuple)


def _plan(block: nn.Module, names: list[str], xs: list[torch.Tensor], kwargs: dict) -> _Plan:
    """Trace one sample through the block to find input-sharing groups and replayable children.

    A direct child of the block (attention, MLP) is replayable when its output is
    exactly the output tensor of its last target layer and anything else it
    returns is None: once that layer is quantized, the child's output is that
    layer applied to its captured inputs.
    """
    order: list[tuple[str, torch.Tensor, torch.Tensor]] = []  # holding tensors keeps their ids from being reused
    child_out: dict[str, object] = {}
    hooks = [block.get_submodule(n).register_forward_hook(
        lambda m, i, o, n=n: order.append((n, i[0], o))) for n in names]
    hooks += [child.register_forward_hook(lambda m, i, o, c=c: child_out.setdefault(c, o))
              for c, child in block.named_children()]
    try:
        _run_until(block, xs[:1], kwargs, None)
    finally:
        for h in hooks:
            h.remove()
    groups: list[list[str]] = []
    seen_inputs: dict[int, int] = {}
    for name, x, _ in order:
        if any(name in g for g in groups):
            continue
        if id(x) in seen_inputs:
            groups[seen_inputs[id(x)]].append(name)
        else:
            seen_inputs[id(x)] = len(groups)
            groups.append([name])
    replayable = {}
    for child, out in child_out.items():
        inside = [(n, o) for n, _, o in order if n.startswith(child + ".")]
        if not inside:
            continue
        last, last_out = inside[-1]
        first = out[0] if isinstance(out, tuple) else out
        rest = tuple(out[1:]) if isinstance(out, tuple) else None
        if first is last_out and all(r is None for r in rest or ()):
            replayable[child] = (last, rest)
    return _Plan(groups, replayable)


class _Capture:
    """Keeps the inputs a layer sees during one pass."""

    def __init__(self):
        self.xs: list[torch.Tensor] = []

    def add(self, module, inputs, output) -> None:
        self.xs.append(inputs[0].detach())


@register("gptq", family="quantize", stage="inference", config=GPTQConfig, calibration=True)
def apply(model: nn.Module, cfg: GPTQConfig, calib=None) -> nn.Module:
    targets = linear_layers(model, cfg.targets, cfg.ignore)
    for name, lin in targets.items():  # check every shape before any work
        cfg.grid.group_for(lin.in_features, name)
    if calib is None:
        raise ValueError("gptq needs calibration data")
    block_names = {id(m): n for n, m in model.named_modules()}

    def quantize_group(block: nn.Module, group: list[str], H: torch.Tensor) -> None:
        for n in group:
            lin = block.get_submodule(n)
            q, scale, minimum = gptq_quantize(lin.weight.detach(), H, cfg.grid,
                                              cfg.grid.group_for(lin.in_features, n), cfg)
            replace_module(block, n, QuantLinear.from_codes(q, scale, minimum, cfg.grid, lin.bias))

    def process(i: int, block: nn.Module, xs: list[torch.Tensor], kwargs: dict) -> list[torch.Tensor] | None:
        prefix = block_names[id(block)] + "."
        names = [n for n in linear_layers(block, ("*",), ()) if prefix + n in targets]
        plan = _plan(block, names, xs, kwargs)
        if not cfg.true_sequential:  # one pass collects every H; the outputs are recomputed after
            stats = [_Hessian(block.get_submodule(g[0]).in_features) for g in plan.groups]
            hooks = [block.get_submodule(g[0]).register_forward_hook(h.add) for g, h in zip(plan.groups, stats)]
            try:
                _run_until(block, xs, kwargs, block.get_submodule(plan.groups[-1][-1]), cfg.calibration_dtype)
            finally:
                for h in hooks:
                    h.remove()
            for group, hess in zip(plan.groups, stats):
                quantize_group(block, group, hess.H)
            return None
        # true sequential: one pass per group, ending at its last layer. A child whose last layer is
        # done is replayed from that layer's captured inputs, so later passes skip recomputing it.
        originals: dict[str, nn.Module] = {}
        done: set[str] = set()
        last_of = {last: child for child, (last, _) in plan.replayable.items()}
        try:
            for group in plan.groups:
                hess = _Hessian(block.get_submodule(group[0]).in_features)
                captures = {n: _Capture() for n in group if n in last_of}
                hooks = [block.get_submodule(group[0]).register_forward_hook(hess.add)]
                hooks += [block.get_submodule(n).register_forward_hook(c.add) for n, c in captures.items()]
                try:
                    _run_until(block, xs, kwargs, block.get_submodule(group[-1]), cfg.calibration_dtype)
                finally:
                    for h in hooks:
                        h.remove()
                quantize_group(block, group, hess.H)
                done.update(group)
                del hess
                for n, cap in captures.items():
                    child = last_of[n]
                    if any(g.startswith(child + ".") and g not in done for g in names):
                        continue  # a layer inside it is still to come: it must really run
                    layer = block.get_submodule(n)
                    with torch.inference_mode(), precision(cfg.calibration_dtype):
                        outs = [layer(x) for x in cap.xs]
                    originals[child] = block.get_submodule(child)
                    replace_module(block, child, Replay(outs, plan.replayable[child][1]))
            return _run_until(block, xs, kwargs, None, cfg.calibration_dtype)
        finally:
            for child, module in originals.items():
                replace_module(block, child, module)
            log.info("gptq: block %d quantized (%d layers)", i, len(names))

    run_blocks(model, calib, process, cfg.calibration_dtype)
    return model
