"""svd and asvd: factorization against the definitions, activation awareness, and real savings."""

import pytest
import torch

from effspec.errors import UserError
from effspec.measure.size import size
from effspec.models import load_model
from effspec.registry import get_step
from effspec.steps.lowrank.svd import LowRankLinear, factorize, rank_for, whitening

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


def test_whitened_truncation_is_the_best_rank_r_output_approximation():
    g = torch.Generator().manual_seed(2)
    W = torch.randn(32, 64, generator=g)
    mix = torch.randn(64, 64, generator=g) / 8 + torch.eye(64)
    X = (torch.randn(4096, 64, generator=g) @ mix) * torch.exp(torch.randn(64, generator=g))  # correlated, uneven
    L = whitening(X.t() @ X / X.shape[0], 1e-6)
    assert torch.allclose(L @ L.t(), X.t() @ X / X.shape[0], rtol=1e-3, atol=1e-3)
    err = lambda W_hat: ((X.double() @ (W - W_hat).t().double()) ** 2).sum().item()  # noqa: E731
    A, B = factorize(W, 12, L)
    # the reference: Eckart-Young on the outputs W X^T themselves, mapped back through X's pseudo-inverse
    U, S, Vh = torch.linalg.svd(X.double() @ W.t().double(), full_matrices=False)
    best = ((U[:, :12] * S[:12]) @ Vh[:12]).t() @ torch.linalg.pinv(X.double()).t()
    assert err(B @ A) == pytest.approx(err(best), rel=1e-3)
    As, Bs = factorize(W, 12, X.abs().mean(0).pow(0.5))  # ASVD's diagonal scaling
    assert err(B @ A) < err(Bs @ As) and err(B @ A) < err(factorize(W, 12)[1] @ factorize(W, 12)[0])
    A1, B1 = factorize(W, 64, L)  # full rank: the whitening folds back exactly
    assert torch.allclose(B1 @ A1, W, atol=1e-3)


def test_whitened_asvd_step_beats_plain_svd_on_each_layers_calibration_outputs(reloads_same):
    lm = load_model("tiny-llama")
    ids = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(3))
    inputs = {}  # every layer's calibration inputs in the dense model
    def keep(name):
        def hook(module, args):
            inputs[name] = args[0].reshape(-1, args[0].shape[-1])
        return hook

    hooks = [m.register_forward_pre_hook(keep(n))
             for n, m in lm.model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    with torch.no_grad():
        lm.model(ids)
    for h in hooks:
        h.remove()
    dense = {n: lm.model.get_submodule(n).weight.detach().clone() for n in inputs}
    models = {}
    for step, fields in (("svd", {}), ("asvd", {"scaling": "whiten"})):
        info = get_step(step)
        models[step] = info.apply(load_model("tiny-llama").model, info.config(ratio=0.6, **fields), ids)
    for n, X in inputs.items():
        err = {step: ((X @ (dense[n] - m.get_submodule(n).weight).t()) ** 2).sum().item() for step, m in models.items()}
        assert models["asvd"].get_submodule(n).rank == rank_for(X.shape[1], dense[n].shape[0], 0.6)
        assert err["asvd"] < err["svd"], n
    reloads_same(models["asvd"], lm.tokenizer, ids[:1])


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


# ---- ASVD's sensitivity-based rank search ---------------------------------------------------------
def test_choose_ratios_takes_the_smallest_threshold_within_budget():
    from effspec.steps.lowrank.rank_search import choose_ratios

    # layer "a" barely cares about truncation, "b" cares a lot; both cost 100 * ratio parameters
    sens = {"a": {0.5: 2.01, 0.8: 2.00}, "b": {0.5: 3.0, 0.8: 2.2}}
    params = {n: (lambda r: int(100 * r)) for n in sens}
    assert choose_ratios(sens, params, budget=200) == {"a": 0.8, "b": 1.0}  # tau 2.00: b stays dense, 180 fits
    assert choose_ratios(sens, params, budget=150) == {"a": 0.5, "b": 1.0}  # the insensitive layer pays first
    assert choose_ratios(sens, params, budget=130) == {"a": 0.5, "b": 0.8}
    assert choose_ratios(sens, params, budget=10) == {"a": 0.5, "b": 0.5}  # nothing fits: the smallest candidates


def test_sensitivities_are_the_loss_with_one_layer_truncated():
    from effspec.steps.lowrank.rank_search import sensitivities
    from effspec.surgery import linear_layers

    model = load_model("tiny-llama").model
    every = linear_layers(model, ("*",), ("lm_head",))
    first, last = next(iter(every)), list(every)[-1]  # block 0, and the last block (the earlier blocks skipped)
    assert first.startswith("model.layers.0.") and not last.startswith("model.layers.0.")
    layers = {first: every[first], last: every[last]}
    stand_in = lambda n, layer, r: LowRankLinear.from_factors(  # noqa: E731
        *factorize(layer.weight.detach(), rank_for(layer.in_features, layer.out_features, r)), layer.bias)
    sens = sensitivities(model, layers, CALIB, (0.3, 0.7), stand_in)
    assert all(model.get_submodule(n) is layer for n, layer in layers.items())  # every layer put back
    for name, lin in layers.items():  # the reference: truncate by hand, then the plain mean NLL of every row
        parent, leaf = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), leaf, stand_in(name, lin, 0.3))
        with torch.no_grad():
            nll = sum(torch.nn.functional.cross_entropy(model(r[None]).logits[0, :-1], r[1:], reduction="sum").item()
                      for r in CALIB)
        setattr(model.get_submodule(parent), leaf, lin)
        assert sens[name][0.3] == pytest.approx(nll / (CALIB.numel() - len(CALIB)), rel=1e-5), name


def test_asvd_rank_search_meets_the_budget_with_uneven_ranks(reloads_same):
    lm = load_model("tiny-llama")
    info = get_step("asvd")
    total = sum(m.in_features * m.out_features for n, m in lm.model.named_modules()
                if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head"))
    cfg = info.config(ratio=0.6, rank_search="sensitivity", search_ratios=(0.3, 0.5, 0.7, 0.9), search_rows=2,
                      search_tokens=16)
    model = info.apply(lm.model, cfg, CALIB)
    factored = {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    dense = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")
             and n.rsplit(".", 1)[0] not in factored]  # left as they were (the factors' own A and B excluded)
    kept = sum(m.rank * (m.in_features + m.out_features) for m in factored.values())
    kept += sum(m.in_features * m.out_features for m in dense)
    ranks = {round(m.rank / rank_for(m.in_features, m.out_features, 1.0), 1) for m in factored.values()}
    assert 0.45 * total < kept <= 0.6 * total
    assert len(ranks) > 1  # the layers did not all get the same ratio
    reloads_same(model, lm.tokenizer, CALIB[:1])


def test_bad_rank_search_configs():
    cfg = get_step("asvd").config
    with pytest.raises(ValueError, match="rank_search"):
        cfg(rank_search="greedy")
    with pytest.raises(ValueError, match="search_ratios"):
        cfg(ratio=0.4, rank_search="sensitivity")  # no candidate at or below 0.4
    with pytest.raises(ValueError, match="search_ratios"):
        cfg(search_ratios=(0.5, 1.0))
