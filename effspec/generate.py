"""A small greedy decode loop over any causal LM with a KV cache, timed prefill and decode apart.

Greedy decoding: prefill the prompt once (filling the cache), then feed back the
argmax token one step at a time. Separating the two phases is what the speed
protocol measures (BENCHMARKS.md: prefill tokens/s and decode tokens/s).

Llama-family models run on `effspec.decoder` (a static cache, no per-token
framework overhead); other causal LMs on transformers' own forward with a
`DynamicCache`. `engine="transformers"` forces the latter.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Generation:
    tokens: torch.Tensor  # (new,) generated ids
    prefill_seconds: float
    decode_seconds: float  # for tokens[1:]: every token after the one the prefill produced
    cache_bytes: int

    @property
    def decode_tokens_per_s(self) -> float:
        steps = self.tokens.numel() - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else float("nan")


def cache_bytes(cache) -> int:
    """Bytes of key/value tensors the cache holds."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


@torch.inference_mode()
def greedy(model: nn.Module, prompt: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None,
           engine: str = "auto") -> Generation:
    """Generate up to `max_new_tokens` greedily after `prompt` (1-D ids); stops at `eos_token_id`.

    `engine`: "auto" (effspec.decoder where supported), "lean" or "transformers".
    """
    from effspec import decoder

    if engine not in ("auto", "lean", "transformers"):
        raise ValueError(f"engine={engine!r}: expected auto, lean or transformers")
    if engine == "lean" or (engine == "auto" and decoder.supported(model)):
        return _greedy_lean(decoder.LeanDecoder(model, prompt.numel() + max_new_tokens), prompt, max_new_tokens,
                            eos_token_id)
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    ids = prompt[None]
    t0 = time.perf_counter()
    logits = model(ids, past_key_values=cache, use_cache=True).logits[:, -1]
    t1 = time.perf_counter()
    out = [int(logits.argmax(-1))]
    for _ in range(max_new_tokens - 1):
        if eos_token_id is not None and out[-1] == eos_token_id:
            break
        logits = model(torch.tensor([[out[-1]]]), past_key_values=cache, use_cache=True).logits[:, -1]
        out.append(int(logits.argmax(-1)))
    t2 = time.perf_counter()
    return Generation(torch.tensor(out), t1 - t0, t2 - t1, cache_bytes(cache))


def _greedy_lean(lean, prompt: torch.Tensor, max_new_tokens: int, eos_token_id: int | None) -> Generation:
    t0 = time.perf_counter()
    logits = lean.forward(prompt)
    t1 = time.perf_counter()
    out = [int(logits[-1].argmax())]
    step = torch.empty(1, dtype=prompt.dtype)
    for _ in range(max_new_tokens - 1):
        if eos_token_id is not None and out[-1] == eos_token_id:
            break
        step[0] = out[-1]
        out.append(int(lean.forward(step)[-1].argmax()))
    t2 = time.perf_counter()
    return Generation(torch.tensor(out), t1 - t0, t2 - t1, lean.cache.filled_bytes)
