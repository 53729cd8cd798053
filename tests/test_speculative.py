"""Speculative greedy decoding reproduces plain greedy token for token, for every draft source."""

import pytest
import torch

from effspec.generate import greedy
from effspec.models import load_model
from effspec.registry import get_step
from effspec.speculative import DraftDecoder, PromptLookup, speculative_greedy

# a prompt that repeats itself, so prompt lookup has matches to propose
PROMPT = torch.tensor(list(b"the cat sat on the mat. the cat sat on the mat. the cat"))


def test_prompt_lookup_proposes_what_followed_the_latest_match():
    look = PromptLookup(max_ngram=2)
    assert look.propose([1, 2, 3, 4, 1, 2, 5, 6, 1, 2], 3) == [5, 6, 1]  # latest "1 2" is followed by 5 6 1
    assert look.propose([1, 2, 3, 9], 2) == []  # no earlier 9, no earlier "3 9"
    assert look.propose([7, 8, 7], 4) == [8, 7]  # falls back to a 1-gram, stops at the end


@pytest.mark.parametrize("source", ["lookup", "self", "other-model", "itself"])
def test_speculative_greedy_is_plain_greedy(source):
    model = load_model("tiny-llama").model
    n = 40
    plain = greedy(model, PROMPT, n, engine="lean").tokens
    if source == "lookup":
        draft = PromptLookup()
    elif source == "self":
        draft = DraftDecoder.self_draft(model, PROMPT.numel() + n + 16, n_blocks=1)
    elif source == "other-model":
        draft = DraftDecoder(load_model("tiny-qwen2").model, PROMPT.numel() + n + 16)  # same byte vocabulary
    else:
        draft = DraftDecoder(model, PROMPT.numel() + n + 16)
    gen, stats = speculative_greedy(model, PROMPT, n, draft, k=4)
    assert torch.equal(gen.tokens, plain)
    assert stats.rounds < n  # at least one round kept more than one token
    if source == "itself":
        assert stats.acceptance == 1.0


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
