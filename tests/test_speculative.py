"""Speculative greedy decoding reproduces plain greedy token for token, for every draft source; speculative
sampling emits tokens distributed as the target's (statistically, on a tiny vocabulary) and is greedy at
temperature 0."""

import pytest
import torch

from effspec.generate import SamplingConfig, greedy
from effspec.models import load_model
from effspec.registry import get_step
from effspec.speculative import (Branches, DraftDecoder, PromptLookup, accepted_path, frequent_tokens, greedy_path,
                                 merge_trees, speculative_greedy, speculative_sampling, speculative_step, with_tokens)

# a prompt that repeats itself, so prompt lookup has matches to propose
PROMPT = torch.tensor(list(b"the cat sat on the mat. the cat sat on the mat. the cat"))


def test_prompt_lookup_proposes_what_followed_the_latest_match():
    look = PromptLookup(max_ngram=2)
    assert look.propose([1, 2, 3, 4, 1, 2, 5, 6, 1, 2], 3) == [5, 6, 1]  # latest "1 2" is followed by 5 6 1
    assert look.propose([1, 2, 3, 9], 2) == []  # no earlier 9, no earlier "3 9"
    assert look.propose([7, 8, 7], 4) == [8, 7]  # falls back to a 1-gram, stops at the end


def draft_for(source: str, model, n: int, other=None):
    """A draft of each kind for `n` new tokens after PROMPT: prompt lookup, the first block (with the whole
    vocabulary, or the prompt's 6 most frequent tokens, so some of the target's tokens are out of its reach),
    another model, the target itself (which must accept everything)."""
    room = PROMPT.numel() + n + 16
    if source == "lookup":
        return PromptLookup()
    if source == "self":
        return DraftDecoder.self_draft(model, room, n_blocks=1)
    if source == "self-vocab":
        return DraftDecoder.self_draft(model, room, n_blocks=1, vocab=frequent_tokens([PROMPT], 6))
    return DraftDecoder(other if source == "other-model" else model, room)


@pytest.mark.parametrize("source", ["lookup", "self", "self-vocab", "other-model", "itself"])
def test_speculative_greedy_is_plain_greedy(source):
    model = load_model("tiny-llama").model
    n = 40
    plain = greedy(model, PROMPT, n, engine="lean").tokens
    other = load_model("tiny-qwen2").model if source == "other-model" else None  # same byte vocabulary
    gen, stats = speculative_greedy(model, PROMPT, n, draft_for(source, model, n, other), k=4)
    assert torch.equal(gen.tokens, plain)
    assert stats.rounds < n  # at least one round kept more than one token
    if source == "itself":
        assert stats.acceptance == 1.0


def test_accepted_path_follows_the_child_that_is_the_targets_argmax():
    #          row: 0  1  2  3  4  5
    ids, parents = [9, 4, 6, 5, 7, 8], [-1, 0, 1, 0, 3, 4]  # 0 -> 1 -> 2 and 0 -> 3 -> 4 -> 5
    assert accepted_path(ids, parents, [5, 0, 0, 7, 1, 0]) == [0, 3, 4]  # 5 at row 0 is row 3; then 7: row 4
    assert accepted_path(ids, parents, [4, 6, 2, 0, 0, 0]) == [0, 1, 2]  # a chain, as plain speculation
    assert accepted_path(ids, parents, [3, 0, 0, 0, 0, 0]) == [0]  # no child is 3
    assert accepted_path([9, 4, 5], [-1, 0, 0], [5, 5, 1]) == [0, 2]  # a sibling after the first child


class SiblingOracle:
    """A tree draft that knows the greedy continuation `truth`: a wrong first token with a wrong child, then the
    right first token as its sibling with the next right tokens below it -- so every round's kept path runs
    through rows the verify placed after the rejected ones, and the cache must be compacted to stay right."""

    def __init__(self, truth: list[int], vocab: int):
        self.truth, self.vocab = truth, vocab

    def propose_tree(self, tokens: list[int], k: int) -> tuple[list[int], list[int]]:
        right = self.truth[len(tokens):len(tokens) + k]
        if not right:
            return [], []
        wrong = (right[0] + 1) % self.vocab
        return [wrong, wrong] + right, [-1, 0, -1] + list(range(2, len(right) + 1))


def test_speculative_greedy_over_a_tree_keeps_the_right_branch_and_stays_exact():
    model = load_model("tiny-llama").model
    n = 40
    plain = greedy(model, PROMPT, n, engine="lean").tokens
    truth = PROMPT.tolist() + plain.tolist()
    gen, stats = speculative_greedy(model, PROMPT, n, SiblingOracle(truth, model.config.vocab_size), k=3,
                                    adaptive=False)
    assert torch.equal(gen.tokens, plain)
    assert stats.rounds <= n // 4 + 1  # each round keeps the 3 right proposals and adds the target's next


def test_greedy_path_reads_row_0_then_only_the_subtree_of_its_kept_child():
    """A tree verify needs the target's argmax only along the walk: row 0, then the subtree below the child that
    is row 0's argmax; the path and those argmaxes are the ones of every row's, and a chain is read at once."""
    from effspec.decoder import LeanDecoder

    model = load_model("tiny-llama").model
    plain = greedy(model, PROMPT, 3, engine="lean").tokens.tolist()  # plain[1], plain[2]: right after plain[0]
    V = model.config.vocab_size
    wrong = (plain[1] + 1) % V
    cases = [  # (rows after the last kept token plain[0], their parents, argmax calls' row counts)
        ([wrong, plain[1], wrong, plain[2], wrong], [-1, -1, 0, 1, 1], [1, 3]),  # the kept child's subtree: 3 rows
        ([wrong, wrong, plain[1]], [-1, 0, -1], [1, 1]),
        ([wrong, (wrong + 1) % V], [-1, -1], [1]),  # no child kept: row 0 alone
        ([plain[1], plain[2], wrong], [-1, 0, 1], [4]),  # a chain: every row in one call
    ]
    for proposal, parents, calls in cases:
        target = LeanDecoder(model, 64)
        target.feed(PROMPT)
        if not target.screens_argmax():
            pytest.skip("no compiled kernels: no screen")
        rows, row_parents = [plain[0]] + proposal, [-1] + [p + 1 for p in parents]
        h = target.feed(torch.tensor(rows), last_only=False, parents=row_parents)
        every = target.argmax(h).tolist()
        seen = []
        argmax = target.argmax
        target.argmax = lambda x: seen.append(x.shape[0]) or argmax(x)
        path, pred = greedy_path(target, h, rows, row_parents)
        assert path == accepted_path(rows, row_parents, every) and seen == calls
        assert all(p is None or p == e for p, e in zip(pred, every)) and all(pred[r] is not None for r in path)


def test_merge_trees_shares_common_prefixes_and_cuts_at_the_budget():
    chain = ([5, 6, 7], [-1, 0, 1])
    fork = ([5, 6, 8, 9], [-1, 0, 1, 2])  # 5 6 in common with `chain`, then 8 9
    assert merge_trees([chain, fork, ([4], [-1])]) == ([5, 6, 7, 8, 9, 4], [-1, 0, 1, 1, 3, -1])
    assert merge_trees([chain, fork, ([4], [-1])], budget=4) == ([5, 6, 7, 8], [-1, 0, 1, 1])  # 9 and 4 left out
    assert merge_trees([([], []), chain]) == chain
    sib = ([1, 2, 3], [-1, -1, 1])  # a draft's own tree: 1 | 2 -> 3
    assert merge_trees([sib, ([2, 3, 4], [-1, 0, 1])]) == ([1, 2, 3, 4], [-1, -1, 1, 2])


def test_branches_of_lookup_and_a_self_draft_are_exact():
    model = load_model("tiny-llama").model
    n = 40
    plain = greedy(model, PROMPT, n, engine="lean").tokens
    room = PROMPT.numel() + n + 16
    both = Branches([PromptLookup(), DraftDecoder.self_draft(model, room, n_blocks=1)], budget=6)
    gen, stats = speculative_greedy(model, PROMPT, n, both, k=4)
    assert torch.equal(gen.tokens, plain)
    assert stats.rounds < n and max(stats.lengths) <= 6


def test_frequent_tokens_counts_breaks_ties_by_id_and_adds_the_always_ids():
    texts = [torch.tensor([5, 5, 5, 2, 2, 9]), torch.tensor([[9, 7, 3]])]  # 5: 3, 2: 2, 9: 2, 7: 1, 3: 1
    assert frequent_tokens(texts, 1).tolist() == [5]
    assert frequent_tokens(texts, 2).tolist() == [2, 5]  # 2 before 9: same count, smaller id
    assert frequent_tokens(texts, 3, always=[0, 5]).tolist() == [0, 2, 5, 9]
    assert frequent_tokens(texts, 50).tolist() == [2, 3, 5, 7, 9]  # never an id that does not occur
    with pytest.raises(ValueError):
        frequent_tokens(texts, 0)


def test_a_vocabulary_subset_head_gives_the_full_heads_logits_on_its_ids_and_minus_inf_elsewhere():
    from effspec.decoder import LeanDecoder

    model = untied("LlamaConfig")
    keep = torch.tensor([200, 3, 17, 3, 256, 40])  # unsorted, with a repeat
    with torch.inference_mode():
        full = LeanDecoder(model, PROMPT.numel() + 2).forward(PROMPT, last_only=False)
        sub = LeanDecoder(model, PROMPT.numel() + 2, vocab=keep)
        part = sub.forward(PROMPT[:-3], last_only=False)
        part = torch.cat([part, sub.forward(PROMPT[-3:], last_only=False)])  # prefill, then a few-row step
    ids = keep.unique()
    torch.testing.assert_close(part[:, ids], full[:, ids], rtol=1e-5, atol=1e-5)
    outside = torch.ones(full.shape[1], dtype=torch.bool)
    outside[ids] = False
    assert torch.isneginf(part[:, outside]).all()
    rtn = get_step("rtn")
    packed_head = rtn.apply(untied("LlamaConfig"), rtn.config(bits=8, group_size=0, ignore=()))
    with pytest.raises(ValueError, match="plain float head"):
        LeanDecoder(packed_head, 8, vocab=keep)


def test_speculative_greedy_with_packed_target_and_fixed_k():
    step = get_step("rtn")
    model = step.apply(load_model("tiny-llama").model, step.config(bits=4, group_size=32))
    plain = greedy(model, PROMPT, 30, engine="lean").tokens
    draft = DraftDecoder.self_draft(model, PROMPT.numel() + 50, n_blocks=1)
    gen, stats = speculative_greedy(model, PROMPT, 30, draft, k=3, adaptive=False)
    assert torch.equal(gen.tokens, plain)
    assert set(stats.lengths) <= {1, 2, 3}


def test_speculative_greedy_stops_at_eos():
    model = load_model("tiny-llama").model
    plain = greedy(model, PROMPT, 30, engine="lean").tokens.tolist()
    eos = plain[7]
    gen, _ = speculative_greedy(model, PROMPT, 30, PromptLookup(), eos_token_id=eos)
    assert gen.tokens.tolist() == plain[: plain.index(eos) + 1]


# ---- speculative sampling ------------------------------------------------------------------------
def untied(config_name: str):
    """A random seeded byte-vocabulary model with its own head (the builtin tiny ones mostly repeat their last
    token), at 10x the default weight scale so logit gaps stay well above float rounding."""
    import transformers

    cfg = getattr(transformers, config_name)(vocab_size=257, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             tie_word_embeddings=False, eos_token_id=256, pad_token_id=256,
                                             bos_token_id=256, initializer_range=0.2)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def letters(ids: list[int]) -> str:
    return "".join(chr(0x100 + i) for i in ids)


def _rows(seed: int, n: int, V: int) -> torch.Tensor:
    return (torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * 1.5).softmax(-1)


@pytest.mark.parametrize("draft_kind", ["sampled", "sampled-missing-the-mode", "deterministic"])
def test_speculative_step_emits_tokens_distributed_as_the_target(draft_kind):
    """The papers' correctness claim, empirically: whatever q is, the first emitted token follows p_1, and the
    second (emitted when the first draft token was accepted) follows p_2."""
    V, k, trials = 6, 3, 20000
    p = _rows(0, k + 1, V)
    q = _rows(1, k, V)  # deliberately not p
    if draft_kind == "sampled-missing-the-mode":  # q never proposes p_1's likeliest token: only the residual can
        q[0, p[0].argmax()] = 0
        q[0] /= q[0].sum()
    if draft_kind == "deterministic":  # prompt lookup: the proposal is fixed, q its one-hot
        q = torch.nn.functional.one_hot(p[:k].argmin(-1), V).float()
    g = torch.Generator().manual_seed(123)
    first, second = torch.zeros(V), torch.zeros(V)
    for _ in range(trials):
        draft = torch.multinomial(q, 1, generator=g)[:, 0].tolist()
        out = speculative_step(p, q, draft, g)
        assert 1 <= len(out) <= k + 1 and out[:-1] == draft[: len(out) - 1]
        first[out[0]] += 1
        if len(out) > 1:
            second[out[1]] += 1
    for counts, target in ((first, p[0]), (second, p[1])):
        n = counts.sum()
        chi2 = float(((counts - n * target) ** 2 / (n * target)).sum())
        assert chi2 < 20.5, (counts / n, target)  # the 0.999 quantile of chi-square with 5 degrees of freedom
        assert float((counts / n - target).abs().max()) < 0.02


def test_speculative_step_with_equal_distributions_accepts_everything():
    p = _rows(2, 4, 8)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        draft = torch.multinomial(p[:3], 1, generator=g)[:, 0].tolist()
        assert speculative_step(p, p[:3], draft, g)[:3] == draft


@pytest.mark.parametrize("source", ["lookup", "self", "self-vocab", "other-model"])
@pytest.mark.parametrize("temperature", [0.0, 1e-5])
def test_speculative_sampling_as_temperature_goes_to_0_is_greedy(source, temperature):
    model = untied("LlamaConfig")
    n = 40
    plain = greedy(model, PROMPT, n, engine="lean").tokens
    other = untied("Qwen2Config") if source == "other-model" else None
    config = SamplingConfig(temperature=temperature, top_k=50, top_p=0.9, seed=0)
    gen, stats = speculative_sampling(model, PROMPT, n, draft_for(source, model, n, other), config, k=4)
    assert torch.equal(gen.tokens, plain)
    assert stats.proposed > 0 or source == "lookup"


def test_speculative_sampling_is_seeded_and_a_model_drafting_for_itself_is_always_accepted():
    model = untied("LlamaConfig")
    config = SamplingConfig(temperature=1.0, seed=5)

    def run(draft_model, seed=5):
        draft = DraftDecoder(draft_model, PROMPT.numel() + 60)
        return speculative_sampling(model, PROMPT, 40, draft, SamplingConfig(temperature=1.0, seed=seed), k=4)

    a, stats = run(model)
    assert stats.acceptance > 0.95  # q = p up to float rounding between one-row and k-row forwards
    assert torch.equal(run(model)[0].tokens, a.tokens)
    assert not torch.equal(run(model, seed=6)[0].tokens, a.tokens)
    b, other = run(untied("Qwen2Config"))
    assert b.tokens.numel() == 40 and other.acceptance < 0.5  # an unrelated draft: mostly rejected
    look, _ = speculative_sampling(model, PROMPT, 40, PromptLookup(), config)
    assert look.tokens.numel() == 40


@pytest.mark.parametrize("spec", ["greedy", "sampling"])
def test_speculative_stop_strings_eos_and_streaming(spec):
    model = untied("LlamaConfig")
    plain = greedy(model, PROMPT, 40, engine="lean").tokens.tolist()
    full = letters(plain)
    draft = DraftDecoder.self_draft(model, PROMPT.numel() + 60, n_blocks=1)
    seen = []
    if spec == "greedy":
        gen, _ = speculative_greedy(model, PROMPT, 40, draft, on_token=seen.append)
        assert gen.tokens.tolist() == plain
    else:
        stop = full[9:11]
        at = full.index(stop)
        gen, _ = speculative_sampling(model, PROMPT, 40, draft, SamplingConfig(stop=(stop,)), decode=letters,
                                      on_token=seen.append)
        assert gen.text == full[:at] and gen.tokens.tolist() == plain[: at + 2]
        eos = plain[12]
        ended, _ = speculative_sampling(model, PROMPT, 40, draft, SamplingConfig(), eos_token_id=eos)
        assert ended.tokens.tolist() == plain[: plain.index(eos) + 1]
    assert seen == gen.tokens.tolist()


@pytest.mark.parametrize("max_n,min_n", [(3, 1), (12, 1), (5, 2)])
def test_prompt_lookup_index_equals_a_backward_scan_as_the_text_grows(max_n, min_n):
    """The indexed look-up proposes what a plain backward scan over the whole text proposes -- the latest match of
    the longest suffix, max_n..min_n tokens -- round after round of a growing text, and after the text is replaced
    by another."""
    def scan(tokens, k):  # (proposal, length of the match)
        for n in range(max_n, min_n - 1, -1):
            if len(tokens) <= n:
                continue
            for start in range(len(tokens) - n - 1, -1, -1):
                if tokens[start:start + n] == tokens[-n:]:
                    return tokens[start + n:start + n + k], n
        return [], 0

    g = torch.Generator().manual_seed(0)
    look = PromptLookup(max_n, min_n)
    for text in (torch.randint(0, 6, (300,), generator=g).tolist(), torch.randint(0, 4, (120,), generator=g).tolist(),
                 torch.randint(0, 2, (200,), generator=g).tolist()):
        end = 1
        while end <= len(text):
            proposal, n = scan(text[:end], 5)
            assert look.propose(text[:end], 5) == proposal and look.match == n, end
            end += int(torch.randint(1, 4, (1,), generator=g))  # 1-3 tokens a round, as accepted tokens arrive


def test_with_tokens_adds_the_prompts_tokens_to_a_restricted_head_only():
    assert with_tokens(None, [1, 2]) is None  # the whole vocabulary stays whole
    assert with_tokens(torch.tensor([9, 4]), [4, 7, 0]).tolist() == [0, 4, 7, 9]
