"""The cost-aware draft length picks the count of proposals that maximizes expected tokens per verify second:
Leviathan et al.'s choice of gamma when verify costs are linear, the cheap rows when they are not, and it stops
proposing after a kind of match that keeps failing."""

import pytest
import torch

from effspec.draft_length import CostAwareLength
from effspec.generate import greedy
from effspec.models import load_model
from effspec.speculative import K_MAX, PromptLookup, speculative_greedy


def with_costs(costs: dict[int, float], k_max: int = 7) -> CostAwareLength:
    lengths = CostAwareLength(k_max)
    for rows, seconds in costs.items():
        lengths.observe(rows, seconds, 0, 0, 0)
    return lengths


def with_alpha(lengths: CostAwareLength, accepted: int, checked: int, match: int,
               ambiguous: bool = False) -> CostAwareLength:
    lengths.counts[lengths._bucket(match, ambiguous)] = (float(accepted), float(checked))
    return lengths


@pytest.mark.parametrize("alpha", [0.3, 0.6, 0.8, 0.9])
@pytest.mark.parametrize("c", [0.05, 0.2, 0.5])
def test_linear_costs_give_the_papers_gamma(alpha, c):
    """Leviathan et al. (2023), sec. 3.4: a verify of gamma proposals costs 1 + c * gamma steps and yields
    (1 - alpha^(gamma + 1)) / (1 - alpha) tokens in expectation; the best gamma maximizes their ratio."""
    def improvement(gamma):
        return (1 - alpha ** (gamma + 1)) / ((1 - alpha) * (1 + c * gamma))
    best = max(range(0, 8), key=improvement)
    lengths = with_alpha(with_costs({r: 1 + c * (r - 1) for r in range(1, 9)}), round(alpha * 1000), 1000, 3)
    assert lengths.choose(7, 3) == best


def test_rows_that_cost_the_same_are_used_and_dear_ones_are_not():
    """This CPU's shape at a 1,100-token context: 2-4 rows cost about the same (15-22% more than 1 row), each row
    after that ~0.14 of a step more."""
    costs = {1: 24.2, 2: 27.8, 3: 29.6, 4: 29.1, 5: 32.1, 6: 35.9, 7: 39.1, 8: 42.8}
    lengths = with_alpha(with_costs(costs), 1, 2, 1)  # half the proposals right
    assert lengths.choose(7, 1) == 3  # 4 rows: no dearer than 3, and 5 rows cost more
    assert lengths.choose(2, 1) == 2  # what there is
    assert with_alpha(lengths, 95, 100, 1).choose(7, 1) == 7  # nearly always right: every row pays


def test_a_kind_of_match_that_keeps_failing_stops_being_verified_and_others_go_on():
    lengths = with_costs({1: 1.0, 2: 1.1, 8: 1.2})
    assert lengths.choose(7, 1) == 7 and lengths.choose(7, 5) == 7  # the prior: 3 in 4 right
    for _ in range(40):
        lengths.observe(8, 1.2, 7, 0, 1)  # one-token matches: every first proposal rejected
        lengths.observe(8, 1.2, 7, 7, 5)  # long matches: all kept
    assert lengths.alpha(1) == pytest.approx(3 / 44) and lengths.alpha(5) == pytest.approx(283 / 284)
    assert lengths.choose(7, 1) == 0 and lengths.choose(7, 5) == 7
    assert lengths.alpha(4) == lengths.alpha(12)  # 4 tokens or more: one kind


def test_an_ambiguous_match_is_judged_apart_from_an_unambiguous_one_of_the_same_length():
    lengths = with_costs({1: 1.0, 2: 1.1, 8: 1.2})
    for _ in range(40):
        lengths.observe(8, 1.2, 7, 0, 2, ambiguous=True)  # a 2-gram that recurs all over the text: wrong
        lengths.observe(8, 1.2, 7, 7, 2)  # a 2-gram seen once or twice: right
    assert lengths.alpha(2, ambiguous=True) == pytest.approx(3 / 44) and lengths.alpha(2) == pytest.approx(283 / 284)
    assert lengths.choose(7, 2, ambiguous=True) == 0 and lengths.choose(7, 2) == 7


def test_prompt_lookup_says_when_its_match_recurs_often():
    """`ambiguous`: the matched n-gram (up to INDEXED tokens) has AMBIGUOUS or more earlier occurrences, so the
    latest one is a guess among several."""
    lookup = PromptLookup()
    assert lookup.propose([7, 1, 2, 7, 3, 4, 7, 5, 6, 7, 8, 9, 7], 2) == [8, 9]
    assert lookup.match == 1 and lookup.ambiguous  # 7 occurs 4 times before
    assert lookup.propose([7, 1, 2, 7, 3, 4, 7, 5, 6, 8, 9, 7], 2) == [5, 6]
    assert lookup.match == 1 and not lookup.ambiguous  # 3 times
    assert lookup.propose([1, 2, 3, 9, 1, 2, 3], 2) == [9, 1] and lookup.match == 3 and not lookup.ambiguous
    assert lookup.propose([5, 6], 2) == [] and not lookup.ambiguous


def test_costs_are_running_averages_interpolated_between_measured_counts():
    lengths = CostAwareLength(7)
    assert lengths.cost(3) is None and lengths.choose(5, 2) == 5  # nothing measured: every row the same price
    lengths.observe(1, 1.0, 0, 0, 0)
    lengths.observe(5, 3.0, 4, 4, 2)
    assert lengths.cost(3) == pytest.approx(2.0) and lengths.cost(8) == 3.0 and lengths.cost(1) == 1.0
    lengths.observe(1, 2.0, 0, 0, 0)
    assert lengths.cost(1) == pytest.approx(1.0 + CostAwareLength.SMOOTHING)
    assert lengths.choose(12, 2) <= 7  # never more than k_max


def test_speculative_greedy_sizes_a_free_drafts_rounds_by_cost_and_stays_exact():
    """A free draft that is always right is verified k_max proposals a round (on a tiny model 8 rows cost far
    less than 8 steps); prompt lookup's output equals plain greedy's."""
    model = load_model("tiny-llama").model
    prompt = torch.tensor(list(b"the cat sat on the mat. the cat sat on the mat. the cat"))
    n = 60
    plain = greedy(model, prompt, n, engine="lean").tokens.tolist()

    class Oracle:
        free, match = True, 4

        def propose(self, tokens, k):
            done = len(tokens) - prompt.numel()
            return plain[done:done + k]

    gen, stats = speculative_greedy(model, prompt, n, Oracle())
    assert gen.tokens.tolist() == plain and stats.acceptance == 1.0
    assert stats.lengths[1:-1] and all(length == K_MAX for length in stats.lengths[1:-1])
    gen, stats = speculative_greedy(model, prompt, n, PromptLookup())
    assert gen.tokens.tolist() == plain and stats.rounds < n
