"""Perplexity against a hand-computed reference; size and speed records on a tiny model."""

import math

import pytest
import torch
from torch import nn

from effspec.measure.perplexity import perplexity
from effspec.measure.size import size
from effspec.measure.speed import speed
from effspec.models import load_model


class Bigram(nn.Module):
    """A model whose next-token distribution we can write down: softmax(table[token])."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, ids, use_cache=False):
        class Out:
            logits = self.table[ids]

        return Out()


def test_perplexity_matches_hand_computation():
    torch.manual_seed(0)
    table = torch.randn(5, 5)
    windows = torch.tensor([[0, 1, 2, 3], [4, 4, 0, 2]])
    logp = torch.log_softmax(table.double(), -1)
    nll = [-logp[w[i], w[i + 1]] for w in windows for i in range(3)]
    expected = math.exp(sum(nll) / 6)
    result = perplexity(Bigram(table), windows)
    assert result.perplexity == pytest.approx(expected, rel=1e-6)
    assert (result.eval_tokens, result.eval_windows, result.eval_seqlen) == (6, 2, 4)


def test_perplexity_of_a_real_tiny_model_matches_transformers_loss():
    model = load_model("tiny-llama").model
    torch.manual_seed(1)
    windows = torch.randint(0, 257, (3, 32))
    with torch.no_grad():
        losses = [model(w[None], labels=w[None]).loss for w in windows]
    assert perplexity(model, windows).perplexity == pytest.approx(math.exp(sum(losses).item() / 3), rel=1e-5)


def test_size_counts_tied_weights_once():
    model = load_model("tiny-llama").model
    s = size(model)
    unique = {p.data_ptr(): p for p in model.parameters()}.values()
    assert s.params == sum(p.numel() for p in unique)
    assert s.stored_bytes == 4 * s.params and s.bits_per_param == 32


def test_speed_record_is_plausible():
    model = load_model("tiny-llama").model
    s = speed(model, torch.randint(0, 257, (200,)), prompt_tokens=16, new_tokens=8, prefill_tokens=64, runs=2)
    assert s.decode_tokens_per_s > 0 and s.prefill_tokens_per_s > 0
    assert (s.prompt_tokens, s.new_tokens, s.prefill_tokens, s.runs) == (16, 8, 64, 2)
    assert s.peak_rss_bytes > 10_000_000
