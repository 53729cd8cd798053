"""Wanda and SparseGPT against references written here, and the sparse storage they produce."""

import pytest
import torch
from torch import nn

from effspec import layers as packed_layers
from effspec.errors import UserError
from effspec.layers import QuantLinear, SparseQuantLinear
from effspec.measure.size import size
from effspec.models import load_model
from effspec.quant import Grid
from effspec.registry import get_step
from effspec.sparsity import SparseLinear
from effspec.steps.prune.sparsegpt import SparseGPTConfig, sparsegpt_prune
from effspec.steps.prune.wanda import WandaConfig, wanda_mask

CALIB = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))


def correlated_inputs(n=2048, d=64, seed=0):
    """Tokens with correlated features of very uneven scale, as LLM activations have."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    scale = torch.exp(torch.randn(d, generator=g))
    return (torch.randn(n, d, generator=g) @ mix) * scale


def output_error(W, W_hat, X):
    return ((X @ (W - W_hat).t()) ** 2).sum().item()


def hessian(X):
    return 2 * X.t() @ X / X.shape[0]


def magnitude_prune(W, sparsity=None, nm=None):
    if nm:
        n, m = nm
        g = W.abs().view(W.shape[0], -1, m)
        keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, g.topk(n, -1).indices, True).view_as(W)
    else:
        k = int(sparsity * W.numel())
        keep = torch.ones(W.numel(), dtype=torch.bool)
        keep[W.abs().flatten().argsort()[:k]] = False
        keep = keep.view_as(W)
    return W * keep


# ---- Wanda --------------------------------------------------------------------------------------------
def test_wanda_mask_is_eq1_per_output_row():
    torch.manual_seed(0)
    W, X = torch.randn(16, 64), correlated_inputs()
    keep = wanda_mask(W, X.norm(dim=0), WandaConfig(sparsity=0.5))
    for r in range(16):  # reference: per row, drop the 32 lowest |W| * ||X_j||
        score = W[r].abs() * X.norm(dim=0)
        dropped = set(score.argsort()[:32].tolist())
        assert set((~keep[r]).nonzero().flatten().tolist()) == dropped
    keep24 = wanda_mask(W, X.norm(dim=0), WandaConfig(nm="2:4"))
    assert (keep24.view(16, -1, 4).sum(-1) == 2).all()


def test_wanda_beats_magnitude_on_uneven_inputs():
    W, X = torch.randn(32, 64, generator=torch.Generator().manual_seed(1)), correlated_inputs()
    for cfg, nm in ((WandaConfig(sparsity=0.5), None), (WandaConfig(nm="2:4"), (2, 4))):
        wanda = W * wanda_mask(W, X.norm(dim=0), cfg)
        mag = magnitude_prune(W, 0.5, nm)
        assert output_error(W, wanda, X) < 0.8 * output_error(W, mag, X)


# ---- SparseGPT ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("nm", [None, (2, 4), (4, 8)])
def test_sparsegpt_beats_wanda_and_magnitude_on_its_layer(nm):
    W, X = torch.randn(32, 64, generator=torch.Generator().manual_seed(2)), correlated_inputs()
    cfg = SparseGPTConfig(nm=f"{nm[0]}:{nm[1]}" if nm else "", block_size=32)
    r = sparsegpt_prune(W, hessian(X), cfg)
    e_sgpt = output_error(W, r.weight, X)
    e_wanda = output_error(W, W * wanda_mask(W, X.norm(dim=0), WandaConfig(nm=cfg.nm)), X)
    e_mag = output_error(W, magnitude_prune(W, 0.5, nm), X)
    assert e_sgpt < e_wanda < e_mag
    assert (r.weight[~r.keep] == 0).all()  # pruned -> exactly zero
    if nm:
        assert (r.keep.view(32, -1, nm[1]).sum(-1) == nm[0]).all()  # the pattern, exactly, in every row
    else:
        for b in range(0, 64, 32):  # exact sparsity in every mask-selection block
            assert int((~r.keep[:, b:b + 32]).sum()) == 32 * 32 // 2


def test_sparsegpt_with_no_pruning_leaves_the_layer_unchanged():
    W, X = torch.randn(8, 64), correlated_inputs()
    r = sparsegpt_prune(W, hessian(X), SparseGPTConfig(sparsity=0.0))
    assert torch.allclose(r.weight, W, atol=1e-5) and r.keep.all()


@pytest.mark.parametrize("refit", [0, 20])
def test_joint_prune_and_quantize_beats_prune_then_round(refit):
    W, X = torch.randn(32, 64, generator=torch.Generator().manual_seed(3)), correlated_inputs()
    cfg = SparseGPTConfig(sparsity=0.5, bits=4, group_size=32, block_size=32, refit_iters=refit)
    r = sparsegpt_prune(W, hessian(X), cfg)
    layer = QuantLinear.from_codes(r.codes, r.scale, r.minimum, cfg.grid, None)
    W_hat = layer.dequantized_weight()
    assert torch.allclose(W_hat, r.weight, atol=1e-6)  # the codes are the weights the sweep compensated for
    assert (W_hat[~r.keep] == 0).all()  # pruned weights are the grid's exact zero code
    pruned_only = sparsegpt_prune(W, hessian(X), SparseGPTConfig(sparsity=0.5, block_size=32, refit_iters=refit))
    if refit:  # the second sweep keeps the refit's mask
        assert torch.equal(r.keep, pruned_only.keep)
    lin = nn.Linear(64, 32, bias=False)
    lin.weight.data = pruned_only.weight
    rounded = QuantLinear.from_linear(lin, Grid(4, 32, True)).dequantized_weight()
    assert output_error(W, W_hat, X) < output_error(W, rounded, X)


def test_refit_then_rounding_splits_the_error_and_rounds_better_than_rtn():
    """For a fixed mask the refit leaves no gradient on the kept weights, so the output error is the pruning error
    plus the rounding error measured from the refit weights; the second sweep makes the latter below RTN's."""
    W, X = torch.randn(32, 64, generator=torch.Generator().manual_seed(6)), correlated_inputs(seed=6)
    joint = sparsegpt_prune(W, hessian(X), SparseGPTConfig(sparsity=0.5, bits=4, group_size=32, block_size=32))
    refit = sparsegpt_prune(W, hessian(X), SparseGPTConfig(sparsity=0.5, block_size=32))
    assert torch.equal(joint.keep, refit.keep)
    pruning, rounding = output_error(W, refit.weight, X), output_error(refit.weight, joint.weight, X)
    assert output_error(W, joint.weight, X) == pytest.approx(pruning + rounding, rel=5e-3)
    lin = nn.Linear(64, 32, bias=False)
    lin.weight.data = refit.weight
    rtn = QuantLinear.from_linear(lin, Grid(4, 32, True)).dequantized_weight()
    assert rounding < 0.95 * output_error(refit.weight, rtn, X)


@pytest.mark.parametrize("nm", ["", "2:4"])
def test_refit_reaches_the_exact_least_squares_weights_of_the_mask(nm):
    W, X = torch.randn(32, 64, generator=torch.Generator().manual_seed(4)), correlated_inputs()
    H = hessian(X)
    plain = sparsegpt_prune(W, H, SparseGPTConfig(sparsity=0.5, nm=nm, block_size=32, refit_iters=0))  # Algorithm 1
    refit = sparsegpt_prune(W, H, SparseGPTConfig(sparsity=0.5, nm=nm, block_size=32, refit_iters=60))
    assert torch.equal(refit.keep, plain.keep) and (refit.weight[~refit.keep] == 0).all()
    Hd = H + 0.01 * torch.diag(H).mean() * torch.eye(64)  # the damped H both solve against
    exact = torch.zeros_like(W)
    for r in range(32):  # reference: per row, min (w - w0) Hd (w - w0)^T with the pruned weights held at 0
        K, P = plain.keep[r], ~plain.keep[r]
        exact[r, K] = W[r, K] + torch.linalg.solve(Hd[K][:, K], Hd[K][:, P] @ W[r, P])
    err = lambda V: (((V - W) @ Hd) * (V - W)).sum(1)  # noqa: E731 -- each row's objective
    assert torch.allclose(err(refit.weight), err(exact), rtol=1e-3)
    assert (err(refit.weight) <= err(plain.weight) * (1 + 1e-5)).all()  # never worse, row by row
    assert err(exact).sum() < 0.97 * err(plain.weight).sum()  # and the freeze of Algorithm 1 did cost something
    with pytest.raises(ValueError, match="refit_iters"):
        SparseGPTConfig(refit_iters=-1)


def test_bad_sparsegpt_configs():
    with pytest.raises(ValueError, match="bits"):
        SparseGPTConfig(bits=5)
    with pytest.raises(ValueError, match="block_size"):
        SparseGPTConfig(nm="2:3", block_size=128)


# ---- the steps on a model, and storage --------------------------------------------------------------------
@pytest.mark.parametrize("step,fields", [("wanda", {"sparsity": 0.5}), ("wanda", {"nm": "2:4"}),
                                         ("sparsegpt", {"sparsity": 0.5}), ("sparsegpt", {"nm": "4:8"})])
def test_steps_store_sparse_layers_that_really_shrink(step, fields, reloads_same):
    lm = load_model("tiny-llama")
    before = size(lm.model)
    info = get_step(step)
    model = info.apply(lm.model, info.config(**fields), CALIB)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    assert len(layers) == 14
    assert all(m.sparsity() == pytest.approx(0.5, abs=1e-3) for m in layers.values())
    after = size(model)
    assert after.sparsity == pytest.approx(0.5, abs=1e-3)
    assert after.linear_stored_bytes < 0.55 * before.linear_stored_bytes  # 17 of 32 bits a weight
    # calibration ran the pruned blocks, but their dense copies are not left behind (smollm2: 425 MB)
    assert all(m._dense is None for m in layers.values())
    reloads_same(model, lm.tokenizer, CALIB[:1])


def test_sparse_linear_round_trip_and_bytes():
    torch.manual_seed(4)
    lin = nn.Linear(64, 16)
    keep = torch.rand(16, 64) > 0.5
    layer = SparseLinear.from_weight(lin.weight.detach(), keep, lin.bias)
    assert torch.equal(layer.dense_weight(), lin.weight.detach() * keep)
    x = torch.randn(3, 64)
    assert torch.allclose(layer(x), x @ (lin.weight.detach() * keep).t() + lin.bias.detach(), atol=1e-6)
    stored = layer.mask.numel() + 4 * layer.values.numel() + 4 * 16
    assert sum(t.numel() * t.element_size() for t in layer.state_dict().values()) == stored


def test_sparse_quant_linear_stores_mask_and_kept_codes_only():
    g = torch.Generator().manual_seed(5)
    grid = Grid(4, 32, True)
    q = torch.randint(0, 16, (16, 64), generator=g, dtype=torch.uint8)
    keep = torch.rand(16, 64, generator=g) > 0.5
    q[~keep] = 8  # the symmetric grid's zero code
    scale = (torch.rand(16, 2, generator=g) + 0.1).half().float()  # as stored
    minimum = -8 * scale
    bias = torch.randn(16, generator=g)
    dense = QuantLinear.from_codes(q, scale, minimum, grid, bias)
    layer = SparseQuantLinear.from_codes(q, scale, minimum, grid, bias, keep)
    assert torch.equal(layer.codes(), q) and torch.equal(layer.keep(), keep)
    W = (q.float() - 8) * scale.repeat_interleave(32, 1)  # the reference dequantization, written here
    assert torch.equal(layer.dequantized_weight(), W) and (W[~keep] == 0).all()
    nnz = int(keep.sum())
    stored = 16 * 64 // 8 + (nnz + 7) // 8 * 4 + 2 * 16 * 2 + 4 * 16  # mask, kept codes (whole runs of 8), fp16 scales, bias
    assert sum(t.numel() * t.element_size() for t in layer.state_dict().values()) == stored
    assert layer.sparsity() == pytest.approx(1 - nnz / (16 * 64))
    x = torch.randn(1, 3, 64, generator=g)
    for kernels in (True, False):  # the decode kernels (dense copy) and the exact dequantized path
        with packed_layers.kernels(kernels):
            assert torch.allclose(layer(x), dense(x), atol=1e-5)
    with pytest.raises(ValueError, match="zero code"):  # a mask that would drop kept nonzero codes
        SparseQuantLinear.from_codes(q, scale, minimum, grid, None, keep & (torch.arange(64) < 32))


@pytest.mark.parametrize("quantizer", ["rtn", "gptq"])
def test_quantizing_a_pruned_model_keeps_it_sparse(quantizer, reloads_same):
    lm = load_model("tiny-llama")
    wanda = get_step("wanda")
    model = wanda.apply(lm.model, wanda.config(sparsity=0.5), CALIB)
    pruned = {n: m.dense_weight() for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    step = get_step(quantizer)
    model = step.apply(model, step.config(bits=4, group_size=32), CALIB if quantizer == "gptq" else None)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SparseQuantLinear)}
    assert sorted(layers) == sorted(pruned)
    for n, m in layers.items():
        assert torch.equal(m.keep(), pruned[n] != 0) and (m.dequantized_weight()[pruned[n] == 0] == 0).all()
    if quantizer == "rtn":  # kept weights get exactly the codes RTN gives the dense layer with those zeros
        lin = nn.Linear(64, 64, bias=False)
        name = next(n for n in pruned if pruned[n].shape == (64, 64))
        lin.weight.data = pruned[name]
        assert torch.equal(layers[name].dequantized_weight(), QuantLinear.from_linear(lin, Grid(4, 32, True)).weight)
    assert size(model).sparsity == pytest.approx(0.5, abs=1e-3)
    reloads_same(model, lm.tokenizer, CALIB[:1])


def test_a_pruned_layer_is_not_quantized_on_an_asymmetric_grid():
    lm = load_model("tiny-llama")
    magnitude, rtn = get_step("magnitude"), get_step("rtn")
    model = magnitude.apply(lm.model, magnitude.config(sparsity=0.5))
    with pytest.raises(UserError, match="symmetric"):
        rtn.apply(model, rtn.config(bits=4, group_size=32, symmetric=False))
    assert not any(isinstance(m, QuantLinear) for m in model.modules())  # checked before any layer changed


def test_sparsegpt_joint_step_gives_packed_sparse_weights(reloads_same):
    lm = load_model("tiny-llama")
    info = get_step("sparsegpt")
    model = info.apply(lm.model, info.config(sparsity=0.5, bits=4, group_size=32, block_size=32), CALIB)
    packed = [m for m in model.modules() if isinstance(m, SparseQuantLinear)]
    assert len(packed) == 14
    for m in packed:
        assert (m.dequantized_weight() == 0).float().mean() >= 0.5
        assert m.sparsity() == pytest.approx(0.5, abs=1e-3)
    after = size(model)
    assert after.sparsity == pytest.approx(0.5, abs=1e-3)
    bits = 8 * after.linear_stored_bytes / after.linear_params  # mask 1 + codes 2 + fp16 scale per 32 0.5 (+ bias)
    assert 3.4 < bits < 3.6
    reloads_same(model, lm.tokenizer, CALIB[:1])
