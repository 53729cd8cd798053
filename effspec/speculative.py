"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023) over `effspec.decoder`: exact greedy, and
sampling that preserves the target's distribution.

A cheap *draft* proposes k tokens; the target model scores the last accepted
token plus all k proposals in one forward pass (k + 1 rows, about the cost of
one decode step when decode is bandwidth-bound), so each verify step yields
between 1 and k + 1 tokens for roughly the price of one.

`speculative_greedy` keeps the proposals up to the first one that differs from
the target's own argmax and appends the target's token at that position. Every
kept token is the target's greedy choice given the tokens before it, so the
output is the plain greedy output (up to float rounding differences between the
one-row and k-row paths, which only matter at exact logit ties).

`speculative_sampling` is the paper's rejection scheme (Leviathan et al.,
Algorithm 1; Chen et al., Algorithm 2), one round being the pure function
`speculative_step`: the draft samples x_i from its distribution q_i, the target
gives p_i for every position in the same one forward; x_i is accepted with
probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection the round ends
with a token drawn from the residual norm(max(0, p_i - q_i)); if all k are
accepted a bonus token is drawn from p_{k+1}. Each emitted token is then
distributed exactly as p given the tokens before it (tested statistically), so
speculation changes the speed, never the distribution. p and q are both the
*filtered* distributions (`effspec.generate.probabilities`: temperature, top-k,
top-p applied identically to both), since the filtered target distribution is
the one plain sampling draws from. A deterministic draft (prompt lookup, any
draft with only `propose`) is the point mass q = one-hot(x): x is accepted with
probability p(x), and the residual is p without x. At temperature 0 p and q are
one-hot too, and the scheme reduces to `speculative_greedy`'s rule.

Drafts (each `propose(tokens, k) -> list[int]`; a sampling draft also has
`sample(tokens, k, config, generator) -> (tokens, q rows)`):

- `PromptLookup` (prompt-lookup decoding, Saxena 2023): the tokens that
  followed the most recent earlier occurrence of the text's last n-gram. Free,
  and strong when the output copies its input (summaries, extraction, edits).
- `DraftDecoder`: tokens of a smaller model with the same tokenizer, or of the
  target's own first blocks plus its head (self-speculation, as in LayerSkip /
  Draft & Verify), or of a `drop-layers`-pruned copy; it keeps its own KV cache
  and rolls it back to the accepted prefix. `vocab` (from `frequent_tokens`)
  restricts its head to the most frequent tokens (FR-Spec), since a full
  vocabulary head is most of a small draft's cost.
- `effspec.eagle.EagleDraft`: an EAGLE head, one block over the target's own
  features. The loops hand a draft with `observe(features)` the target's
  final-normed hidden states of every token it keeps (prompt, then each
  verified round's), computed by the same forward passes that verify.
- `Branches`: several drafts at once, their proposals merged into one token
  tree (`merge_trees`).

Greedy rounds also verify *trees* (SpecInfer, Miao et al. 2024; EAGLE's
token tree): a draft with `propose_tree(tokens, k) -> (ids, parents)` offers
several continuations, the target scores all of them in one pass in which
each row sees only its own ancestors (`effspec.decoder.LeanDecoder.hidden`'s
`parents`), `accepted_path` walks down the children that equal the target's
argmax, and the kept path's keys and values move to the front of the cache
(`LeanDecoder.keep`). Sampling rounds take chains (`propose` / `sample`).

Verify steps of up to 8 tokens run on the decoder's compiled path (float
linears through `linear_rows`, attention through `rope_attend`, as single
decode steps do). The gain is bounded by the verify cost. At a ~1,100-token
context on this machine (AMD EPYC, Zen 4, 1 thread; `bench/lookup_replay.py`'s
measured costs) a verify of 1 row takes 24.2 ms, 2 rows 27.8, 3 29.6, 4 29.1
and 8 rows 42.8: up to 4 rows the step is bound by reading the weights, and
each row past 4 adds ~3.4 ms of multiplies, near this core's float32 FMA rate.
(Those costs computed every logit; greedy tokens now come from the head's int8
screen, `effspec.greedy_head`: 1 row 22.5 -> 19.9 ms, 4 rows 27.9 -> 26.7,
8 rows 41.1 -> 40.3 at this context, one process alternating.)
(Until `linear_rows` prefetched the weights ahead, 4 rows took 54 ms and 8
rows 77 against 29 for one.) Replayed offline at these costs, lookup would
reach 2.27x on bench/decode.py's 3 grounded prompts if extra rows were free,
and a copy oracle (the longest span anywhere in the text so far that
continues the output, up to 7 tokens) 3.1x: the copies begin where no n-gram
of the output points to them. Other ways of choosing the occurrence (the
earliest, the most frequent follower, the prompt's own first) and two or three
candidates as a tree replayed no better than the latest match of the longest
suffix (up to 12 tokens), `PromptLookup`'s rule.

Draft length (`adaptive`): a draft that costs nothing to run (`free`: prompt
lookup) has each round verify the number of its up to `k_max` proposals that
buys the most tokens per second of verify (`effspec.draft_length`: acceptance
estimated per match length, verify seconds per row count measured as the
rounds run); other drafts adapt k to the running acceptance, +1 after a fully
accepted round and -1 after a rejection, within [1, k_max] -- the schedule
transformers' assisted generation also uses. On the 3 grounded prompts, in one
process alternating, output identical: 1.66x against 1.59x with the +1/-1
schedule. `k_max` defaults to 7, so a verify (the last kept token + the
proposals) stays within the decoder's compiled rows: 9-13 rows go through BLAS
and cost 110-125 ms at a 1,100-token context against 52 ms for 8 (measured
before the 2-4-row and attention changes); replayed on six grounded prompts,
lookup gave 1.78x with 7 against 1.67x with 12. Even if 9-16 rows stayed on
the compiled path at the 8-row slope (replayed with costs extrapolated past 8
rows), the cost-aware length with 11 or 15 proposals at most replayed no better
than with 7: 1.67x and 1.65x against 1.70x (3 prompts), 1.89x and 1.83x
against 1.98x (6).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from effspec.decoder import STEP_ROWS, LeanDecoder
from effspec.draft_length import CostAwareLength
from effspec.generate import Decode, Generation, SamplingConfig, final_text, first_stop, probabilities


K_MAX = STEP_ROWS - 1  # proposals a round at most: a verify of the last kept token and them stays compiled


class PromptLookup:
    """Propose the continuation of the latest earlier match of the longest suffix of the text, `max_ngram` tokens
    at most and `min_ngram` at least.

    The n-grams up to `INDEXED` tokens seen so far are indexed (n-gram -> the starts that have a token after them)
    and the index grows with the text, so a proposal is a few dictionary look-ups; a longer match can only extend
    an occurrence of the last `INDEXED` tokens, so those are compared backwards. Scanning a 1,100-token context
    backwards for every round took ~1.4 ms, 4-5% of a decode step of smollm2-135m; indexing every n-gram up to 12
    took 55 ms for that context. Prompt lookup decoding (Saxena 2023) also prefers its longest n-gram, up to 3
    tokens. Replayed on the grounded prompts of bench/decode.py at the measured verify costs
    (`bench/lookup_replay.py`), suffixes up to 12 tokens gave 1.59x against 1.56x for 3 (3 prompts) and 1.82x
    against 1.77x (6 prompts), no better at 16 or 32; measured, 1.54x and 1.72x, within the runs' spread
    (1.53-1.55x and 1.74-1.81x with 3), with 193 against 189 and 442 against 433 tokens accepted.
    After each proposal `match` says how many tokens the match spans, and `ambiguous` whether its n-gram recurs
    often: `effspec.draft_length` sizes the round by both.
    """

    INDEXED = 3
    AMBIGUOUS = 4  # occurrences of the matched n-gram (up to INDEXED tokens) from which a match is `ambiguous`
    free = True  # proposing costs nothing next to a verify: `speculative_greedy` sizes its rounds by cost alone

    def __init__(self, max_ngram: int = 12, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"n-grams {max_ngram}..{min_ngram}: expected max_ngram >= min_ngram >= 1")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.match = 0  # tokens the last proposal's match spans (0: no match): how far to trust it
        self.ambiguous = False  # the last proposal's matched n-gram occurs AMBIGUOUS or more times: trust it less
        self._seen: list[int] = []  # the text the index covers
        self._starts: dict[tuple[int, ...], list[int]] = {}

    def _index(self, tokens: list[int]) -> None:
        """Bring the index up to `tokens`: every n-gram that is followed by a token, at each of its starts."""
        old = len(self._seen)
        if tokens[:old] != self._seen:  # a shorter or another text: start over
            self._starts, old = {}, 0
        self._seen = list(tokens)
        top = min(self.max_ngram, self.INDEXED)
        for end in range(max(old - 1, 0), len(tokens) - 1):  # n-grams ending at `end` gain their follower
            for n in range(self.min_ngram, top + 1):
                if end + 1 >= n:
                    self._starts.setdefault(tuple(tokens[end + 1 - n:end + 1]), []).append(end + 1 - n)

    def propose(self, tokens: list[int], k: int) -> list[int]:
        self._index(tokens)
        self.match, self.ambiguous = 0, False
        top = min(self.max_ngram, self.INDEXED)
        for n in range(top, self.min_ngram - 1, -1):
            if len(tokens) <= n:
                continue
            starts = self._starts.get(tuple(tokens[-n:]))
            if not starts:
                continue
            best, longest = starts[-1], n
            if n == top and self.max_ngram > top:  # the longest match among them, the latest on a tie
                for s in reversed(starts):
                    length = n
                    while length < self.max_ngram and s - (length - n) - 1 >= 0 and \
                            tokens[s - (length - n) - 1] == tokens[-length - 1]:
                        length += 1
                    if length > longest:
                        best, longest = s, length
                        if length == self.max_ngram:  # no longer match is looked for; later ones came first
                            break
            self.match, self.ambiguous = longest, len(starts) >= self.AMBIGUOUS
            return tokens[best + n:best + n + k]
        return []


class DraftDecoder:
    """Greedy or sampled proposals of a (smaller or truncated) model over its own KV cache."""

    def __init__(self, model: nn.Module, max_len: int, n_blocks: int | None = None,
                 vocab: torch.Tensor | None = None):
        """`vocab`: the token ids the draft may propose (`frequent_tokens`); None: all."""
        self.lean = LeanDecoder(model, max_len, n_blocks, vocab)
        self.fed: list[int] = []  # the tokens whose keys and values the draft cache holds

    @classmethod
    def self_draft(cls, model: nn.Module, max_len: int, n_blocks: int,
                   vocab: torch.Tensor | None = None) -> "DraftDecoder":
        """The target's first `n_blocks` blocks, its final norm and its head: no second model."""
        return cls(model, max_len, n_blocks, vocab)

    def _catch_up(self, tokens: list[int], k: int) -> tuple[torch.Tensor | None, int]:
        """Roll the cache back to what it shares with `tokens` and feed the rest: (final hidden state of the last
        token, how many of the k tokens fit in the cache), or (None, 0) when none fits."""
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
            return None, 0
        new = tokens[common:]
        h = self.lean.feed(torch.tensor(new))  # several tokens at once after a prefix
        self.fed += new
        return h, k

    def propose(self, tokens: list[int], k: int) -> list[int]:
        h, k = self._catch_up(tokens, k)
        if h is None:
            return []
        out = [int(self.lean.argmax(h)[-1])]
        while len(out) < k:
            self.fed.append(out[-1])
            out.append(self.lean.next_token(torch.tensor(out[-1:])))
        return out

    def sample(self, tokens: list[int], k: int, config: SamplingConfig,
               generator: torch.Generator | None) -> tuple[list[int], torch.Tensor]:
        """Up to k tokens, each drawn from the draft's `config`-filtered distribution q, and q's rows (n, vocab)."""
        h, k = self._catch_up(tokens, k)
        if h is None:
            return [], torch.empty(0, 0)
        logits = self.lean.logits(h)
        out, q = [], []
        while True:
            q.append(probabilities(logits[-1:], config))
            out.append(int(torch.multinomial(q[-1], 1, generator=generator)))
            if len(out) == k:
                return out, torch.cat(q)
            logits = self.lean.forward(torch.tensor(out[-1:]))
            self.fed.append(out[-1])


def merge_trees(trees: list[tuple[list[int], list[int]]], budget: int | None = None) -> tuple[list[int], list[int]]:
    """Token trees (ids, parents; parent -1 the root) merged into one trie: paths that start alike share rows,
    the earlier trees' nodes come first, and nodes past `budget` (with everything below them) are left out."""
    ids: list[int] = []
    parents: list[int] = []
    node: dict[tuple[int, int], int] = {}  # (merged parent, token) -> merged row
    for tree_ids, tree_parents in trees:
        where: list[int | None] = []  # each node of this tree in the merged one (None: left out)
        for token, p in zip(tree_ids, tree_parents):
            up = -1 if p < 0 else where[p]
            key = (up, token)
            if up is None or (key not in node and budget is not None and len(ids) >= budget):
                where.append(None)
                continue
            if key not in node:
                node[key] = len(ids)
                ids.append(token)
                parents.append(up)
            where.append(node[key])
    return ids, parents


class Branches:
    """Several drafts at once: each round their proposals are merged into one token tree (`merge_trees`, the
    first draft's rows first) that the target verifies in a single pass, and the longest branch it agrees
    with is kept.

    Drafts that are right in different places combine without a rule for choosing between them: prompt
    lookup copies text that recurs, EAGLE's head predicts fresh text. `budget` caps the proposals a round:
    verify rows stop being cheap past six here (smollm2-135m, 150-token context, 1 thread: 1 row 25.0 ms,
    2 rows 26.7, 4 rows 29.4, 6 rows 31.3, 7 rows 34.9, 8 rows 38.1). On the bench's open set with a 500-step
    EAGLE head, budgets 5 and 7 in alternating runs gave 1.28x and 1.28x against 1.27x and 1.25x plain
    greedy. Measured on the bench's six open prompts (README, "Speculative decoding"): lookup + the
    1,000-step EAGLE head 1.31x plain greedy, the head alone 1.14x in the same run."""

    def __init__(self, drafts: list, budget: int = 5):
        if not drafts or budget < 1:
            raise ValueError("Branches: at least one draft and a positive budget")
        self.drafts, self.budget = drafts, budget

    def observe(self, features: torch.Tensor) -> None:
        for d in self.drafts:
            _observe(d, features)

    def propose_tree(self, tokens: list[int], k: int) -> tuple[list[int], list[int]]:
        return merge_trees([_proposals(d, tokens, k) for d in self.drafts], self.budget)


def frequent_tokens(texts: list[torch.Tensor], k: int, always: list[int] = ()) -> torch.Tensor:
    """The `k` most frequent ids of the token sequences `texts` (ties: the smaller id), plus `always`:
    a draft's vocabulary (FR-Spec, Zhao et al. 2025). The head is most of a small draft's step -- smollm2's
    first 4 blocks with its 49152 x 576 float32 head took 14.3-19.2 ms a step here, with an 8,192-token head
    7.0-9.6 ms (1 thread) -- while running text uses few distinct tokens; a draft restricted to them is wrong
    more often only when the target's token lies outside, and the output stays exact because the target
    verifies every proposal."""
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    ids = [t.flatten().to(torch.long) for t in texts]
    counts = torch.bincount(torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long))
    order = torch.sort(counts, descending=True, stable=True).indices
    top = order[: min(k, int((counts > 0).sum()))]
    return torch.cat([top, torch.tensor(list(always), dtype=torch.long)]).unique()


def with_tokens(vocab: torch.Tensor | None, extra: list[int]) -> torch.Tensor | None:
    """A draft head's tokens plus `extra` (a prompt's tokens, end-of-text), so that it can propose what the prompt
    says; None (the whole vocabulary) stays None."""
    return None if vocab is None else torch.cat([vocab, torch.tensor(extra, dtype=torch.long)]).unique()


@dataclass
class SpeculativeStats:
    rounds: int = 0
    proposed: int = 0
    accepted: int = 0
    lengths: list[int] = field(default_factory=list)

    def record(self, proposed: int, accepted: int) -> None:
        self.rounds += 1
        self.proposed += proposed
        self.accepted += accepted
        self.lengths.append(proposed)

    @property
    def acceptance(self) -> float:
        return self.accepted / self.proposed if self.proposed else float("nan")


@torch.inference_mode()
def speculative_greedy(model: nn.Module, prompt: torch.Tensor, max_new_tokens: int, draft,
                       k: int = 4, adaptive: bool = True, k_max: int = K_MAX, eos_token_id: int | None = None,
                       on_token: Callable[[int], None] | None = None) -> tuple[Generation, SpeculativeStats]:
    """Greedy generation of `model` after `prompt` (1-D ids), `draft` proposing up to `k` tokens a round;
    `on_token(id)` is called with each kept token, a round's tokens at once. With `adaptive`, k follows the
    acceptance (`adapt`), or, for a draft that costs nothing to run (`free`: prompt lookup), each round verifies
    the number of its up to `k_max` proposals that buys the most tokens per second (`CostAwareLength`); such a
    draft also says after each proposal how many tokens its match spanned (`match`), which the acceptance is
    estimated by."""
    stats = SpeculativeStats()
    target, first, prefill_seconds = _prefilled(model, prompt, max_new_tokens + k_max + 1, draft, greedy=True)
    lengths = CostAwareLength(k_max) if adaptive and getattr(draft, "free", False) else None
    t1 = time.perf_counter()
    tokens = prompt.tolist()
    out = [int(first[0])]
    _emit(on_token, out)
    while len(out) < max_new_tokens and not (eos_token_id is not None and out[-1] == eos_token_id):
        want = min(k_max if lengths else k, max_new_tokens - len(out))
        proposal, parents = _proposals(draft, tokens + out, want)
        if lengths:
            proposal = proposal[:lengths.choose(len(proposal), draft.match, getattr(draft, "ambiguous", False))]
            parents = parents[:len(proposal)]
        rows, row_parents = out[-1:] + proposal, [-1] + [p + 1 for p in parents]
        start = target.cache.length
        t0 = time.perf_counter()
        h = target.feed(torch.tensor(rows), last_only=False, parents=row_parents)
        path, pred = greedy_path(target, h, rows, row_parents)
        verify_seconds = time.perf_counter() - t0
        target.keep(start, path)  # the fed last token and the accepted proposals
        _observe(draft, h[path])
        n = len(path) - 1
        new = [rows[r] for r in path[1:]] + [pred[path[-1]]]
        new = _until_eos(new, eos_token_id)[: max_new_tokens - len(out)]
        _emit(on_token, new)
        out += new
        stats.record(len(proposal), n)
        if lengths:
            lengths.observe(len(rows), verify_seconds, len(proposal), n, draft.match,
                            getattr(draft, "ambiguous", False))
        elif adaptive:
            k = adapt(k, _depth(parents), n, k_max)
    t2 = time.perf_counter()
    return Generation(torch.tensor(out), prefill_seconds, t2 - t1, target.cache.filled_bytes), stats


def _proposals(draft, tokens: list[int], k: int) -> tuple[list[int], list[int]]:
    """A round's proposals and their parents (-1: continues `tokens`; else the index of the proposal it
    continues): a tree from a draft with `propose_tree`, else the chain of `propose`."""
    if k <= 0:
        return [], []
    if hasattr(draft, "propose_tree"):
        return draft.propose_tree(tokens, k)
    proposal = draft.propose(tokens, k)[:k]
    return proposal, list(range(-1, len(proposal) - 1))


def accepted_path(ids: list[int], parents: list[int], pred: list[int]) -> list[int]:
    """Greedy verification of a tree of rows (row 0 the last kept token, row t continuing row parents[t]):
    the rows from row 0 down, each the child of the one before whose token is the target's argmax `pred` there.
    A chain gives its longest prefix that matches the target's own argmax, as in plain speculative greedy."""
    path = [0]
    while True:
        here = path[-1]
        nxt = next((t for t in range(here + 1, len(ids)) if parents[t] == here and ids[t] == pred[here]), None)
        if nxt is None:
            return path
        path.append(nxt)


def greedy_path(target: LeanDecoder, h: torch.Tensor, ids: list[int], parents: list[int]) -> tuple[list[int], list]:
    """`accepted_path` of the rows `ids` (final-normed hidden states h) and the target's argmax at its rows (None
    at rows it did not need). When row 0 has several children (a tree), the argmax is taken only where the walk
    can go: row 0 first, then, if one of its children is its argmax, every row below that child in one call.

    The head's argmax costs by the rows it reads (`effspec.greedy_head`'s screen, smollm2-135m, 1 thread: 1 row
    0.87 ms, 4 rows 2.10, 6 rows 3.39, 8 rows 4.61), and a tree's walk keeps at most one of the subtrees below
    row 0. Measured on bench/decode.py's open prompts (lookup + EAGLE head tree, 1 thread, one process ABBA,
    output identical): 1.294x -> 1.330x plain greedy. A chain's rows are all needed when its draft is
    right, and reading row 0 first lost there (grounded prompts, lookup: 1.60x -> 1.54x), so a chain (or a tree
    whose branches part below row 0's child) is read in one call, as is a head without the screen, which costs
    about as much for 1 row as for 8. Each row's argmax does not depend on the rows read with it: the tokens are
    the same."""
    if sum(p == 0 for p in parents) < 2 or not target.screens_argmax():
        pred = target.argmax(h).tolist()
        return accepted_path(ids, parents, pred), pred
    pred: list = [None] * len(ids)
    pred[0] = int(target.argmax(h[:1])[0])
    child = next((t for t in range(1, len(ids)) if parents[t] == 0 and ids[t] == pred[0]), None)
    if child is not None:
        below = [False] * len(ids)
        below[child] = True
        for t in range(child + 1, len(ids)):
            below[t] = parents[t] >= 0 and below[parents[t]]
        rows = [t for t in range(child, len(ids)) if below[t]]
        for t, token in zip(rows, target.argmax(h[rows]).tolist()):
            pred[t] = token
    return accepted_path(ids, parents, pred), pred


def _depth(parents: list[int]) -> int:
    """The longest root-to-leaf path of a tree of proposals (a chain: its length)."""
    depth: list[int] = []
    for p in parents:
        depth.append(1 if p < 0 else depth[p] + 1)
    return max(depth, default=0)


def adapt(k: int, proposed: int, accepted: int, k_max: int) -> int:
    """The next draft length: +1 after a fully accepted round, -1 after a rejection, within [1, k_max]."""
    if not proposed:
        return k
    return min(k + 1, k_max) if accepted == proposed else max(1, k - 1)


def _prefilled(model: nn.Module, prompt: torch.Tensor, room: int, draft,
               greedy: bool = False) -> tuple[LeanDecoder, torch.Tensor, float]:
    """The target's decoder with `prompt` in its cache and `room` positions to spare: (decoder, logits of the
    last position -- with `greedy`, its argmax token (1,) instead --, seconds). A draft that feeds on the target's
    features (`observe`) gets the prompt's."""
    target = LeanDecoder(model, prompt.numel() + room)
    if greedy:
        target.prepare_argmax()
    t0 = time.perf_counter()
    h = target.feed(prompt, last_only=not hasattr(draft, "observe"))
    head = target.argmax(h[-1:]) if greedy else target.logits(h[-1:])
    seconds = time.perf_counter() - t0
    _observe(draft, h)
    return target, head, seconds


def _verify(target: LeanDecoder, ids: list[int], parents: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's logits and final-normed hidden states (features) of every row of `ids`, a chain or, with
    `parents`, a tree (`LeanDecoder.hidden`)."""
    h = target.feed(torch.tensor(ids), last_only=False, parents=parents)
    return target.logits(h), h


def _observe(draft, features: torch.Tensor) -> None:
    """Hand the target's features of the tokens it kept to a draft that feeds on them (EAGLE)."""
    if hasattr(draft, "observe"):
        draft.observe(features)


def _until_eos(tokens: list[int], eos_token_id: int | None) -> list[int]:
    """`tokens` up to and including the first end-of-sequence token."""
    if eos_token_id is not None and eos_token_id in tokens:
        return tokens[: tokens.index(eos_token_id) + 1]
    return tokens


def _emit(on_token: Callable[[int], None] | None, tokens: list[int]) -> None:
    if on_token is not None:
        for t in tokens:
            on_token(t)


# ---- speculative sampling ------------------------------------------------------------------------
def speculative_step(p: torch.Tensor, q: torch.Tensor, draft: list[int],
                     generator: torch.Generator | None = None) -> list[int]:
    """One verify round of speculative sampling: the accepted prefix of `draft` plus one token.

    p: (n + 1, vocab) the target's probabilities at each draft position and after the last one;
    q: (n, vocab) the draft's probabilities that draft[i] was drawn from (one-hot for a deterministic draft).
    """
    for i, x in enumerate(draft):
        r = float(torch.rand(1, generator=generator))
        if r * float(q[i, x]) < float(p[i, x]):  # accept with probability min(1, p_i(x) / q_i(x))
            continue
        residual = (p[i] - q[i]).clamp(min=0)  # norm(max(0, p_i - q_i)); multinomial normalizes
        if float(residual.sum()) <= 0:  # deviation: unreachable in exact arithmetic (p = q always accepts)
            residual = p[i]
        return draft[:i] + [int(torch.multinomial(residual, 1, generator=generator))]
    return list(draft) + [int(torch.multinomial(p[len(draft)], 1, generator=generator))]  # the bonus token


def _draft_sample(draft, tokens: list[int], k: int, config: SamplingConfig, generator: torch.Generator | None,
                  vocab: int) -> tuple[list[int], torch.Tensor]:
    """(proposal, q rows (n, vocab)): a sampling draft's own q, else a deterministic draft's one-hot rows."""
    if hasattr(draft, "sample"):
        proposal, q = draft.sample(tokens, k, config, generator)
    else:
        proposal = draft.propose(tokens, k)[:k]
        q = F.one_hot(torch.tensor(proposal, dtype=torch.long), vocab).float()
    if q.shape[-1] != vocab:  # a draft whose embedding is padded wider or narrower: its extra tokens have p = 0
        q = F.pad(q[:, :vocab], (0, max(0, vocab - q.shape[-1])))
    return proposal, q


@torch.inference_mode()
def speculative_sampling(model: nn.Module, prompt: torch.Tensor, max_new_tokens: int, draft, config: SamplingConfig,
                         k: int = 4, adaptive: bool = True, k_max: int = K_MAX, eos_token_id: int | None = None,
                         decode: Decode | None = None,
                         on_token: Callable[[int], None] | None = None) -> tuple[Generation, SpeculativeStats]:
    """Sampled generation of `model` after `prompt` (1-D ids) as `config` says, `draft` proposing up to `k`
    tokens a round; the tokens are distributed as plain `effspec.generate.generate` with `config` would draw
    them. Stop strings of `config` need `decode`; `on_token` as in `speculative_greedy`."""
    if config.stop and decode is None:
        raise ValueError(f"stop={config.stop!r}: stop strings need a `decode` (token ids -> text)")
    generator = config.generator()
    stats = SpeculativeStats()
    target, logits, prefill_seconds = _prefilled(model, prompt, max_new_tokens + k_max + 1, draft)
    t1 = time.perf_counter()
    tokens = prompt.tolist()
    out = [int(torch.multinomial(probabilities(logits, config), 1, generator=generator))]
    _emit(on_token, out)
    stopped = first_stop(out, decode, config.stop) is not None
    while len(out) < max_new_tokens and out[-1] != eos_token_id and not stopped:
        want = min(k, max_new_tokens - len(out))
        proposal, q = _draft_sample(draft, tokens + out, want, config, generator, logits.shape[-1])
        start = target.cache.length
        logits, h = _verify(target, out[-1:] + proposal)
        new = speculative_step(probabilities(logits, config), q, proposal, generator)  # p: (n+1, V)
        n = len(new) - 1  # accepted proposals
        target.cache.length = start + 1 + n  # the fed last token and the accepted proposals
        _observe(draft, h[: 1 + n])
        new = _until_eos(new, eos_token_id)[: max_new_tokens - len(out)]
        cut = first_stop(out + new, decode, config.stop, start=len(out))
        if cut is not None:
            new, stopped = new[: cut - len(out)], True
        _emit(on_token, new)
        out += new
        stats.record(len(proposal), n)
        k = adapt(k, len(proposal), n, k_max) if adaptive else k
    t2 = time.perf_counter()
    text = final_text(out, decode, config.stop)
    return Generation(torch.tensor(out), prefill_seconds, t2 - t1, target.cache.filled_bytes, text), stats
