"""EAGLE draft head: its training forward is the block the decoder runs, training lowers the loss and lifts the
first proposal's agreement with the target, speculative decoding with it reproduces plain greedy token for
token (and sampling at temperature -> 0 too), and it saves, reloads and refuses a model it was not made for."""

import pytest
import torch

from effspec.decoder import LeanDecoder
from effspec.eagle import EagleConfig, EagleDraft, EagleHead, pack_rows, target_features, train_eagle
from effspec.generate import SamplingConfig, greedy
from effspec.layers import QuantLinear
from effspec.models import load_model
from effspec.speculative import frequent_tokens, speculative_greedy, speculative_sampling

PROMPT = torch.tensor(list(b"the cat sat on the mat. the dog sat on the log. the cat"))


def peaked(scale=20.0):
    """The tiny model with its (tied) embedding scaled up, so its next-token choices are clear-cut rather than
    argmaxes of near-flat logits, and random token rows for training: a task a draft can learn in seconds."""
    model = load_model("tiny-llama").model
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(scale)
    return model, torch.randint(0, 257, (40, 32), generator=torch.Generator().manual_seed(0))


def test_training_forward_equals_the_decoder_running_the_draft_token_by_token():
    model = load_model("tiny-llama").model
    head = EagleHead(model, seed=1)
    ids = PROMPT[None, :12]
    f, _ = target_features(model, ids)
    x = head.inputs(model, ids[:, 1:], f[:, :-1])  # (1, 11, d)
    from effspec.eagle import _rotary

    cos, sin = _rotary(model, 11)
    batch, kv = head.train_forward(x, cos, sin)
    lean = LeanDecoder(head.view(model), 16)
    rows = [lean.hidden(x[0, :5], last_only=False)] + [lean.hidden(x[0, t:t + 1]) for t in range(5, 11)]
    torch.testing.assert_close(torch.cat(rows), batch[0], atol=1e-5, rtol=1e-4)
    # the second proposal of every position at once: slot j + 1 fed the first pass's prediction, after slots 0..j
    x2 = head.inputs(model, ids[:, 2:], batch[:, :-1])  # (1, 10, d)
    ahead = head.train_ahead(x2, kv, cos, sin)[0]
    for j in (0, 4, 9):
        lean.cache.length = 0
        lean.hidden(x[0, : j + 1], last_only=False)
        torch.testing.assert_close(lean.hidden(x2[0, j:j + 1])[0], ahead[j], atol=1e-5, rtol=1e-4)


def test_training_lowers_the_loss_and_lifts_the_first_proposals_agreement():
    from effspec.eagle import agreement

    model, rows = peaked()
    flags = [p.requires_grad for p in model.parameters()]
    head, tlog = train_eagle(model, rows, EagleConfig(steps=60, batch_size=4, lr=3e-3, warmup=5, vocab=0, holdout=0.2))
    assert [p.requires_grad for p in model.parameters()] == flags  # the target is left as it was
    assert tlog.losses[-1] < 0.3 * tlog.losses[0]
    feats, greedy_next = target_features(model, rows)
    untrained = agreement(EagleHead(model, seed=0).eval(), model, rows, feats, greedy_next)
    assert untrained < 0.05 and tlog.agreement > 0.6


@pytest.mark.parametrize("case", ["trained", "untrained-subset"])
def test_speculative_greedy_and_cold_sampling_with_an_eagle_draft_are_plain_greedy(case):
    """A trained head on the peaked model (most proposals kept), and an untrained head over 8 tokens on the
    plain tiny model (most rejected): either way the output is the target's own."""
    if case == "trained":
        model, rows = peaked()
        head, _ = train_eagle(model, rows, EagleConfig(steps=120, batch_size=4, lr=3e-3, warmup=5, vocab=0))
    else:
        model = load_model("tiny-llama").model
        head = EagleHead(model, vocab=frequent_tokens([PROMPT], 8), seed=3).eval()
    n = 40
    plain = greedy(model, PROMPT, n, engine="lean").tokens
    gen, stats = speculative_greedy(model, PROMPT, n, EagleDraft(head, model, PROMPT.numel() + n + 16), k=4)
    assert torch.equal(gen.tokens, plain)
    if case == "trained":
        assert stats.acceptance > 0.5 and stats.rounds < n
    wide = EagleDraft(head, model, PROMPT.numel() + n + 16, width=3)
    tree, _ = speculative_greedy(model, PROMPT, n, wide, k=4)
    assert torch.equal(tree.tokens, plain)
    cold = SamplingConfig(temperature=1e-4, seed=0)
    gen, _ = speculative_sampling(model, PROMPT, n, EagleDraft(head, model, PROMPT.numel() + n + 16), cold, k=4)
    assert torch.equal(gen.tokens, plain)


def test_a_wide_draft_proposes_its_chain_then_its_next_likeliest_first_tokens():
    model = load_model("tiny-llama").model
    head = EagleHead(model, vocab=frequent_tokens([PROMPT], 8), seed=3).eval()
    feats = torch.randn(PROMPT.numel() - 1, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    drafts = [EagleDraft(head, model, 64, width=w, bits=None) for w in (3, 1, 1, 1)]
    for d in drafts:
        d.observe(feats)
    tokens = PROMPT.tolist()
    ids, parents = drafts[0].propose_tree(tokens, 3)
    assert ids[:3] == drafts[1].propose(tokens, 3) and parents == [-1, 0, 1, -1, -1]
    f, _ = drafts[2]._catch_up(tokens, 1)
    logits = drafts[2].lean.logits(f)[-1]  # the whole vocabulary's row, -inf outside the head's tokens
    assert ids[0] == int(logits.argmax())
    assert set(ids[3:]) == set(logits.topk(3).indices.tolist()) - {ids[0]}  # the 2nd and 3rd likeliest
    assert drafts[3].propose_tree(tokens, 3) == (ids[:3], [-1, 0, 1])  # width 1: the plain chain


def test_an_8_bit_draft_runs_on_codes_and_still_decodes_exactly():
    """The default draft runs its FC and block as 8-bit codes (a copy: the head keeps its float
    weights); its proposals are near the float draft's, and speculative greedy output is plain greedy's."""
    model = load_model("tiny-llama").model
    head = EagleHead(model, vocab=frequent_tokens([PROMPT], 8), seed=3).eval()
    draft = EagleDraft(head, model, PROMPT.numel() + 40)
    if draft.bits is None:
        pytest.skip("no compiled kernels: the draft stays float")
    coded_layers = [m for m in draft.head.modules() if isinstance(m, QuantLinear)]
    assert len(coded_layers) == 8 and all(m.grid.bits == 8 and m.qweight.dtype == torch.uint8 for m in coded_layers)
    assert type(head.fc) is torch.nn.Linear and head.fc.weight.dtype == torch.float32  # the head itself untouched
    feats = torch.randn(PROMPT.numel() - 1, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    plain = EagleDraft(head, model, 64, bits=None)
    coded = EagleDraft(head, model, 64)
    for d in (plain, coded):
        d.observe(feats)
    f_plain, _ = plain._catch_up(PROMPT.tolist(), 1)
    f_coded, _ = coded._catch_up(PROMPT.tolist(), 1)
    assert 0 < (f_coded - f_plain).norm() < 0.05 * f_plain.norm()  # rounded, and close
    n = 24
    want = greedy(model, PROMPT, n).tokens
    gen, _ = speculative_greedy(model, PROMPT, n, EagleDraft(head, model, PROMPT.numel() + n + 16), k=4)
    assert torch.equal(gen.tokens, want)


def test_a_draft_must_see_the_features_of_every_token_but_the_newest():
    model = load_model("tiny-llama").model
    draft = EagleDraft(EagleHead(model), model, 64)
    draft.observe(torch.zeros(3, model.config.hidden_size))
    with pytest.raises(ValueError, match="features of 3"):
        draft.propose([1, 2, 3, 4, 5], 2)
    assert len(draft.propose([1, 2, 3, 4], 2)) == 2


def test_save_and_load_round_trip_and_refuse_another_model(tmp_path):
    model = load_model("tiny-llama").model
    head = EagleHead(model, vocab=torch.tensor([5, 3, 9]), seed=2)
    head.save(tmp_path / "e", {"trained": "test"})
    back = EagleHead.load(model, tmp_path / "e")
    assert back.vocab.tolist() == [3, 5, 9]
    for (name, a), (_, b) in zip(head.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), name
    other = load_model("tiny-qwen2").model
    with pytest.raises(ValueError, match="model_type"):
        EagleHead.load(other, tmp_path / "e")
    with pytest.raises(ValueError, match="not an EAGLE head"):
        EagleHead.load(model, tmp_path)


def test_config_rejects_bad_fields():
    with pytest.raises(ValueError, match="steps"):
        EagleConfig(steps=0)
    with pytest.raises(ValueError, match="holdout"):
        EagleConfig(holdout=1.0)
    with pytest.raises(ValueError, match="unroll"):
        EagleConfig(unroll=3)
    with pytest.raises(ValueError, match="lr: expected a positive number, got 0"):
        EagleConfig(lr=0)
    with pytest.raises(ValueError, match="vocab"):
        EagleConfig(vocab=-1)
