"""Long-context perplexity through a KV cache: a cache's quality loss as a number.

One long text is scored left to right in chunks of `chunk` tokens; each chunk
attends to the cache the earlier chunks left behind (compressed or not) and to
itself, and predicts its next tokens. With an uncompressed cache this is the
model's own perplexity over the whole context (up to float rounding between
chunkings); with a compressed one, every prediction after the first chunk pays
for what the cache dropped or rounded. The per-token NLL is kept, so the loss
can be read by position (`by_position`): the StreamingLLM plot of perplexity
against position past the trained context.

Memory is the cache's *held* bytes after each chunk (`effspec.generate.cache_bytes`:
`held_bytes()` of effspec's caches, the key/value tensors of transformers' own), the peak of which is what
a long generation needs on top of the model.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from effspec.errors import UserError
from effspec.generate import cache_bytes
from effspec.progress import track


@dataclass
class LongContext:
    perplexity: float
    tokens: int  # predicted tokens
    chunk: int
    peak_cache_bytes: int
    final_cache_bytes: int
    seconds: float
    nll: torch.Tensor  # (tokens,) float64 NLL of each predicted token, in text order

    def by_position(self, bin_tokens: int) -> list[tuple[int, float]]:
        """(first predicted position of the bin, perplexity of the bin) for consecutive bins of `bin_tokens`."""
        return [(start + 1, math.exp(self.nll[start:start + bin_tokens].mean().item()))
                for start in range(0, self.tokens, bin_tokens)]

    def summary(self) -> dict:
        return {"perplexity": self.perplexity, "tokens": self.tokens, "chunk": self.chunk,
                "peak_cache_bytes": self.peak_cache_bytes, "final_cache_bytes": self.final_cache_bytes,
                "seconds": self.seconds}


@torch.inference_mode()
def long_context_perplexity(model: nn.Module, ids: torch.Tensor, cache_factory: Callable[[], object] | None = None,
                            chunk: int = 256, on_chunk: Callable[[int, int], None] | None = None) -> LongContext:
    """Perplexity of `model` on the 1-D token ids `ids` scored in chunks through one cache from `cache_factory`.

    `on_chunk(tokens_seen, held_bytes)` is called after every chunk (a memory-over-time trace).
    """
    from transformers import DynamicCache

    if ids.dim() != 1 or ids.numel() < 2:
        raise UserError(f"long-context perplexity needs one text of at least 2 tokens, got shape {tuple(ids.shape)}")
    if chunk < 1:
        raise UserError(f"chunk must be at least 1 token, got {chunk}")
    cache = cache_factory() if cache_factory is not None else DynamicCache(config=model.config)
    nll, peak = [], 0
    t0 = time.perf_counter()
    starts = range(0, ids.numel() - 1, chunk)
    for start in track(starts, "long-context perplexity", total=len(starts)):
        x = ids[start:start + chunk]
        targets = ids[start + 1:start + chunk + 1]
        logits = model(x[None], past_key_values=cache, use_cache=True).logits[0, : targets.numel()].float()
        nll.append(F.cross_entropy(logits, targets, reduction="none").double())
        held = cache_bytes(cache)
        peak = max(peak, held)
        if on_chunk is not None:
            on_chunk(start + x.numel(), held)
    nll = torch.cat(nll)
    mean = nll.mean().item()
    if not math.isfinite(mean):
        raise UserError("long-context perplexity is not finite: the model produces NaN or inf logits")
    return LongContext(math.exp(mean), nll.numel(), chunk, peak, cache_bytes(cache), time.perf_counter() - t0, nll)
