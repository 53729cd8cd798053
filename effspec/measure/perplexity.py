"""Token perplexity over non-overlapping windows, the BENCHMARKS.md quality protocol.

PPL = exp(mean next-token negative log-likelihood over every predicted token):
each window of L tokens predicts its L-1 last tokens from the ones before,
batch 1, float32 logits, NLL summed in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from effspec.errors import UserError
from effspec.progress import track


@dataclass
class Perplexity:
    perplexity: float
    nll: float  # mean NLL per predicted token (nats)
    eval_tokens: int  # predicted tokens
    eval_windows: int
    eval_seqlen: int


@torch.inference_mode()
def perplexity(model: nn.Module, windows: torch.Tensor) -> Perplexity:
    """Perplexity of `model` on `windows` (n, L) of token ids."""
    total, count = 0.0, 0
    for window in track(windows, "perplexity", total=len(windows)):
        logits = model(window[None], use_cache=False).logits[0, :-1].float()
        total += F.cross_entropy(logits, window[1:], reduction="sum").double().item()
        count += window.numel() - 1
    nll = total / count
    if not math.isfinite(nll):
        raise UserError("perplexity is not finite: the model produces NaN or inf logits")
    return Perplexity(math.exp(nll), nll, count, windows.shape[0], windows.shape[1])
