"""Decode loops over any causal LM with a KV cache: greedy or sampled, stop strings, batches; timed.

Prefill the prompt once (filling the cache), then feed back one chosen token
per step. The two phases are timed apart because the speed protocol reports
them apart (BENCHMARKS.md: prefill tokens/s and decode tokens/s).

How the next token is chosen is a pure function of the last logits, kept apart
from the loop so speculative sampling (`effspec.speculative`) can filter the
target's and the draft's distributions with exactly the same code:
`probabilities` divides by the temperature, then keeps the top-k tokens, then
the nucleus (top-p: the smallest set of most likely tokens whose mass reaches
p; Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration"). That
is the order of transformers' logits warpers, so the same settings mean the same
distribution there and here. Temperature 0 is greedy: the argmax, no random
numbers drawn. Sampling draws from a `torch.Generator` seeded by the config, so
a seed reproduces a generation.

Engines: Llama-family models at batch 1 run on `effspec.decoder` (a static
cache, no per-token framework overhead); other causal LMs, batches, and any
caller-supplied transformers `Cache` (e.g. a compressed KV cache) run on
transformers' forward. Greedy on the lean engine without stop strings or a
callback keeps its own tight loop (`_greedy_lean`): it is what the decode-speed
measure times. Batches are left-padded, so every row's next token sits in the
same last column; the padding is masked out and positions count real tokens
only, so each row decodes exactly as it would alone (tested token for token).

Stop strings are matched on decoded text, not token ids, because one string can
be tokenized many ways. The text is cut before the stop string (the OpenAI API's
convention; transformers keeps it), while `tokens` keep everything generated up
to the token that completed it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

Decode = Callable[[list[int]], str]  # token ids -> text, e.g. lambda ids: tokenizer.decode(ids)


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen. The defaults are plain greedy decoding."""

    temperature: float = 0.0  # 0: argmax (greedy); else softmax(logits / temperature)
    top_k: int = 0  # keep only the k most likely tokens; 0 keeps all
    top_p: float = 1.0  # keep the smallest most-likely set whose mass reaches top_p; 1 keeps all
    seed: int | None = None  # seeds the sampling generator; None: torch's global generator
    stop: tuple[str, ...] = ()  # stop once the new text contains one of these (needs a `decode`)

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise ValueError(f"temperature={self.temperature!r}: expected a finite number >= 0 (0 is greedy)")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r}: expected an integer >= 0 (0 keeps every token)")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p={self.top_p!r}: expected a number in (0, 1] (1 keeps every token)")
        if isinstance(self.stop, str):
            raise ValueError(f"stop={self.stop!r}: expected a list of strings, not one string")
        for s in self.stop:
            if not (isinstance(s, str) and s):
                raise ValueError(f"stop={s!r}: expected non-empty strings")
        object.__setattr__(self, "stop", tuple(self.stop))  # a list from YAML or argparse becomes hashable

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self) -> torch.Generator | None:
        return None if self.seed is None else torch.Generator().manual_seed(self.seed)


GREEDY = SamplingConfig()


@dataclass
class Generation:
    tokens: torch.Tensor  # (new,) generated ids
    prefill_seconds: float
    decode_seconds: float  # for tokens[1:]: every token after the one the prefill produced
    cache_bytes: int
    text: str | None = None  # the new text, cut before a stop string (when the loop was given a `decode`)

    @property
    def decode_tokens_per_s(self) -> float:
        steps = self.tokens.numel() - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else float("nan")


def cache_bytes(cache) -> int:
    """Bytes of key/value state a cache holds: its own count if it keeps one (effspec's compressed caches:
    codes, scales and full-precision rows), else the key/value tensors of its layers."""
    held = getattr(cache, "held_bytes", None)
    if callable(held):
        return int(held())
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


# ---- choosing the next token (pure) --------------------------------------------------------------
def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """`logits` (..., vocab) with every entry below its row's k-th largest set to -inf; 0 keeps all."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))  # ties with the k-th are all kept


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """`logits` (..., vocab) keeping, per row, the smallest set of most likely tokens whose mass is >= p."""
    if p >= 1:
        return logits
    ordered, order = logits.sort(dim=-1, descending=True)
    probs = ordered.softmax(-1)
    before = probs.cumsum(-1) - probs  # mass of the more likely tokens; 0 for the first, which is always kept
    drop = torch.zeros_like(before, dtype=torch.bool).scatter(-1, order, before >= p)
    return logits.masked_fill(drop, float("-inf"))


def probabilities(logits: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """The distribution (..., vocab), float32, that `config` draws the next token from given `logits`."""
    logits = logits.float()
    if config.greedy:
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return top_p_filter(top_k_filter(logits / config.temperature, config.top_k), config.top_p).softmax(-1)


def next_tokens(logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of `logits` (batch, vocab): the argmax if greedy, else a draw from `probabilities`."""
    if config.greedy:
        return logits.argmax(-1)
    return torch.multinomial(probabilities(logits, config), 1, generator=generator)[:, 0]


# ---- stop strings --------------------------------------------------------------------------------
def stop_index(text: str, stop: Sequence[str]) -> int | None:
    """Where the earliest stop string starts in `text`; None if none occurs."""
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(found) if found else None


def first_stop(tokens: list[int], decode: Decode, stop: Sequence[str], start: int = 0) -> int | None:
    """The fewest tokens (more than `start`) whose text holds a stop string; None if even all of them don't."""
    if not stop:
        return None
    for n in range(start + 1, len(tokens) + 1):
        if stop_index(decode(tokens[:n]), stop) is not None:
            return n
    return None


def final_text(tokens: list[int], decode: Decode | None, stop: Sequence[str]) -> str | None:
    """The text of `tokens`, cut before the first stop string; None without a `decode`."""
    if decode is None:
        return None
    text = decode(tokens)
    cut = stop_index(text, stop)
    return text if cut is None else text[:cut]


class TextStream:
    """Text deltas to print as tokens arrive. Holds back what may still change or vanish: a trailing
    incomplete UTF-8 sequence (decoded as U+FFFD) and a tail that could begin a stop string; never
    passes a stop string. Everything shown is a prefix of `final_text` of the same tokens (given a decode
    whose text of fewer tokens is a prefix of its text of more, as tokenizers' decoders are)."""

    def __init__(self, decode: Decode, stop: Sequence[str] = ()):
        self.decode, self.stop = decode, tuple(stop)
        self.tokens: list[int] = []
        self.shown = 0  # characters already returned

    def push(self, token: int) -> str:
        self.tokens.append(token)
        text = self.decode(self.tokens)
        end = stop_index(text, self.stop)
        if end is None:
            end = len(text.rstrip("\ufffd"))
            end -= max((n for s in self.stop for n in range(1, len(s)) if text[:end].endswith(s[:n])), default=0)
        if end <= self.shown:
            return ""
        delta, self.shown = text[self.shown:end], end
        return delta

    def rest(self, text: str) -> str:
        """What is left to show of the final `text`."""
        return text[self.shown:]


# ---- engines: prefill and one step, (batch, vocab) logits each -----------------------------------
class _LeanEngine:
    """Batch 1 on effspec.decoder's static cache. With `chooses` (greedy) it returns the chosen token (1,) instead
    of logits: the decoder's screened argmax (`effspec.greedy_head`) never computes them."""

    def __init__(self, model: nn.Module, prompt: torch.Tensor, max_new_tokens: int, chooses: bool = False):
        from effspec.decoder import LeanDecoder

        self.lean, self.prompt = LeanDecoder(model, prompt.numel() + max_new_tokens), prompt
        self.chooses = chooses
        if chooses:
            self.lean.prepare_argmax()

    def _out(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.lean.feed(ids)
        return self.lean.argmax(h) if self.chooses else self.lean.logits(h)

    def prefill(self) -> torch.Tensor:
        return self._out(self.prompt)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._out(tokens)

    def held_bytes(self) -> int:
        return self.lean.cache.filled_bytes


class _TransformersEngine:
    """transformers' forward over `cache`, the prompts left-padded to one length."""

    chooses = False  # returns logits; the loop chooses

    def __init__(self, model: nn.Module, prompts: Sequence[torch.Tensor], cache):
        self.model, self.cache = model, cache
        width = max(p.numel() for p in prompts)
        self.ids = torch.zeros(len(prompts), width, dtype=torch.long)  # pad id 0: any id works, it is masked
        self.mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for i, p in enumerate(prompts):
            self.ids[i, width - p.numel():], self.mask[i, width - p.numel():] = p, 1
        self.padded = bool((self.mask == 0).any())  # no padding: no mask, the plain batch-1 call
        self.positions = (self.mask.cumsum(-1) - 1).clamp(min=0)  # real tokens count from 0 in every row

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        extra = {"attention_mask": self.mask, "position_ids": self.positions} if self.padded else {}
        return self.model(ids, past_key_values=self.cache, use_cache=True, **extra).logits[:, -1]

    def prefill(self) -> torch.Tensor:
        return self._forward(self.ids)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.padded:
            self.mask = torch.cat((self.mask, self.mask.new_ones(len(tokens), 1)), 1)
            self.positions = self.positions[:, -1:] + 1
        return self._forward(tokens[:, None])

    def held_bytes(self) -> int:
        return cache_bytes(self.cache)


def _decode(engine, rows: int, max_new_tokens: int, config: SamplingConfig, eos_token_id: int | None,
            decode: Decode | None, on_token: Callable[[int, int], None] | None) -> list[Generation]:
    """The loop: prefill, then choose a token per row and feed the batch back until every row is done."""
    generator = config.generator()
    out: list[list[int]] = [[] for _ in range(rows)]
    done = [False] * rows
    t0 = time.perf_counter()
    logits = engine.prefill()
    t1 = time.perf_counter()
    while True:
        chosen = logits if engine.chooses else next_tokens(logits, config, generator)
        for b, token in enumerate(chosen.tolist()):
            if done[b]:
                continue  # a finished row keeps the batch rectangular; what it is fed is never read
            out[b].append(token)
            if on_token is not None:
                on_token(b, token)
            done[b] = (token == eos_token_id or len(out[b]) == max_new_tokens
                       or (bool(config.stop) and stop_index(decode(out[b]), config.stop) is not None))
        if all(done):
            break
        logits = engine.step(chosen)
    t2 = time.perf_counter()
    held = engine.held_bytes()
    return [Generation(torch.tensor(o, dtype=torch.long), t1 - t0, t2 - t1, held, final_text(o, decode, config.stop))
            for o in out]


def _check(max_new_tokens: int, config: SamplingConfig, decode: Decode | None) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: expected at least 1")
    if config.stop and decode is None:
        raise ValueError(f"stop={config.stop!r}: stop strings need a `decode` (token ids -> text)")


def _transformers_cache(model: nn.Module, cache):
    from transformers import DynamicCache

    return DynamicCache(config=model.config) if cache is None else cache


@torch.inference_mode()
def generate(model: nn.Module, prompt: torch.Tensor, max_new_tokens: int, config: SamplingConfig = GREEDY, *,
             eos_token_id: int | None = None, decode: Decode | None = None, cache=None,
             on_token: Callable[[int], None] | None = None, engine: str = "auto") -> Generation:
    """Up to `max_new_tokens` after `prompt` (1-D ids), chosen as `config` says; stops at `eos_token_id` (kept)
    or a stop string of `config` (text cut before it; needs `decode`).

    `cache`: an empty transformers `Cache` to decode with (forces the transformers engine); its `held_bytes()`,
    if it has one, is the reported `cache_bytes`. `on_token(id)` is called with each token as it is chosen.
    `engine`: "auto" (effspec.decoder where supported), "lean" or "transformers".
    """
    from effspec import decoder

    _check(max_new_tokens, config, decode)
    if engine not in ("auto", "lean", "transformers"):
        raise ValueError(f"engine={engine!r}: expected auto, lean or transformers")
    if engine == "lean" and cache is not None:
        raise ValueError("engine='lean' runs its own static cache; a `cache` needs engine auto or transformers")
    if cache is None and (engine == "lean" or (engine == "auto" and decoder.supported(model))):
        if config.greedy and not config.stop and on_token is None:
            gen = _greedy_lean(decoder.LeanDecoder(model, prompt.numel() + max_new_tokens), prompt, max_new_tokens,
                               eos_token_id)
            if decode is not None:
                gen.text = decode(gen.tokens.tolist())
            return gen
        runner = _LeanEngine(model, prompt, max_new_tokens, chooses=config.greedy)
    else:
        runner = _TransformersEngine(model, [prompt], _transformers_cache(model, cache))
    callback = None if on_token is None else lambda _row, token: on_token(token)
    return _decode(runner, 1, max_new_tokens, config, eos_token_id, decode, callback)[0]


@torch.inference_mode()
def generate_batch(model: nn.Module, prompts: Sequence[torch.Tensor], max_new_tokens: int,
                   config: SamplingConfig = GREEDY, *, eos_token_id: int | None = None, decode: Decode | None = None,
                   cache=None) -> list[Generation]:
    """`generate` for several prompts (1-D ids each, any lengths) in one left-padded batch on transformers'
    forward. Each row stops on its own; the timings and `cache_bytes` are the whole batch's."""
    _check(max_new_tokens, config, decode)
    if not prompts:
        return []
    if cache is not None and hasattr(cache, "held_bytes") and len({p.numel() for p in prompts}) > 1:
        # a cache that evicts keeps sink/heavy tokens the padding mask cannot follow; equal lengths need no mask
        raise ValueError("a compressed KV cache takes a batch of equal-length prompts (no padding)")
    runner = _TransformersEngine(model, prompts, _transformers_cache(model, cache))
    return _decode(runner, len(prompts), max_new_tokens, config, eos_token_id, decode, None)


def greedy(model: nn.Module, prompt: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None,
           engine: str = "auto") -> Generation:
    """Generate up to `max_new_tokens` greedily after `prompt` (1-D ids); stops at `eos_token_id`.

    `engine`: "auto" (effspec.decoder where supported), "lean" or "transformers".
    """
    return generate(model, prompt, max_new_tokens, GREEDY, eos_token_id=eos_token_id, engine=engine)


def _greedy_lean(lean, prompt: torch.Tensor, max_new_tokens: int, eos_token_id: int | None) -> Generation:
    lean.prepare_argmax()
    t0 = time.perf_counter()
    out = [lean.next_token(prompt)]
    t1 = time.perf_counter()
    step = torch.empty(1, dtype=prompt.dtype)
    for _ in range(max_new_tokens - 1):
        if eos_token_id is not None and out[-1] == eos_token_id:
            break
        step[0] = out[-1]
        out.append(lean.next_token(step))
    t2 = time.perf_counter()
    return Generation(torch.tensor(out), t1 - t0, t2 - t1, lean.cache.filled_bytes)
