"""Layer-wise calibration: block by block, one input Hessian per group of linears that read the same tensor.

GPTQ, SparseGPT and Wanda all solve one linear layer at a time from statistics
of its inputs X on calibration data -- H = 2/N X X^T (Wanda only needs its
diagonal, the squared input norms). `solve_layerwise` collects them the way the
GPTQ reference code does and hands each group to the step's `solve(block,
names, H)`, which rewrites those layers in place:

- block by block (`effspec.calibrate.run_blocks`): block i sees the outputs of
  blocks 0..i-1 as already solved;
- inside a block, layers that read the same tensor (q/k/v, gate/up) share one
  H, found by tracing one sample (`_plan`);
- `true_sequential`: one pass per group, so o_proj sees the solved q/k/v and
  down_proj the solved gate/up. Once a block's attention or MLP has all its
  layers solved, its output is its last layer applied to that layer's captured
  inputs, so later passes replay it (`calibrate.Replay`) instead of
  recomputing it -- the same result (tested) for about one block forward
  fewer per group. Without it, one pass collects every H of the block.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from effspec.calibrate import Replay, block_forward, precision, rewind, run_blocks
from effspec.surgery import linear_layers, replace_module

log = logging.getLogger(__name__)


class _Hessian:
    """Running H = 2/N sum x x^T over every token a linear layer sees (the reference code's update), or only
    its diagonal (`diagonal`: a method that needs just the input norms, such as Wanda, skips the in x in
    products -- about 40% of a block's forward cost for smollm2's down_proj)."""

    def __init__(self, n: int, diagonal: bool = False):
        self.diagonal = diagonal
        self.H = torch.zeros(n) if diagonal else torch.zeros(n, n)
        self.tokens = 0

    def add(self, module, inputs, output) -> None:
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
        t = x.shape[0]
        with torch.autocast("cpu", enabled=False):  # float32 products even when the forward runs in bf16:
            self.H *= self.tokens / (self.tokens + t)  # a bf16-rounded x^T x need not stay positive definite
            self.tokens += t
            x = x * (2 / self.tokens) ** 0.5
            self.H += x.pow(2).sum(0) if self.diagonal else x.t() @ x


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



def solve_layerwise(model: nn.Module, calib: torch.Tensor, targets: dict[str, nn.Module],
                    solve: Callable[[nn.Module, list[str], torch.Tensor], None], true_sequential: bool = True,
                    dtype: str = "float32", label: str = "layerwise", diagonal: bool = False) -> nn.Module:
    """Run `solve(block, names, H)` on every group of `targets` (full names -> layers), block by block.

    `names` are block-relative; H (in, in) is 2/N X X^T over every calibration
    token the group's shared input carried -- only its diagonal (in,) when
    `diagonal`. Returns the model, changed in place.
    """
    block_names = {id(m): n for n, m in model.named_modules()}

    def process(i: int, block: nn.Module, xs: list[torch.Tensor], kwargs: dict) -> list[torch.Tensor] | None:
        prefix = block_names[id(block)] + "."
        names = [n for n in linear_layers(block, ("*",), (), sparse=True) if prefix + n in targets]
        if not names:
            return None
        plan = _plan(block, names, xs, kwargs)
        if not true_sequential:  # one pass collects every H; the outputs are recomputed after
            stats = [_Hessian(block.get_submodule(g[0]).in_features, diagonal) for g in plan.groups]
            hooks = [block.get_submodule(g[0]).register_forward_hook(h.add) for g, h in zip(plan.groups, stats)]
            try:
                _run_until(block, xs, kwargs, block.get_submodule(plan.groups[-1][-1]), dtype)
            finally:
                for h in hooks:
                    h.remove()
            for group, hess in zip(plan.groups, stats):
                solve(block, group, hess.H)
            return None
        # true sequential: one pass per group, ending at its last layer. A child whose last layer is
        # done is replayed from that layer's captured inputs, so later passes skip recomputing it.
        originals: dict[str, nn.Module] = {}
        done: set[str] = set()
        last_of = {last: child for child, (last, _) in plan.replayable.items()}
        try:
            for group in plan.groups:
                hess = _Hessian(block.get_submodule(group[0]).in_features, diagonal)
                captures = {n: _Capture() for n in group if n in last_of}
                hooks = [block.get_submodule(group[0]).register_forward_hook(hess.add)]
                hooks += [block.get_submodule(n).register_forward_hook(c.add) for n, c in captures.items()]
                try:
                    _run_until(block, xs, kwargs, block.get_submodule(group[-1]), dtype)
                finally:
                    for h in hooks:
                        h.remove()
                solve(block, group, hess.H)
                done.update(group)
                del hess
                for n, cap in captures.items():
                    child = last_of[n]
                    if any(g.startswith(child + ".") and g not in done for g in names):
                        continue  # a layer inside it is still to come: it must really run
                    layer = block.get_submodule(n)
                    with torch.inference_mode(), precision(dtype):
                        outs = [layer(x) for x in cap.xs]
                    originals[child] = block.get_submodule(child)
                    replace_module(block, child, Replay(outs, plan.replayable[child][1]))
            return _run_until(block, xs, kwargs, None, dtype)
        finally:
            for child, module in originals.items():
                replace_module(block, child, module)
            log.info("%s: block %d done (%d layers)", label, i, len(names))

    run_blocks(model, calib, process, dtype)
    return model
