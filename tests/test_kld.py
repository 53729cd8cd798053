"""KL divergence to the original against a full-vocabulary reference; bits/byte and word perplexity by hand."""

import math

import pytest
import torch

from effspec.cli import main
from effspec.data import TextSource
from effspec.measure import kld as kld_module
from effspec.measure.kld import KLDAccumulator, Reference, kl_topk
from effspec.measure.perplexity import TextNorm, perplexity
from effspec.models import fingerprint, load_model
from effspec.pipeline import Evaluation, MeasureConfig


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFSPEC_CACHE", str(tmp_path / "cache"))


def full_kl(p_logits, q_logits):
    p, q = torch.log_softmax(p_logits.double(), -1), torch.log_softmax(q_logits.double(), -1)
    return (p.exp() * (p - q)).sum(-1)


def test_topk_kl_equals_full_kl_when_k_covers_the_vocabulary():
    torch.manual_seed(0)
    p_logits, q_logits = torch.randn(7, 16), torch.randn(7, 16)
    p = torch.log_softmax(p_logits, -1).topk(16)
    kl, same, mass = kl_topk(p.values, p.indices.int(), torch.log_softmax(q_logits, -1))
    assert torch.allclose(kl.double(), full_kl(p_logits, q_logits), atol=1e-5)
    assert torch.equal(same, p_logits.argmax(-1) == q_logits.argmax(-1))
    assert torch.allclose(mass, torch.ones(7))


def test_topk_kl_with_a_tail_is_a_close_lower_bound():
    torch.manual_seed(1)
    p_logits = torch.randn(50, 400) * 4  # peaked, as a language model's next-token distribution
    q_logits = p_logits + 0.3 * torch.randn(50, 400)
    p = torch.log_softmax(p_logits, -1).topk(64)
    kl, _, mass = kl_topk(p.values, p.indices.int(), torch.log_softmax(q_logits, -1))
    exact = full_kl(p_logits, q_logits)
    assert (kl.double() <= exact + 1e-6).all()
    assert kl.sum() > 0.9 * exact.sum()


def _windows():
    return torch.randint(0, 257, (3, 48), generator=torch.Generator().manual_seed(0))


def test_kld_of_a_model_against_itself_is_zero_and_a_perturbed_copy_positive():
    model = load_model("tiny-llama").model
    windows = _windows()
    reference = Reference()
    perplexity(model, windows, [reference.record])
    same = KLDAccumulator(reference)
    perplexity(model, windows, [same])
    r = same.result()
    assert abs(r.kld_mean) < 1e-6 and r.top1_agreement == 1.0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    other = KLDAccumulator(reference)
    perplexity(model, windows, [other])
    r = other.result()
    assert r.kld_mean > 1e-4 and r.kld_p99 > r.kld_mean and r.top1_agreement < 1.0


def test_reference_is_cached_on_disk(monkeypatch):
    loaded = load_model("tiny-llama")
    source = TextSource("t", "the quick brown fox jumps over the lazy dog. " * 40)
    ev = Evaluation(loaded, source, MeasureConfig(windows=2, seqlen=64))
    fp = fingerprint(loaded.model)
    assert ev.cached_reference(fp) is None
    built = ev.build_reference(loaded.model, fp)
    calls = []
    monkeypatch.setattr(kld_module.Reference, "record", lambda *a: calls.append(a))
    again = ev.build_reference(loaded.model, fp)
    assert not calls and all(torch.equal(a, b) for a, b in zip(again.logp, built.logp))


def test_bits_per_byte_and_word_perplexity_by_hand():
    loaded = load_model("tiny-llama")  # byte tokenizer: one token per byte
    text = "ab cd ef gh " * 20
    windows = torch.tensor([list(text.encode())[:32], list(text.encode())[32:64]])
    p = perplexity(loaded.model, windows)
    norm = TextNorm.of(loaded.tokenizer, windows)
    assert norm.bytes == 62  # 31 predicted bytes per window
    words = sum(len(bytes(w[1:].tolist()).decode().split()) for w in windows)
    figures = norm.figures(p)
    total = p.nll * p.eval_tokens
    assert figures["bits_per_byte"] == pytest.approx(total / math.log(2) / 62)
    assert figures["word_perplexity"] == pytest.approx(math.exp(total / words))


def test_cli_kld_orders_bit_widths(tmp_path, capsys):
    import json

    data = tmp_path / "t.txt"
    data.write_text("Some text for the tiny model to score, repeated with small changes. " * 60)
    flags = ["--data", str(data), "--windows", "2", "--seqlen", "128", "--measure", "perplexity", "--kld", "--json"]
    figures = {}
    for recipe in ("rtn-w8", "rtn-w4-g64", "rtn-w3-g64"):
        assert main(["run", recipe, "--model", "tiny-llama", "--out", str(tmp_path / recipe), *flags[:6],
                     "--kld", "--json", "--runs", "1", "--new-tokens", "4", "--prefill-tokens", "32"]) == 0
        figures[recipe] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        # eval of the saved model finds its original through effspec.json
        assert main(["eval", str(tmp_path / recipe), *flags]) == 0
        again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert again["kld_mean"] == pytest.approx(figures[recipe]["kld_mean"], rel=1e-5, abs=1e-9)
    assert figures["rtn-w8"]["kld_mean"] < figures["rtn-w4-g64"]["kld_mean"] < figures["rtn-w3-g64"]["kld_mean"]
    assert figures["rtn-w8"]["top1_agreement"] >= figures["rtn-w3-g64"]["top1_agreement"]
