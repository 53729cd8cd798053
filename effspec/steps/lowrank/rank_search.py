"""ASVD's sensitivity-based truncation rank search (STRS; Yuan et al. 2023, Sec. 3.3).

A uniform parameter ratio truncates every layer alike, though some layers lose
far more quality than others when truncated. STRS measures each layer's
sensitivity directly: for every target layer and every candidate ratio, the
layer alone is replaced by its (activation-aware) truncation and the model's
calibration loss is measured; everything else stays dense. Then a threshold tau
on that loss is searched by bisection over the sorted measurements: each layer
takes the smallest candidate ratio whose loss stays at or below tau (or stays
dense, ratio 1, when none does), and tau is the smallest value whose choice
fits the parameter budget -- the target ratio times the target layers'
parameters. The paper measures perplexity on its calibration set; here the
mean next-token NLL of a few calibration rows (its logarithm: the same order).

Cost: layers x candidates forward passes over `search_rows x search_tokens`
tokens (smollm2-135m: 210 x 5 passes of 512 tokens). A layer changes nothing
before its own block, so each pass starts at that block from its cached dense
inputs (`SuffixLoss`): on average half a forward.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from effspec.calibrate import block0_inputs
from effspec.progress import track
from effspec.surgery import decoder_blocks, replace_module

Factorizer = Callable[[str, nn.Linear, float], nn.Module]  # (name, layer, ratio) -> its truncated stand-in


class _PassThrough(nn.Module):
    """Stands in for a skipped block: returns its input hidden states, shaped as the block's own output."""

    def __init__(self, as_tuple: bool):
        super().__init__()
        self.as_tuple = as_tuple

    def forward(self, hidden_states, *args, **kwargs):
        return (hidden_states,) if self.as_tuple else hidden_states


class SuffixLoss:
    """`loss(b)`: the calibration NLL computed from block b on, with block b's inputs those of the dense model.

    Exact when nothing before block b differs from the model this was built on: the blocks
    before b are swapped for pass-throughs and block b's input replaced by the cached one.
    """

    def __init__(self, model: nn.Module, rows: torch.Tensor):
        self.model, self.rows = model, rows
        self.blocks = decoder_blocks(model)
        xs, kwargs = block0_inputs(model, rows)
        self.inputs: list[list[torch.Tensor]] = []
        self.as_tuple = False
        with torch.inference_mode():
            for block in self.blocks:
                self.inputs.append(xs)
                outs = [block(x, **kwargs) for x in xs]
                self.as_tuple = isinstance(outs[0], tuple)
                xs = [o[0] if isinstance(o, tuple) else o for o in outs]

    def __call__(self, b: int) -> float:
        row = [0]

        def swap_in(module, args, kwargs):
            cached = self.inputs[b][row[0]]
            if args:
                return (cached, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": cached}

        skipped = [self.blocks[i] for i in range(b)]
        for i in range(b):
            self.blocks[i] = _PassThrough(self.as_tuple)
        handle = self.blocks[b].register_forward_pre_hook(swap_in, with_kwargs=True)
        total, count = 0.0, 0
        try:
            with torch.inference_mode():
                for row[0], ids in enumerate(self.rows):
                    logits = self.model(ids[None], use_cache=False).logits[0, :-1].float()
                    total += F.cross_entropy(logits, ids[1:], reduction="sum").item()
                    count += ids.numel() - 1
        finally:
            handle.remove()
            for i, block in enumerate(skipped):
                self.blocks[i] = block
        return total / count


def _block_index(model: nn.Module, names: Sequence[str]) -> dict[str, int]:
    """Index of the decoder block holding each named layer (0 for a layer outside every block: a whole forward)."""
    where = {id(m): i for i, block in enumerate(decoder_blocks(model)) for m in block.modules()}
    return {n: where.get(id(model.get_submodule(n)), 0) for n in names}


def sensitivities(model: nn.Module, layers: dict[str, nn.Linear], rows: torch.Tensor, candidates: Sequence[float],
                  truncate: Factorizer) -> dict[str, dict[float, float]]:
    """{layer: {ratio: calibration NLL with only that layer truncated to that ratio}}."""
    loss = SuffixLoss(model, rows)
    block_of = _block_index(model, list(layers))
    out: dict[str, dict[float, float]] = {}
    for name, lin in track(layers.items(), "rank search", total=len(layers)):
        out[name] = {}
        for ratio in candidates:
            replace_module(model, name, truncate(name, lin, ratio))
            try:
                out[name][ratio] = loss(block_of[name])
            finally:
                replace_module(model, name, lin)
    return out


def choose_ratios(sens: dict[str, dict[float, float]], params: dict[str, Callable[[float], int]],
                  budget: int) -> dict[str, float]:
    """Per layer the smallest candidate ratio with NLL <= tau (1.0: stays dense), for the smallest tau whose
    choice costs at most `budget` parameters; `params[layer](ratio)` is what the layer costs at a ratio."""

    def pick(tau: float) -> dict[str, float]:
        return {n: min((r for r, nll in by.items() if nll <= tau), default=1.0) for n, by in sens.items()}

    def cost(choice: dict[str, float]) -> int:
        return sum(params[n](r) for n, r in choice.items())

    taus = sorted({nll for by in sens.values() for nll in by.values()})
    lo, hi = 0, len(taus) - 1
    if cost(pick(taus[hi])) > budget:
        return pick(taus[hi])  # the most any threshold can remove: every layer at its smallest candidate
    while lo < hi:
        mid = (lo + hi) // 2
        if cost(pick(taus[mid])) <= budget:
            hi = mid
        else:
            lo = mid + 1
    return pick(taus[lo])
