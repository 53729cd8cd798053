"""Offline replay of prompt lookup on bench/decode.py's greedy outputs: how far n-gram drafts are from a copy oracle.

Usage:
    python bench/decode.py --sets grounded --methods es-plain,es-lookup --parts speculative --out ROWS.json
    python bench/lookup_replay.py --rows ROWS.json [--heads]

Speculative greedy keeps exactly the plain greedy output, so once that output
is known a round needs no model: a draft's accepted length is the common
prefix of its proposal and the output. This script rebuilds decode.py's
prompts, takes the es-plain tokens from ROWS.json and replays the rounds
(draft length as `speculative_greedy` chooses it, at most --k-max) for
several ways of proposing:

- `lookup`: effspec's `PromptLookup` (the latest earlier match of the longest
  suffix, 12..1 tokens) with the cost-aware draft length
  (`effspec.draft_length`, here fed the table's costs), what `--speculate
  lookup` runs; `lookup +1/-1`: the same proposals under the +1/-1 schedule;
- `earliest`, `vote` (the most frequent follower of the n-gram), `prompt-first`
  (the prompt's latest match before the output's), `longest-16` (the longest
  matching suffix up to 16 tokens): other choices of the occurrence;
- `tree-2`, `tree-3`: the followers of the 2-3 latest distinct matches as one
  token tree (`merge_trees`, 5 rows at most);
- `copy-oracle`: the longest span anywhere in the text so far that continues
  the output -- what any copying draft could accept at best.

Each round is priced with the measured cost of verifying its rows on this
machine (`feed` + `argmax` on smollm2-135m at the prompts' mean length, median of 9,
--threads; or given with --costs), so "x plain" is the decode speedup the
strategy would reach at those costs, and "free rows" the one it would reach if
extra rows cost nothing. `--heads` also runs the target once per prompt with
eager attention and reports, for the heads whose attention argmax best
predicts the next tokens (induction / copy heads), on how many of the
positions that lookup misses such a pointer would have proposed a right token.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import decode  # noqa: E402  (decode.py's prompt sets: the replay must see the same prompts)
from effspec.models import load_model  # noqa: E402
from effspec.draft_length import CostAwareLength  # noqa: E402
from effspec.speculative import K_MAX, PromptLookup, _depth, accepted_path, adapt, merge_trees  # noqa: E402


def matches(tokens: list[int], n: int) -> list[int]:
    """Starts of the earlier occurrences of the last n tokens that have a token after them, oldest first."""
    key = tokens[-n:]
    return [s for s in range(len(tokens) - n) if tokens[s:s + n] == key]


class Occurrence:
    """Lookup over n = max_ngram..1 that picks one occurrence by `rule` (earliest / vote / prompt-first / latest)."""

    def __init__(self, rule: str, prompt_len: int, max_ngram: int = 3):
        self.rule, self.prompt_len, self.max_ngram = rule, prompt_len, max_ngram

    def propose(self, tokens: list[int], k: int) -> list[int]:
        for n in range(min(self.max_ngram, len(tokens) - 1), 0, -1):
            starts = matches(tokens, n)
            if not starts:
                continue
            if self.rule == "earliest":
                s = starts[0]
            elif self.rule == "vote":
                follower = Counter(tokens[s + n] for s in starts).most_common(1)[0][0]
                s = [s for s in starts if tokens[s + n] == follower][-1]
            elif self.rule == "prompt-first":
                inside = [s for s in starts if s + n < self.prompt_len]
                s = (inside or starts)[-1]
            else:
                s = starts[-1]
            return tokens[s + n:s + n + k]
        return []


class ScheduledLookup(PromptLookup):
    """`PromptLookup` with the +1/-1 draft-length schedule (`adapt`) instead of the cost-aware length."""

    free = False


class Candidates:
    """The followers of the `width` latest distinct matches of the longest matching n-gram, as one token tree."""

    def __init__(self, width: int, budget: int = 5, max_ngram: int = 3):
        self.width, self.budget, self.max_ngram = width, budget, max_ngram

    def propose_tree(self, tokens: list[int], k: int) -> tuple[list[int], list[int]]:
        chains: list[list[int]] = []
        for n in range(min(self.max_ngram, len(tokens) - 1), 0, -1):
            for s in reversed(matches(tokens, n)):
                chain = tokens[s + n:s + n + k]
                if chain not in chains:
                    chains.append(chain)
                if len(chains) == self.width:
                    break
            if chains:
                break
        return merge_trees([(c, list(range(-1, len(c) - 1))) for c in chains], self.budget)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < len(a) and n < len(b) and a[n] == b[n]:
        n += 1
    return n


def oracle_length(text: list[int], future: list[int]) -> int:
    """The longest prefix of `future` that occurs anywhere in `text`."""
    return max((common_prefix(text[s:s + len(future)], future) for s in range(len(text))), default=0)


def replay(make, prompts: list[list[int]], outputs: list[list[int]], cost, k_max: int):
    """(speedup over plain greedy at `cost`, accepted, rounds, per-prompt speedups). make(prompt) -> draft, or None:
    the copy oracle. Like speculative_greedy, out[0] comes from the prefill and each round verifies the last kept
    token plus the proposals."""
    total = plain_total = 0.0
    accepted = rounds = 0
    per_prompt = []
    for prompt, out in zip(prompts, outputs):
        draft = make(prompt)
        lengths = CostAwareLength(k_max) if getattr(draft, "free", False) else None  # as speculative_greedy
        k, pos, seconds = 4, 1, 0.0
        while pos < len(out):
            text, want = prompt + out[:pos], min(k, len(out) - pos)
            if draft is None:  # it knows how far the copy goes: no draft length to adapt
                n = oracle_length(text, out[pos:pos + k_max])
                ids, parents = out[pos:pos + n], list(range(-1, n - 1))
            elif hasattr(draft, "propose_tree"):
                ids, parents = draft.propose_tree(text, want)
            elif lengths:  # a free draft: as many of its proposals as buy the most tokens per second
                ids = draft.propose(text, min(k_max, len(out) - pos))
                ids = ids[:lengths.choose(len(ids), draft.match, draft.ambiguous)]
                parents = list(range(-1, len(ids) - 1))
            else:
                ids = draft.propose(text, want)[:want]
                parents = list(range(-1, len(ids) - 1))
            rows = [out[pos - 1]] + ids
            row_parents = [-1] + [p + 1 for p in parents]
            pred = []  # the target's argmax at each row: the next output token if the row's path is the output's
            for r in range(len(rows)):
                path = [r]
                while row_parents[path[-1]] >= 0:
                    path.append(row_parents[path[-1]])
                seq = [rows[i] for i in reversed(path[:-1])]
                right = seq == out[pos:pos + len(seq)] and pos + len(seq) < len(out)
                pred.append(out[pos + len(seq)] if right else -1)
            n = len(accepted_path(rows, row_parents, pred)) - 1
            seconds += cost(len(rows))
            if lengths:
                lengths.observe(len(rows), cost(len(rows)), len(ids), n, draft.match, draft.ambiguous)
            accepted, rounds, pos = accepted + n, rounds + 1, pos + n + 1
            k = adapt(k, _depth(parents), n, k_max)
        plain = cost(1) * (len(out) - 1)
        total, plain_total = total + seconds, plain_total + plain
        per_prompt.append(plain / seconds)
    return plain_total / total, accepted, rounds, per_prompt


def measure_costs(model, context: int, threads: int, max_rows: int) -> dict[int, float]:
    """Median seconds of one verify of 1..max_rows rows after `context` cached tokens (random ids)."""
    from effspec.decoder import LeanDecoder

    torch.set_num_threads(threads)
    costs = {}
    with torch.inference_mode():
        target = LeanDecoder(model, context + max_rows + 1)
        target.feed(torch.randint(100, 20000, (context,)))
        for rows in range(1, max_rows + 1):
            times = []
            for _ in range(9):
                target.cache.length = context
                t0 = time.perf_counter()
                target.argmax(target.feed(torch.arange(1000, 1000 + rows), last_only=False))  # as speculative_greedy verifies
                times.append(time.perf_counter() - t0)
            costs[rows] = statistics.median(times)
    return costs


def pointer_heads(model, prompts, outputs, misses: list[set[int]], top: int = 5) -> list[str]:
    """Per attention head: a draft that proposes what follows the head's argmax key (when that key holds the
    token just emitted). Lines for the `top` heads by right first tokens, with how many fall on lookup's misses."""
    model.config._attn_implementation = "eager"
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    right = torch.zeros(layers, heads, dtype=torch.long)
    extra = torch.zeros(layers, heads, dtype=torch.long)
    positions = 0
    for prompt, out, missed in zip(prompts, outputs, misses):
        seq = prompt + out
        with torch.inference_mode():
            att = model(torch.tensor([seq]), output_attentions=True).attentions
        for pos in range(2, len(out)):
            q = len(prompt) + pos - 2  # the row whose logits gave out[pos - 1]; its attention is known
            positions += 1
            for layer in range(layers):
                keys = att[layer][0, :, q, :q].argmax(-1)
                for h in range(heads):
                    s = int(keys[h])
                    if seq[s] == out[pos - 1] and seq[s + 1] == out[pos]:  # s < q: s + 1 is known text
                        right[layer, h] += 1
                        extra[layer, h] += pos in missed
        del att
    best = right.flatten().argsort(descending=True)[:top]
    return [f"layer {int(i) // heads:2d} head {int(i) % heads}: right first token at {int(right.flatten()[i])} "
            f"of {positions} positions, {int(extra.flatten()[i])} of them where lookup's is wrong or missing "
            f"({sum(map(len, misses))} such positions)" for i in best]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=Path, required=True, help="a bench/decode.py JSON with es-plain rows")
    p.add_argument("--set", default="grounded", help="the prompt set to replay (default grounded)")
    p.add_argument("--data", type=Path, default=None, help="WikiText-2 raw directory (default: the rows' own)")
    p.add_argument("--k-max", type=int, default=K_MAX, help=f"adaptive draft length at most (default {K_MAX}, as decode.py)")
    p.add_argument("--costs", default=None, help="verify ms per row count, e.g. 1:41,2:48,4:60 (default: measured)")
    p.add_argument("--threads", type=int, default=1, help="threads for measured costs (default 1)")
    p.add_argument("--heads", action="store_true", help="also test attention-argmax pointers as drafts")
    args = p.parse_args(argv)

    try:
        record = json.loads(args.rows.read_text())
        proto = record["protocol"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"error: {args.rows} is not a bench/decode.py JSON ({type(exc).__name__}: {exc})", file=sys.stderr)
        return 2
    plain = next((r for r in record["rows"] if r["method"] == "es-plain" and r["set"] == args.set), None)
    if plain is None:
        print(f"error: {args.rows} has no es-plain row of the {args.set} set", file=sys.stderr)
        return 2
    loaded = load_model("smollm2-135m")
    ns = argparse.Namespace(sets=[args.set], data=args.data or Path(proto["data"]), prompts=proto["prompts"],
                            passage_tokens=proto["passage_tokens"])
    prompts = [t.tolist() for t in decode.prompt_sets(ns, loaded.tokenizer)[args.set]]
    outputs = [p["tokens"] for p in plain["per_prompt"]]
    if [len(x) for x in prompts] != [p["prompt_tokens"] for p in plain["per_prompt"]]:
        print("error: the rebuilt prompts differ from the rows' (another data directory or passage length?)", file=sys.stderr)
        return 2

    if args.costs:
        try:
            table = {int(a): float(b) / 1e3 for a, b in (kv.split(":") for kv in args.costs.split(","))}
        except ValueError:
            print(f"error: --costs {args.costs!r}: expected rows:ms pairs, e.g. 1:41,2:48,4:60", file=sys.stderr)
            return 2
        if 1 not in table:
            print("error: --costs needs the 1-row cost (plain greedy's step)", file=sys.stderr)
            return 2
    else:
        context = round(statistics.mean(map(len, prompts)))
        table = measure_costs(loaded.model.eval(), context, args.threads, args.k_max + 1)
    known = sorted(table)

    def cost(rows: int) -> float:
        """Seconds of a verify of `rows` rows: the table's, linear between its entries and past its last two."""
        if rows in table:
            return table[rows]
        lo = max([r for r in known if r < rows], default=known[0])
        hi = min([r for r in known if r > rows], default=known[-1])
        if lo == hi or hi < rows:  # past the table: its last two entries' slope
            lo, hi = (known[-2], known[-1]) if len(known) > 1 else (known[-1], known[-1])
        slope = (table[hi] - table[lo]) / (hi - lo) if hi != lo else 0.0
        return table[lo] + slope * (rows - lo)

    print("verify ms by rows: " + ", ".join(f"{r}: {table[r] * 1e3:.1f}" for r in known))
    strategies = {
        "lookup": lambda pr: PromptLookup(),
        "lookup +1/-1": lambda pr: ScheduledLookup(),
        "earliest": lambda pr: Occurrence("earliest", len(pr)),
        "vote": lambda pr: Occurrence("vote", len(pr)),
        "prompt-first": lambda pr: Occurrence("prompt-first", len(pr)),
        "longest-16": lambda pr: Occurrence("latest", len(pr), 16),
        "tree-2": lambda pr: Candidates(2),
        "tree-3": lambda pr: Candidates(3),
        "copy-oracle": lambda pr: None,
    }
    print(f"{'draft':<13} {'accepted':>8} {'rounds':>6} {'x plain':>7} {'free rows':>9}  per prompt")
    for name, make in strategies.items():
        speedup, accepted, rounds, per = replay(make, prompts, outputs, cost, args.k_max)
        free = replay(make, prompts, outputs, lambda rows: table[1], args.k_max)[0]
        print(f"{name:<13} {accepted:>8} {rounds:>6} {speedup:>6.2f}x {free:>8.2f}x  " + " ".join(f"{x:.2f}" for x in per))

    if args.heads:
        misses = []
        for prompt, out in zip(prompts, outputs):
            lookup = PromptLookup()
            misses.append({pos for pos in range(2, len(out))
                           if lookup.propose(prompt + out[:pos], 1)[:1] != [out[pos]]})
        for line in pointer_heads(loaded.model.eval(), prompts, outputs, misses):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
