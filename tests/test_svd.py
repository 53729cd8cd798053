"""svd and asvd: factorization against the definitions, activation awareness, and real savings."""

import pytest
import torch

from effspec.errors import UserError
from effspec.measure.size import size
from effspec.models import load_model
from effspec.registry import get_step
from effspec.steps.lowrank.svd import LowRankLinear, factorize, rank_for

CALIB = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(0))


def test_full_rank_reproduces_the_layer_and_truncation_is_eckart_young():
    W = torch.randn(24, 40, generator=torch.Generator().manual_seed(0))
    A, B = factorize(W, 24)
    assert torch.allclose(B @ A, W, atol=1e-5)
    A, B = factorize(W, 5)
    S = torch.linalg.svdvals(W.double())
    assert ((B @ A - W).double().norm() ** 2).item() == pytest.approx((S[5:] ** 2).sum().item(), rel=1e-4)


def test_activation_aware_beats_plain_svd_on_output_error_at_equal_rank():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(32, 64, generator=g)
    X = torch.randn(4096, 64, generator=g) * torch.exp(2 * torch.randn(64, generator=g))  # uneven channels
    s = X.abs().mean(0).pow(0.5)
    A, B = factorize(W, 12)
    As, Bs = factorize(W, 12, s)
    err = lambda W_hat: ((X @ (W - W_hat).t()) ** 2).sum().item()  # noqa: E731
    assert err(Bs @ As) < 0.8 * err(B @ A)
    A1, B1 = factorize(W, 32, s)  # full rank: scaling folds back exactly
    assert torch.allclose(B1 @ A1, W, atol=1e-4)


@pytest.mark.parametrize("step", ["svd", "asvd"])
def test_steps_shrink_the_model_and_round_trip(step, reloads_same):
    lm = load_model("tiny-llama")
    before = size(lm.model)
    info = get_step(step)
    model = info.apply(lm.model, info.config(ratio=0.6), CALIB)
    layers = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert len(layers) == 14
    for m in layers:
        assert m.rank == rank_for(m.in_features, m.out_features, 0.6)
        assert m.rank * (m.in_features + m.out_features) <= 0.6 * m.in_features * m.out_features
    after = size(model)
    assert after.linear_stored_bytes < 0.62 * before.linear_stored_bytes
    assert after.linear_params < 0.62 * before.linear_params  # factors counted once, by their own shapes
    reloads_same(model, lm.tokenizer, CALIB[:1])


def test_factors_can_be_quantized_afterwards(reloads_same):
    lm = load_model("tiny-llama")
    model = get_step("svd").apply(lm.model, get_step("svd").config(ratio=0.8))
    rtn = get_step("rtn")
    model = rtn.apply(model, rtn.config(bits=8, group_size=0))
    reloads_same(model, lm.tokenizer, CALIB[:1], atol=1e-5)


def test_bad_low_rank_configs():
    with pytest.raises(ValueError, match="ratio"):
        get_step("svd").config(ratio=1.0)
    with pytest.raises(UserError, match="rank 0"):
        get_step("svd").apply(load_model("tiny-llama").model, get_step("svd").config(ratio=0.01))
