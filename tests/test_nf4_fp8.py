"""NF4 (QLoRA) and FP8 e4m3 layers against the paper's table and decoders written here from the format definitions."""

import json
import statistics

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from effspec.errors import UserError
from effspec.fsutil import atomic_dir
from effspec.layers import KERNEL_MAX_ROWS, PACKED_LAYERS, QuantLinear, kernels
from effspec.layers_float import FP8Linear, NF4Linear, fp8_table, nf4_codebook
from effspec.measure.size import size
from effspec.models import load_model, save_model
from effspec.quant import Grid
from effspec.registry import get_step
from effspec.steps.quantize.fp8 import FP8Config, fp8_quantize
from effspec.steps.quantize.nf4 import NF4Config, nf4_quantize

# QLoRA appendix E, "NormalFloat 4-bit data type": the exact values of NF4
PUBLISHED_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                 -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                 0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0]


def e4m3_value(bits: int) -> float:
    """OCP E4M3 decoding: sign, 4 exponent bits (bias 7), 3 mantissa bits; S.1111.111 is NaN."""
    sign = -1.0 if bits & 0x80 else 1.0
    e, m = (bits >> 3) & 0xF, bits & 0x7
    if e == 0xF and m == 0x7:
        return float("nan")
    if e == 0:
        return sign * m / 8 * 2.0**-6  # subnormal
    return sign * (1 + m / 8) * 2.0 ** (e - 7)


E4M3_FINITE = torch.tensor(sorted({e4m3_value(b) for b in range(256) if b not in (0x7F, 0xFF)}), dtype=torch.float64)


def test_nf4_codebook_is_the_published_table():
    C = nf4_codebook()
    assert torch.allclose(C, torch.tensor(PUBLISHED_NF4), rtol=0, atol=2e-7)
    # and the definition, with an independent quantile function: 8 positive quantiles at equally spaced
    # probabilities from delta to 1/2 (exclusive), 7 negative ones, an exact zero, normalized by the largest
    ppf, delta = statistics.NormalDist().inv_cdf, 0.9677083
    pos = [ppf(delta + i * (0.5 - delta) / 8) for i in range(8)]
    neg = [-ppf(delta + i * (0.5 - delta) / 7) for i in range(7)]
    expected = sorted(v / pos[0] for v in pos + neg + [0.0])
    assert torch.allclose(C.double(), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-7)
    assert C[7] == 0 and C[0] == -1 and C[15] == 1 and (C.diff() > 0).all()


def reference_nf4(W: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Per block: absmax (rounded to float16 as stored), each weight to the nearest published NF4 value."""
    C = torch.tensor(PUBLISHED_NF4, dtype=torch.float64)
    out = torch.empty_like(W, dtype=torch.float64)
    for r in range(W.shape[0]):
        for c in range(0, W.shape[1], blocksize):
            w = W[r, c : c + blocksize].double()
            absmax = float(torch.tensor(float(w.abs().max()), dtype=torch.float16))
            idx = (w[:, None] / absmax - C[None, :]).abs().argmin(1)
            out[r, c : c + blocksize] = C[idx] * absmax
    return out.float()


def decode_nf4_layer(layer: NF4Linear) -> torch.Tensor:
    """W_hat from the layer's stored bytes: low nibble first, absmax from float16 or from c2 * c1 + mean."""
    C = torch.tensor(PUBLISHED_NF4)
    b = layer.qweight.long()
    codes = torch.stack([b % 16, b // 16], 1).reshape(layer.out_features, layer.in_features)
    if layer.double_quant:
        c2 = torch.tensor([e4m3_value(int(v)) for v in layer.absmax_q.view(torch.uint8).reshape(-1)])
        c1 = layer.absmax_scale.repeat_interleave(256)[: c2.numel()]
        absmax = (c2 * c1 + layer.absmax_mean).view(layer.out_features, -1)
    else:
        absmax = layer.absmax.float()
    return C[codes] * absmax.repeat_interleave(layer.blocksize, 1)


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_layer_output_equals_reference_dequant(double_quant):
    torch.manual_seed(0)
    lin = nn.Linear(256, 48, bias=True)
    W = lin.weight.detach()
    q, absmax = nf4_quantize(W, 64, double_quant)
    layer = NF4Linear.from_codes(q, absmax, 64, lin.bias)
    assert layer.qweight.dtype == torch.uint8 and layer.qweight.numel() == 256 * 48 // 2
    W_hat = decode_nf4_layer(layer)
    x = torch.randn(5, 256)
    with kernels(False):  # the exact float32 path
        assert torch.allclose(layer(x), F.linear(x, W_hat, lin.bias), rtol=0, atol=1e-6)
    x_long = torch.randn(KERNEL_MAX_ROWS, 256)  # from this many rows the exact path runs anyway
    assert torch.allclose(layer(x_long), F.linear(x_long, W_hat, lin.bias), rtol=0, atol=1e-6)
    if not double_quant:  # the rounding itself: nearest published value at the stored absmax
        assert torch.allclose(W_hat, reference_nf4(W, 64), rtol=0, atol=1e-6)


def test_nf4_bfloat16_decode_path_is_close_to_exact():
    torch.manual_seed(3)
    lin = nn.Linear(512, 256, bias=True)
    layer = NF4Linear.from_codes(*nf4_quantize(lin.weight, 64), 64, lin.bias)
    x = torch.randn(1, 3, 512)
    with kernels(False):
        exact = layer(x)
    fast = layer(x)
    assert fast.dtype == x.dtype and not torch.equal(fast, exact)  # it did take the bfloat16 path
    rel = (fast - exact).norm() / exact.norm()
    assert rel < 2**-7  # bfloat16 keeps 8 significant bits of weights and inputs


def test_nf4_beats_int4_round_to_nearest_on_normal_weights():
    """QLoRA's claim (Sec. 3, Table 2 / Fig. 3): NF4 is the better 4-bit type for normally distributed weights."""
    torch.manual_seed(0)
    W = torch.randn(512, 1024)
    q, absmax = nf4_quantize(W, 64)
    nf4_mse = ((NF4Linear.from_codes(q, absmax, 64, None).dequantized_weight() - W) ** 2).mean()
    lin = nn.Linear(1024, 512, bias=False)
    lin.weight.data = W
    int4_mse = ((QuantLinear.from_linear(lin, Grid(4, 64, True)).dequantized_weight() - W) ** 2).mean()
    assert nf4_mse < 0.97 * int4_mse  # measured 0.94x against the Q4_0-rule grid (0.81x against absmax/7.5)


def test_double_quantization_costs_little_and_saves_absmax_bytes():
    torch.manual_seed(1)
    W = torch.randn(384, 512) * torch.rand(384, 1)  # rows of different scales: absmax spreads around its mean
    plain = NF4Linear.from_codes(*nf4_quantize(W, 64), 64, None)
    double = NF4Linear.from_codes(*nf4_quantize(W, 64, double_quant=True), 64, None)
    absmax = W.view(384, 8, 64).abs().amax(-1)
    rel = ((double.absmax_values() - absmax).abs() / absmax).median()
    assert rel < 1 / 16  # an e4m3 c2 keeps 3 mantissa bits of (absmax - mean)
    mse = [((m.dequantized_weight() - W) ** 2).mean() for m in (plain, double)]
    assert mse[1] < 1.05 * mse[0]
    bits = [8 * sum(b.numel() * b.element_size() for b in m.buffers()) / W.numel() for m in (plain, double)]
    assert bits[0] == 4.25 and 4.12 < bits[1] < 4.135  # 4 + 16/64, and QLoRA's 4 + 8/64 + 32/(64*256)


def test_fp8_table_decodes_every_bit_pattern():
    table = fp8_table()
    for b in range(256):
        v = e4m3_value(b)
        assert (table[b].isnan() and v != v) or table[b].item() == v


@pytest.mark.parametrize("group", [0, 32])
def test_fp8_rounds_to_nearest_e4m3_and_bounds_the_error(group):
    torch.manual_seed(2)
    W = torch.randn(64, 128) * torch.logspace(-3, 0, 128)  # columns over three decades: subnormals appear
    W_fp8, s = fp8_quantize(W, group or 128)
    assert W_fp8.dtype == torch.float8_e4m3fn and W_fp8.element_size() == 1
    layer = FP8Linear.from_codes(W_fp8, s, group, None)
    g = group or 128
    s_full = s.double().repeat_interleave(g, 1)
    target = W.double() / s_full
    got = fp8_table()[W_fp8.view(torch.uint8).long()].double()
    nearest = (target[..., None] - E4M3_FINITE).abs().min(-1).values
    assert torch.allclose((target - got).abs(), nearest, rtol=0, atol=1e-9)  # no closer E4M3 value exists
    err = (layer.dequantized_weight().double() - W.double()).abs()
    bound = torch.maximum(W.double().abs() / 16, 2.0**-10 * s_full)  # 3 mantissa bits; subnormal spacing 2^-9
    assert (err <= bound * (1 + 1e-6) + 1e-12).all()
    assert torch.allclose(got.abs().view(64, -1, g).amax(-1), torch.tensor(448.0, dtype=torch.float64))
    x = torch.randn(3, 128)
    assert torch.allclose(layer(x), F.linear(x, (got * s_full).float()), rtol=0, atol=1e-5)


def linear_bits(model):
    return size(model).linear_bits_per_param


@pytest.mark.parametrize("name,cfg,low,high", [
    ("nf4", {}, 4.25, 4.25), ("nf4", {"double_quant": True}, 4.12, 4.2),
    ("fp8", {}, 8.25, 8.5), ("fp8", {"group_size": 32}, 9.0, 9.0)])
def test_stored_bits_per_param_on_a_model(name, cfg, low, high):
    loaded = load_model("tiny-llama")  # input widths 64 and 128, no biases
    step = get_step(name)
    model = step.apply(loaded.model, step.config(**cfg))
    assert low <= linear_bits(model) <= high


@pytest.mark.parametrize("name,cfg,model_name", [
    ("nf4", {}, "tiny-llama"), ("nf4", {"double_quant": True, "blocksize": 32}, "tiny-qwen2"),
    ("fp8", {}, "tiny-qwen2"), ("fp8", {"group_size": 64}, "tiny-llama")])
def test_save_load_round_trip_gives_identical_logits(tmp_path, name, cfg, model_name):
    loaded = load_model(model_name)
    step = get_step(name)
    model = step.apply(loaded.model, step.config(**cfg))
    with atomic_dir(tmp_path / "m") as tmp:
        save_model(model, loaded.tokenizer, tmp, {"recipe": name})
    meta = json.loads((tmp_path / "m" / "effspec.json").read_text())
    assert len(meta["layers"]) == 14 and {m["kind"] for m in meta["layers"].values()} == {name}
    again = load_model(str(tmp_path / "m"))
    layer = again.model.get_submodule("model.layers.1.mlp.down_proj")
    assert isinstance(layer, PACKED_LAYERS[name])
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        assert torch.equal(again.model(ids).logits, model(ids).logits)


def test_bad_configs_are_rejected():
    with pytest.raises(ValueError, match="blocksize"):
        NF4Config(blocksize=63)
    with pytest.raises(ValueError, match="group_size"):
        FP8Config(group_size=-1)
    for name, cfg in (("nf4", NF4Config(blocksize=96)), ("fp8", FP8Config(group_size=96))):
        with pytest.raises(UserError, match="does not divide the input width 64 of model.layers.0"):
            get_step(name).apply(load_model("tiny-llama").model, cfg)
