"""Token perplexity over non-overlapping windows, the BENCHMARKS.md quality protocol.

PPL = exp(mean next-token negative log-likelihood over every predicted token):
each window of L tokens predicts its L-1 last tokens from the ones before,
batch 1, float32 logits, NLL summed in float64.

The same total NLL normalized by the text rather than by tokens gives figures
that compare across tokenizers, as lm-eval's `wikitext` task reports them:
bits per byte = NLL / ln 2 / bytes, word perplexity = exp(NLL / words), over the
text of the predicted tokens.
# deviation: lm-eval scores whole WikiText articles with rolling windows (every
# token predicted, the first from an end-of-text token); here the normalizers
# are counted over the same non-overlapping windows the token perplexity uses.

Observers, called as `observer(i, window, logits)` for each window, let other
measures (KL divergence to the original) reuse this one forward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

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


@dataclass
class TextNorm:
    """Bytes and words of the text of the predicted tokens: the normalizers of bits/byte and word perplexity."""

    bytes: int
    words: int

    @classmethod
    def of(cls, tokenizer, windows: torch.Tensor) -> "TextNorm":
        texts = [tokenizer.decode(w[1:]) for w in windows]
        return cls(sum(len(t.encode("utf-8")) for t in texts), sum(len(t.split()) for t in texts))

    def figures(self, p: "Perplexity") -> dict:
        total = p.nll * p.eval_tokens
        return {"bits_per_byte": total / math.log(2) / self.bytes, "byte_perplexity": math.exp(total / self.bytes),
                "word_perplexity": math.exp(total / self.words)}


Observer = Callable[[int, torch.Tensor, torch.Tensor], None]


@torch.inference_mode()
def perplexity(model: nn.Module, windows: torch.Tensor, observers: Sequence[Observer] = ()) -> Perplexity:
    """Perplexity of `model` on `windows` (n, L) of token ids; observers see each window's (L-1, V) logits."""
    total, count = 0.0, 0
    for i, window in enumerate(track(windows, "perplexity", total=len(windows))):
        logits = model(window[None], use_cache=False).logits[0, :-1].float()
        total += F.cross_entropy(logits, window[1:], reduction="sum").double().item()
        count += window.numel() - 1
        for observe in observers:
            observe(i, window, logits)
    nll = total / count
    if not math.isfinite(nll):
        raise UserError("perplexity is not finite: the model produces NaN or inf logits")
    return Perplexity(math.exp(nll), nll, count, windows.shape[0], windows.shape[1])
