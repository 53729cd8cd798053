"""Decode and prefill speed and peak memory, the BENCHMARKS.md speed protocol.

Decode: batch 1, a `prompt_tokens` prompt, `new_tokens` greedy tokens; prefill and
decode timed apart; one warm-up run, then the median of `runs`. Prefill: one
window of `prefill_tokens` tokens, tokens/s, median of `runs`. Peak memory is
the process's peak resident set during the measured runs. Decode runs on
`effspec.generate.greedy` (effspec's lean decoder for Llama-family models,
transformers' forward otherwise) and the packed layers' decode kernels; prefill
on transformers' forward, the path perplexity is measured on.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from effspec.generate import greedy
from effspec.measure.memory import peak_rss_bytes, reset_peak
from effspec.progress import track


@dataclass
class Speed:
    decode_tokens_per_s: float
    prefill_tokens_per_s: float  # one window of `prefill_tokens`
    prompt_tokens: int
    new_tokens: int
    prefill_tokens: int
    runs: int
    threads: int
    peak_rss_bytes: int


@torch.inference_mode()
def speed(model: nn.Module, ids: torch.Tensor, prompt_tokens: int = 128, new_tokens: int = 128,
          prefill_tokens: int = 2048, runs: int = 5) -> Speed:
    """Time decode after a prompt taken from `ids`, and prefill of a window from `ids` (1-D)."""
    limit = getattr(model.config, "max_position_embeddings", None) or 10**9
    prompt_tokens = min(prompt_tokens, ids.numel() - 1, limit - new_tokens)
    prefill_tokens = min(prefill_tokens, ids.numel(), limit)
    prompt = ids[:prompt_tokens]
    window = ids[:prefill_tokens][None]
    reset_peak()
    greedy(model, prompt, new_tokens)  # warm-up: allocator, kernels' packed forms, caches
    decode = []
    for _ in track(range(runs), "decode speed"):
        decode.append(greedy(model, prompt, new_tokens).decode_tokens_per_s)
    model(window[:, :16], use_cache=False)  # warm-up
    prefill = []
    for _ in track(range(runs), "prefill speed"):
        t0 = time.perf_counter()
        model(window, use_cache=False, logits_to_keep=1)
        prefill.append(prefill_tokens / (time.perf_counter() - t0))
    return Speed(statistics.median(decode), statistics.median(prefill), prompt_tokens, new_tokens,
                 prefill_tokens, runs, torch.get_num_threads(), peak_rss_bytes())
