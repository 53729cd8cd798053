"""GPTQ against a straightforward reference written from the paper, and against round-to-nearest."""

import pytest
import torch

from effspec.layers import QuantLinear
from effspec.models import load_model
from effspec.quant import Grid, dequantize, grid_params, quantize
from effspec.registry import get_step
from effspec.steps.quantize.gptq import GPTQConfig, gptq_quantize


def correlated_inputs(n_in: int, tokens: int, seed: int = 0) -> torch.Tensor:
    """(in, tokens) activations with correlated features and a few outlier channels, like an LLM's."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n_in, n_in, generator=g) / n_in**0.5 + torch.eye(n_in)
    X = mix @ torch.randn(n_in, tokens, generator=g)
    X[:3] *= 8
    return X


def reference_gptq(W, H, grid, group, damp, keep=None):
    """Column by column with the full inverse Hessian, eliminating each quantized column (OBQ update).

    No lazy batches, no Cholesky: after quantizing column j, err = (w_j - q_j) / Hinv_jj,
    W[:, j+1:] -= err Hinv_{j, j+1:}, then Hinv loses row and column j by Gaussian elimination.
    With `keep`, a position outside it is set to zero (the symmetric grid's middle code) instead.
    """
    W, H = W.double().clone(), H.double().clone()
    n = W.shape[1]
    scale, minimum = grid_params(W.float(), grid, group)
    scale, minimum = scale.double(), minimum.double()
    H += damp * H.diag().mean() * torch.eye(n, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    Q = torch.zeros_like(W)
    for j in range(n):
        g = j // group
        q = torch.clamp(torch.round((W[:, j] - minimum[:, g]) / scale[:, g]), 0, grid.maxq)
        if keep is not None:
            q = torch.where(keep[:, j], q, torch.full_like(q, 2 ** (grid.bits - 1)))
        Q[:, j] = q
        err = (W[:, j] - (q * scale[:, g] + minimum[:, g])) / Hinv[j, j]
        W[:, j + 1 :] -= err[:, None] * Hinv[j, j + 1 :][None, :]
        Hinv = Hinv - Hinv[:, j : j + 1] @ Hinv[j : j + 1, :] / Hinv[j, j]
    return Q


@pytest.mark.parametrize("bits,group,symmetric", [(4, 16, True), (3, 32, False)])
def test_lazy_cholesky_gptq_equals_the_reference(bits, group, symmetric):
    torch.manual_seed(0)
    W = torch.randn(24, 64)
    X = correlated_inputs(64, 512)
    H = 2 * X @ X.t() / X.shape[1]
    grid = Grid(bits, group, symmetric)
    cfg = GPTQConfig(bits=bits, group_size=group, symmetric=symmetric, act_order=False, block_size=16)
    q, _, _ = gptq_quantize(W, H, grid, group, cfg)
    expected = reference_gptq(W, H, grid, group, cfg.dampening)
    assert (q.double() == expected).float().mean() > 0.995  # float32 vs float64: a rare tie may round apart


def test_gptq_of_a_pruned_layer_keeps_its_zeros_and_equals_the_reference():
    torch.manual_seed(2)
    W = torch.randn(24, 64)
    keep = torch.rand(24, 64) > 0.5
    W = W * keep
    X = correlated_inputs(64, 512, seed=2)
    H = 2 * X @ X.t() / X.shape[1]
    grid = Grid(4, 16, True)
    cfg = GPTQConfig(bits=4, group_size=16, act_order=False, block_size=16)
    q, scale, minimum = gptq_quantize(W, H, grid, 16, cfg, keep)
    assert (q[~keep] == 8).all()  # exact zeros
    assert (q.double() == reference_gptq(W, H, grid, 16, cfg.dampening, keep)).float().mean() > 0.995
    q_act, s_act, m_act = gptq_quantize(W, H, grid, 16, GPTQConfig(bits=4, group_size=16), keep)  # act_order
    assert (q_act[~keep] == 8).all()
    s, m = grid_params(W, grid, 16)
    rounded = dequantize(quantize(W, s, m, grid), s, m)  # RTN keeps the zeros too: 0 is a code
    error = lambda Wq: ((W - Wq) @ X).pow(2).sum().item()  # noqa: E731
    assert error(dequantize(q_act, s_act, m_act)) < 0.8 * error(rounded)


@pytest.mark.parametrize("bits,group,act_order", [(4, 32, False), (3, 32, True), (2, 0, True), (4, 0, True)])
def test_gptq_beats_round_to_nearest_on_the_layer_output(bits, group, act_order):
    torch.manual_seed(1)
    W = torch.randn(48, 128)
    X = correlated_inputs(128, 1024, seed=1)
    H = 2 * X @ X.t() / X.shape[1]
    grid = Grid(bits, group, True)
    g = group or 128
    q, scale, minimum = gptq_quantize(W, H, grid, g, GPTQConfig(bits=bits, group_size=group, act_order=act_order))
    s, m = grid_params(W, grid, g)
    rtn = dequantize(quantize(W, s, m, grid), s, m)
    gptq = dequantize(q, scale, minimum)
    error = lambda Wq: ((W - Wq) @ X).pow(2).sum().item()  # noqa: E731  (layer-wise reconstruction error)
    assert error(gptq) < 0.8 * error(rtn)


def test_gptq_step_on_a_tiny_model_beats_rtn_on_its_calibration_text():
    ids = torch.randint(0, 257, (4, 64), generator=torch.Generator().manual_seed(0))
    reference = load_model("tiny-llama").model
    with torch.no_grad():
        base = reference(ids).logits
    errors = {}
    for name in ("gptq", "rtn"):
        step = get_step(name)
        cfg = step.config(bits=3, group_size=32)
        model = step.apply(load_model("tiny-llama").model, cfg, ids if name == "gptq" else None)
        assert all(isinstance(model.get_submodule(f"model.layers.{i}.mlp.down_proj"), QuantLinear) for i in (0, 1))
        with torch.no_grad():
            errors[name] = (model(ids).logits - base).pow(2).mean().item()
    assert errors["gptq"] < errors["rtn"]


def test_replaying_finished_sublayers_changes_nothing(monkeypatch):
    """Later passes replay attention/MLP from captured inputs; codes must equal those of full re-runs."""
    import effspec.layerwise as gptq  # the engine gptq runs on

    def quantized_codes(replay: bool):
        lm = load_model("tiny-llama")
        if not replay:
            real_plan = gptq._plan
            monkeypatch.setattr(gptq, "_plan", lambda *a: gptq._Plan(real_plan(*a).groups, {}))
        torch.manual_seed(0)
        calib = torch.randint(0, 256, (4, 32))
        get_step("gptq").apply(lm.model, GPTQConfig(bits=3, group_size=16), calib)
        monkeypatch.undo()
        return {n: m.codes() for n, m in lm.model.named_modules() if isinstance(m, QuantLinear)}

    with_replay, without = quantized_codes(True), quantized_codes(False)
    assert len(with_replay) == 14 and with_replay.keys() == without.keys()
    for name in with_replay:
        assert torch.equal(with_replay[name], without[name]), name


def test_plan_finds_shared_inputs_and_replayable_children():
    import effspec.layerwise as gptq  # the engine gptq runs on
    from effspec.calibrate import block0_inputs

    lm = load_model("tiny-llama")
    block = lm.model.model.layers[0]
    xs, kwargs = block0_inputs(lm.model, torch.randint(0, 256, (1, 16)))
    names = [n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
    plan = gptq._plan(block, names, xs, kwargs)
    assert plan.groups == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                           ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    assert {c: last for c, (last, _) in plan.replayable.items()} == {"self_attn": "self_attn.o_proj", "mlp": "mlp.down_proj"}
