"""Exact speculative greedy decoding (Leviathan et al. 2023; Chen et al. 2023) over `effspec.decoder`.

A cheap *draft* proposes k tokens; the target model scores the last accepted
token plus all k proposals in one forward pass (k + 1 rows, about the cost of
one decode step when decode is bandwidth-bound); the proposals are kept up to
the first one that differs from the target's own argmax, and the target's
token at that position is appended too. Every kept token is the target's
greedy choice given the tokens before it, so the output is the plain greedy
output (up to float rounding differences between the one-row and k-row paths,
which only matter at exact logit ties), and each verify step yields between 1
and k + 1 tokens.

Drafts (each `propose(tokens, k) -> list[int]`):

- `PromptLookup` (prompt-lookup decoding, Saxena 2023): the tokens that
  followed the most recent earlier occurrence of the text's last n-gram. Free,
  and strong when the output copies its input (summaries, extraction, edits).
- `DraftDecoder`: greedy tokens of a smaller model with the same tokenizer, or
  of the target's own first blocks plus its head (self-speculation, as in
  LayerSkip / Draft & Verify), or of a `drop-layers`-pruned copy; it keeps its
  own KV cache and rolls it back to the accepted prefix.

Verify steps of up to 8 tokens run on the decoder's compiled path (float
linears through `linear_rows`: BLAS's few-row GEMM is 2-3x slower than its
one-row GEMV on this CPU, which made every verify cost ~3 decode steps).
Measured on smollm2-135m float32, 1 thread, a ~800-token "rewrite this WikiText
passage" prompt, 128 new tokens (machine shared with a benchmark): plain 10.5
tok/s; prompt lookup 13.5 tok/s (1.28x, 42% of proposals accepted, output
identical); the model's own first 4 or 8 of 30 blocks accept ~4% and are slower
than no speculation (0.56x, 0.63x).

The draft length adapts to the running acceptance (`adaptive`): +1 after a
fully accepted round, -1 after a rejection, within [1, k_max] -- the
heuristic schedule transformers' assisted generation also uses.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from effspec.decoder import LeanDecoder
from effspec.generate import Generation


class PromptLookup:
    """Propose the continuation of the latest earlier match of the last `max_ngram`..`min_ngram` tokens."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, tokens: list[int], k: int) -> list[int]:
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            if len(tokens) <= n:
                continue
            tail = tokens[-n:]
            for start in range(len(tokens) - n - 1, -1, -1):  # latest match first, never the tail itself
                if tokens[start:start + n] == tail:
                    follow = tokens[start + n:start + n + k]
                    if follow:
                        return follow
        return []


class DraftDecoder:
    """Greedy proposals of a (smaller or truncated) model over its own KV cache."""

    def __init__(self, model: nn.Module, max_len: int, n_blocks: int | None = None):
        self.lean = LeanDecoder(model, max_len, n_blocks)
        self.fed: list[int] = []  # the tokens whose keys and values the draft cache holds

    @classmethod
    def self_draft(cls, model: nn.Module, max_len: int, n_blocks: int) -> "DraftDecoder":
        """The target's first `n_blocks` blocks, its final norm and its head: no second model."""
        return cls(model, max_len, n_blocks)

    def propose(self, tokens: list[int], k: int) -> list[int]:
        common = 0
        for a, b in zip(self.fed, tokens):
            if a != b:
                break
            common += 1
        common = min(common, len(tokens) - 1)  # the last token is always fed, for its logits
        self.lean.cache.length, self.fed = common, self.fed[:common]
        room = self.lean.cache.k.shape[2] - len(tokens)
        k = min(k, room)
        if k <= 0:
            return []
        new = tokens[common:]
        logits = self.lean.forward(torch.tensor(new), last_only=True)  # several tokens at once after a prefix
        self.fed += new
        out = [int(logits[-1].argmax())]
        while len(out) < k:
            logits = self.lean.forward(torch.tensor(out[-1:]))
            self.fed.append(out[-1])
            out.append(int(logits[-1].argmax()))
        return out


@dataclass
class SpeculativeStats:
    rounds: int = 0
    proposed: int = 0
    accepted: int = 0
    lengths: list[int] = field(default_factory=list)

    @property
    def acceptance(self) -> float:
        return self.accepted / self.proposed if self.proposed else float("nan")


@torch.inference_mode()
def speculative_greedy(model: nn.Module, prompt: torch.Tensor, max_new_tokens: int, draft,
                       k: int = 4, adaptive: bool = True, k_max: int = 12,
                       eos_token_id: int | None = None) -> tuple[Generation, SpeculativeStats]:
    """Greedy generation of `model` after `prompt` (1-D ids), `draft` proposing up to `k` tokens a round."""
    stats = SpeculativeStats()
    target = LeanDecoder(model, prompt.numel() + max_new_tokens + k_max + 1)
    t0 = time.perf_counter()
    logits = target.forward(prompt)
    t1 = time.perf_counter()
    tokens = prompt.tolist()
    out = [int(logits[-1].argmax())]
    while len(out) < max_new_tokens and not (eos_token_id is not None and out[-1] == eos_token_id):
        want = min(k, max_new_tokens - len(out))
        proposal = draft.propose(tokens + out, want)[:want] if want > 0 else []
        start = target.cache.length
        pred = target.forward(torch.tensor(out[-1:] + proposal), last_only=False).argmax(-1).tolist()
        n = 0
        while n < len(proposal) and proposal[n] == pred[n]:
            n += 1
        target.cache.length = start + 1 + n  # the fed last token and the accepted proposals
        new = proposal[:n] + [pred[n]]
        if eos_token_id is not None and eos_token_id in new:
            new = new[: new.index(eos_token_id) + 1]
        out += new
        stats.rounds += 1
        stats.proposed += len(proposal)
        stats.accepted += n
        stats.lengths.append(len(proposal))
        if adaptive and proposal:
            k = min(k + 1, k_max) if n == len(proposal) else max(1, k - 1)
    out = out[:max_new_tokens]
    t2 = time.perf_counter()
    return Generation(torch.tensor(out), t1 - t0, t2 - t1, target.cache.filled_bytes), stats
