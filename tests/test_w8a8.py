"""W8A8 (int8 x int8 matmul), SmoothQuant and LLM.int8() outlier decomposition against references written here."""

import pytest
import torch

from effspec import kernels
from effspec.config import ConfigError
from effspec.measure.size import size
from effspec.models import load_model, save_model
from effspec.registry import get_step
from effspec.steps.quantize import w8a8
from effspec.steps.quantize.outliers import OutlierW8A8Linear, OutliersConfig
from effspec.steps.quantize.smoothquant import SmoothQuantConfig, smooth_model, smoothing_factors
from effspec.steps.quantize.w8a8 import W8A8Linear, available_backends, use_backend


def reference_w8a8(X: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None = None):
    """Symmetric int8: per-token |X| max / 127, per-channel |W| max / 127 (stored in float16), int64 matmul."""
    s_w = (W.abs().amax(1) / 127).half().float()
    W_q = torch.round(W / s_w[:, None]).clamp(-127, 127).long()
    s_x = X.abs().amax(1, keepdim=True) / 127
    X_q = torch.round(X / s_x).clamp(-127, 127).long()
    Y = (X_q @ W_q.t()).double() * s_x.double() * s_w.double()
    return (Y if b is None else Y + b.double()), W_q


def outlier_inputs(tokens: int, n_in: int, columns=(3, 17, 40), scale=40.0, seed=0) -> torch.Tensor:
    """(tokens, in) activations ~N(0, 1) with a few systematic outlier channels, as LLMs have."""
    X = torch.randn(tokens, n_in, generator=torch.Generator().manual_seed(seed))
    X[:, list(columns)] *= scale
    return X


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("shape", [(1, 96), (5, 96), (2, 33, 96)])
def test_w8a8_layer_equals_the_integer_reference(backend, shape):
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40)
    x = torch.randn(*shape) * 3
    layer = W8A8Linear.from_linear(linear)
    expected, W_q = reference_w8a8(x.reshape(-1, 96), linear.weight.detach(), linear.bias.detach())
    assert torch.equal(layer.qweight.long(), W_q) and layer.qweight.dtype == torch.int8
    with use_backend(backend):
        y = layer(x)
    assert y.shape == (*shape[:-1], 40)
    assert rel_err(y.reshape(-1, 40), expected) < 1e-6  # float32 rounding of the int32 sum times the scales


def test_backends_are_exact_on_extreme_codes():
    """Codes at +-127 on every column: where a u8 x s8 kernel would saturate int16 pair sums."""
    W = torch.full((16, 64), 0.5)
    W[8:] *= -1
    X = torch.full((4, 64), 2.0)
    X[2:] *= -1
    expected, _ = reference_w8a8(X, W)
    layer = W8A8Linear.from_linear(torch.nn.Linear(64, 16, bias=False))
    layer.qweight.copy_(torch.round(W / (W.abs().amax(1, keepdim=True) / 127)).to(torch.int8))
    layer.scales.copy_(W.abs().amax(1) / 127)
    for backend in available_backends():
        with use_backend(backend):
            assert rel_err(layer(X), expected) < 1e-6, backend
    assert rel_err(layer(X), expected) < 1e-6  # 4 rows: the few-row kernel where it is compiled


@pytest.mark.skipif(not kernels.available(), reason="no C++ compiler for effspec.kernels")
@pytest.mark.parametrize("rows,n_in", [(1, 96), (3, 64), (8, 33), (2, 576)])
def test_few_row_kernel_equals_every_backend_bitwise(rows, n_in):
    """Decode-sized inputs take `w8a8_rows`; prefill takes a backend's GEMM: both must give the same floats."""
    torch.manual_seed(rows)
    linear = torch.nn.Linear(n_in, 40)
    layer = W8A8Linear.from_linear(linear)
    x = torch.randn(rows, n_in) * 3
    x[-1, : n_in // 3] *= 50  # outlier columns: small codes elsewhere in that row
    if rows > 1:
        x[0] = 0  # an all-zero row: scale 1, output the bias
    direct = kernels.decode_ops().w8a8_rows(x, layer.qweight, layer.scales.float(), linear.bias.detach())
    assert torch.equal(layer(x), direct)
    for backend in available_backends():
        with use_backend(backend):
            assert torch.equal(layer(x), direct), backend
    expected, _ = reference_w8a8(x[-1:], linear.weight.detach(), linear.bias.detach())
    assert rel_err(direct[-1:], expected) < 1e-6
    assert layer(x[:0]).shape == (0, 40)  # no rows: the backend's path, not the kernel's


@pytest.mark.skipif(not kernels.available(), reason="no C++ compiler for effspec.kernels")
def test_few_rows_take_the_kernel_and_more_rows_the_gemm(monkeypatch):
    """The bitwise test above cannot tell which path ran; this one counts the kernel's calls."""
    calls, real = [], kernels.decode_ops()

    class Counting:
        def w8a8_rows(self, *args):
            calls.append(args[0].shape[0])
            return real.w8a8_rows(*args)

    monkeypatch.setattr(w8a8.kernels, "decode_ops", lambda: Counting())
    layer = W8A8Linear.from_linear(torch.nn.Linear(64, 16))
    for rows in (1, w8a8.FEW_ROWS, w8a8.FEW_ROWS + 1, 0):
        layer(torch.randn(rows, 64))
    with use_backend(available_backends()[-1]):
        layer(torch.randn(1, 64))  # a forced backend is used as forced
    assert calls == [1, w8a8.FEW_ROWS]


def test_w8a8_layer_stores_int8_bytes():
    layer = W8A8Linear.from_linear(torch.nn.Linear(96, 40, bias=False))
    assert sum(t.numel() * t.element_size() for t in layer.state_dict().values()) == 96 * 40 + 40 * 2


def test_smoothing_factors_follow_eq4():
    act, W1, W2 = torch.tensor([4.0, 1.0, 0.0]), torch.tensor([[1.0, -2.0, 0.5]]), torch.tensor([[-3.0, 1.0, 0.0]])
    s = smoothing_factors(act, [W1, W2], alpha=0.5)
    assert torch.allclose(s, torch.tensor([(4 / 3) ** 0.5, (1 / 2) ** 0.5, 1e-5]))


def test_smoothing_moves_outliers_and_lowers_w8a8_error():
    torch.manual_seed(0)
    X, W = outlier_inputs(256, 96), torch.randn(64, 96) / 10
    s = smoothing_factors(X.abs().amax(0), [W], alpha=0.5)
    exact = X.double() @ W.double().t()
    plain, _ = reference_w8a8(X, W)
    smoothed, _ = reference_w8a8(X / s, W * s)
    assert (smoothed - exact).pow(2).mean() < 0.2 * (plain - exact).pow(2).mean()


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-qwen2"])
def test_smoothing_alone_leaves_the_float_logits_unchanged(spec):
    model = load_model(spec).model
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.mul_(torch.rand(p.shape, generator=torch.Generator().manual_seed(1)) + 0.5)
    ids = torch.randint(0, 257, (2, 32), generator=torch.Generator().manual_seed(0))
    norm_before = model.model.layers[0].input_layernorm.weight.detach().clone()
    with torch.no_grad():
        before = model(ids).logits
    smooth_model(model, ids, alpha=0.5)
    with torch.no_grad():
        after = model(ids).logits
    assert not torch.allclose(model.model.layers[0].input_layernorm.weight, norm_before)  # something was folded
    assert rel_err(after, before) < 1e-5


def outlier_model(spec: str = "tiny-llama"):
    """A tiny model whose norms emit three outlier channels (x30), as real LLMs' do."""
    model = load_model(spec).model
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):
                p[[3, 17, 40]] *= 30
    return model


@pytest.mark.parametrize("step", ["smoothquant", "outliers"])
def test_step_beats_plain_w8a8_on_a_model_with_outlier_channels(step):
    ids = torch.randint(0, 257, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = outlier_model()(ids).logits
    errors = {}
    for name in (step, "w8a8"):
        info = get_step(name)
        model = info.apply(outlier_model(), info.config(), ids if info.needs_calibration else None)
        assert isinstance(model.model.layers[1].mlp.down_proj, (W8A8Linear, OutlierW8A8Linear))
        with torch.no_grad():
            errors[name] = (model(ids).logits - base).pow(2).mean().item()
    assert errors[step] < 0.5 * errors["w8a8"], errors


@pytest.mark.parametrize("backend", available_backends())
def test_outlier_layer_equals_the_decomposition_reference(backend):
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40)
    X = outlier_inputs(37, 96, seed=1)
    layer = OutlierW8A8Linear.from_linear(linear, X.abs().amax(0), threshold=6.0)
    O = [3, 17, 40]  # the only columns above 6 in magnitude (N(0, 1) elsewhere: P(|x| > 6) ~ 2e-9)
    assert layer.outlier_idx.tolist() == O
    keep = [j for j in range(96) if j not in O]
    W = linear.weight.detach()
    int8_part, W_q = reference_w8a8(X[:, keep], W[:, keep])
    expected = int8_part + X[:, O].double() @ W[:, O].half().double().t() + linear.bias.double()
    assert torch.equal(layer.qweight.long(), W_q)
    with use_backend(backend):
        assert rel_err(layer(X), expected) < 1e-6


def test_outlier_decomposition_beats_plain_w8a8_and_stores_its_bytes():
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40, bias=False)
    X = outlier_inputs(128, 96)
    exact = linear(X)
    mixed = OutlierW8A8Linear.from_linear(linear, X.abs().amax(0), threshold=6.0)
    plain = W8A8Linear.from_linear(linear)
    assert (mixed(X) - exact).pow(2).mean() < 0.1 * (plain(X) - exact).pow(2).mean()
    stored = sum(t.numel() * t.element_size() for t in mixed.state_dict().values())
    assert stored == 40 * 93 + 40 * 3 * 2 + 3 * 4 + 40 * 2  # int8 codes, fp16 columns, int32 indices, fp16 scales
    assert torch.allclose(mixed.weight[:, [3, 17, 40]], linear.weight[:, [3, 17, 40]].half().float())


@pytest.mark.parametrize("step", ["w8a8", "outliers", "smoothquant"])
def test_save_load_round_trip(tmp_path, step):
    ids = torch.randint(0, 257, (2, 32), generator=torch.Generator().manual_seed(0))
    loaded = load_model("tiny-qwen2")  # q/k/v with biases
    info = get_step(step)
    model = info.apply(loaded.model, info.config(), ids if info.needs_calibration else None)
    with torch.no_grad():
        before = model(ids).logits
    out = tmp_path / "m"
    out.mkdir()
    save_model(model, loaded.tokenizer, out, {})
    again = load_model(str(out)).model
    kinds = {type(m) for m in again.modules()}
    assert (OutlierW8A8Linear if step == "outliers" else W8A8Linear) in kinds
    with torch.no_grad():
        assert torch.equal(again(ids).logits, before)
    assert size(again).linear_stored_bytes == size(model).linear_stored_bytes


def test_bad_configs_name_the_field():
    with pytest.raises(ConfigError, match="alpha"):
        SmoothQuantConfig(alpha=1.5)
    with pytest.raises(ConfigError, match="threshold"):
        OutliersConfig(threshold=0.0)
    with pytest.raises(ValueError, match="backend"):
        with use_backend("fp32"):
            pass
    assert w8a8.int8_backend() in available_backends()
