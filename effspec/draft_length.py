"""How many of a free draft's proposals to verify: the count that buys the most tokens per second.

Leviathan et al. (2023, sec. 3.4) choose the draft length gamma from the acceptance rate alpha and the cost of a
verify: a round of gamma proposals yields 1 + alpha + ... + alpha^gamma tokens in expectation. The
+1/-1 schedule (`effspec.speculative.adapt`) ignores what a verify of r rows costs, and on a CPU that cost is
not linear: with smollm2-135m at a 1,100-token context (1 thread, this AMD EPYC), 2, 3 and 4 rows cost about the
same (27.8, 29.6, 29.1 ms against 24.2 for one), since few rows are bound by reading the weights, and each row
past 4 adds ~3.4 ms of multiplies. After a rejection the schedule had cut the length to 1, paying for a second
row and leaving the next two unused.

`CostAwareLength` estimates both quantities as the generation runs, for a draft that costs nothing to run
(prompt lookup):
- alpha per *match length* of the lookup that made the proposal (1, 2, 3, 4+ tokens): a proposal copied after a
  long match is right far more often than one after a single token. Counted like a geometric model's maximum
  likelihood: the proposals the target accepted, and the first it rejected; the prior (3 of 4 accepted) is
  optimistic, so a kind of match is tried before it is judged. A match whose n-gram recurs often in the text
  (`PromptLookup.ambiguous`: 4 or more earlier occurrences) is a kind of its own. Its latest occurrence is one
  guess among several, and such matches were wrong far more often: over every position of bench/decode.py's 6
  grounded outputs, after a 2-token match 89% of ambiguous proposals were wrong at once, against 35% when the
  2-gram occurred once.
- the verify seconds of r rows, measured round by round (a running average per r); a count not yet measured
  costs what its measured neighbours say (linear between them, flat past them), so untried lengths look cheap
  and get tried.

It then verifies the k of the proposals that maximizes (1 + sum_{i<=k} alpha^i) / seconds(k + 1), k = 0
meaning one row (no proposal). Replayed (`bench/lookup_replay.py`) at the verify costs measured on this
machine: 1.70x against the schedule's 1.65x on bench/decode.py's 3 grounded prompts, 1.98x against 1.92x on 6.
Run in one process alternating with the schedule, output identical: 1.657x against 1.593x (3 prompts), 1.887x
against 1.827x and 1.867x against 1.870x (6 prompts, two runs). On the open set bench/decode.py measured lookup
at 1.22x, against 1.13-1.14x in the runs before this change (and before a faster attention kernel).
The ambiguous kind, alternating ABBA in one process (4 runs, output identical) against one kind per match length:

| prompts | one kind per match length | ambiguous kept apart |
|---|---|---|
| 3 grounded | 1.598x | 1.632x |
| 6 grounded | 1.779x | 1.809x |
| 3 open | 1.169x | 1.159x |
"""

from __future__ import annotations


class CostAwareLength:
    """Per round: `choose(available, match)` how many proposals to verify, then `observe` what the round cost
    and kept."""

    BUCKETS = 4  # match lengths 1, 2, 3 and 4 or more
    PRIOR = (3.0, 4.0)  # accepted, checked: the estimate before any evidence
    SMOOTHING = 0.3  # weight of a new measurement in a row count's running seconds

    def __init__(self, k_max: int):
        self.k_max = k_max
        self.seconds: dict[int, float] = {}  # rows -> running verify seconds
        self.counts: dict[tuple[int, bool], tuple[float, float]] = {}  # bucket -> (accepted, checked)

    def _bucket(self, match: int, ambiguous: bool) -> tuple[int, bool]:
        return min(max(match, 1), self.BUCKETS), ambiguous

    def alpha(self, match: int, ambiguous: bool = False) -> float:
        """The estimated chance that a proposal after a match of `match` tokens is the target's own choice;
        `ambiguous`: the matched tokens occur often in the text (`PromptLookup.ambiguous`), a kind of its own."""
        accepted, checked = self.counts.get(self._bucket(match, ambiguous), self.PRIOR)
        return accepted / checked

    def cost(self, rows: int) -> float | None:
        """Seconds of a verify of `rows` rows: measured, else linear between the measured counts around it, flat
        past the first or last; None before any measurement."""
        if rows in self.seconds:
            return self.seconds[rows]
        below = [r for r in self.seconds if r < rows]
        above = [r for r in self.seconds if r > rows]
        if not below and not above:
            return None
        if not below:
            return self.seconds[min(above)]
        if not above:
            return self.seconds[max(below)]
        lo, hi = max(below), min(above)
        return self.seconds[lo] + (self.seconds[hi] - self.seconds[lo]) * (rows - lo) / (hi - lo)

    def choose(self, available: int, match: int, ambiguous: bool = False) -> int:
        """How many of the `available` proposals (made after a match of `match` tokens, `ambiguous` or not) to
        verify."""
        available = min(available, self.k_max)
        if available <= 0:
            return 0
        if not self.seconds:  # nothing measured yet: every row the same price
            return available
        a = self.alpha(match, ambiguous)
        best, best_k = 1.0 / self.cost(1), 0
        survive, expected = 1.0, 0.0
        for k in range(1, available + 1):
            survive *= a
            expected += survive
            rate = (1.0 + expected) / self.cost(k + 1)
            if rate > best:
                best, best_k = rate, k
        return best_k

    def observe(self, rows: int, seconds: float, proposed: int, accepted: int, match: int,
                ambiguous: bool = False) -> None:
        """A round verified `rows` rows in `seconds`; of its `proposed` proposals (after a match of `match`
        tokens, `ambiguous` or not) the target kept the first `accepted`."""
        old = self.seconds.get(rows)
        self.seconds[rows] = seconds if old is None else old + self.SMOOTHING * (seconds - old)
        if proposed:
            bucket = self._bucket(match, ambiguous)
            kept, checked = self.counts.get(bucket, self.PRIOR)
            self.counts[bucket] = (kept + accepted, checked + min(accepted + 1, proposed))
