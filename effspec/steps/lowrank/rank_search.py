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
tokens (smollm2-135m: 210 x 5 passes of 512 tokens).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from effspec.progress import track
from effspec.surgery import replace_module

Factorizer = Callable[[str, nn.Linear, float], nn.Module]  # (name, layer, ratio) -> its truncated stand-in


@torch.inference_mode()
def calibration_nll(model: nn.Module, rows: torch.Tensor) -> float:
    """Mean next-token NLL of `rows` (n, L)."""
    total, count = 0.0, 0
    for ids in rows:
        logits = model(ids[None], use_cache=False).logits[0, :-1].float()
        total += F.cross_entropy(logits, ids[1:], reduction="sum").item()
        count += ids.numel() - 1
    return total / count


def sensitivities(model: nn.Module, layers: dict[str, nn.Linear], rows: torch.Tensor, candidates: Sequence[float],
                  truncate: Factorizer) -> dict[str, dict[float, float]]:
    """{layer: {ratio: calibration NLL with only that layer truncated to that ratio}}."""
    out: dict[str, dict[float, float]] = {}
    for name, lin in track(layers.items(), "rank search", total=len(layers)):
        out[name] = {}
        for ratio in candidates:
            replace_module(model, name, truncate(name, lin, ratio))
            try:
                out[name][ratio] = calibration_nll(model, rows)
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
