"""RTN and packed layers against a reference quantizer written here, from the definition."""

import pytest
import torch
from torch import nn

from effspec.errors import UserError
from effspec.layers import QuantLinear, kernels
from effspec.measure.size import size
from effspec.models import load_model
from effspec.quant import Grid, pack_bits, unpack_bits
from effspec.registry import get_step


def reference_rtn(W: torch.Tensor, bits: int, group: int, symmetric: bool) -> torch.Tensor:
    """Loop-per-group round-to-nearest, straight from the definitions in effspec.quant's docstring."""
    out = torch.empty_like(W)
    maxq = 2**bits - 1
    for r in range(W.shape[0]):
        for c in range(0, W.shape[1], group):
            w = W[r, c : c + group].double()
            if symmetric:  # GGML Q4_0's rule: the signed peak sits exactly on code 0
                peak = w.max() if w.max() >= -w.min() else w.min()
                scale = peak / -(2 ** (bits - 1))
                scale = torch.tensor(float(scale), dtype=torch.float16).double()
                minimum = -(2 ** (bits - 1)) * scale
            else:
                scale = (w.max() - w.min()) / maxq
                scale = torch.tensor(float(scale), dtype=torch.float16).double()
                minimum = torch.tensor(float(w.min()), dtype=torch.float16).double()
            q = torch.clamp(torch.round((w - minimum) / scale), 0, maxq)
            out[r, c : c + group] = (q * scale + minimum).float()
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group,symmetric", [(16, True), (32, False), (0, True), (0, False)])
def test_rtn_matches_reference_quantizer(bits, group, symmetric):
    torch.manual_seed(bits + group)
    lin = nn.Linear(64, 48, bias=False)
    q = QuantLinear.from_linear(lin, Grid(bits, group, symmetric))
    expected = reference_rtn(lin.weight.detach(), bits, group or 64, symmetric)
    # float32 vs float64 division may flip a rare exact .5 tie; allow one step on <0.5% of weights
    diff = (q.dequantized_weight() - expected).abs()
    assert (diff > 1e-5).float().mean() < 0.005
    assert torch.equal(q.codes().max() <= 2**bits - 1, torch.tensor(True))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_pack_unpack_roundtrip_and_bytes(bits):
    q = torch.randint(0, 2**bits, (13, 24), dtype=torch.uint8)
    packed = pack_bits(q, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == (q.numel() * bits + 7) // 8
    assert torch.equal(unpack_bits(packed, bits, q.numel()).view(13, 24), q)


def int8_activation_reference(q: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """The int8-activation kernels' function, from their definition: x rounded to int8 per 32 columns
    (d = max|x| / 127) meets the codes, centred at 128 for 8-bit codes; the minimum term sees float x."""
    K = q.in_features
    xb = x.reshape(-1, K // 32, 32).double()
    d = xb.abs().amax(-1, keepdim=True) / 127
    x_hat = (torch.round(xb / torch.where(d > 0, d, torch.ones_like(d))) * d).reshape(-1, K)
    centre = 128 if q.grid.bits == 8 else 0
    S = q.scales.double().repeat_interleave(q.group, 1)
    Z = q.minimums().double().repeat_interleave(q.group, 1)
    y = x_hat @ ((q.codes().double() - centre) * S).t() + x.reshape(-1, K).double() @ (Z + centre * S).t()
    if q.bias is not None:
        y = y + q.bias.double()
    return y.float().reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("bits,group,symmetric", [(4, 32, False), (4, 64, True), (3, 32, True), (2, 0, False),
                                                  (8, 0, True), (8, 0, False), (4, 0, True)])
def test_packed_kernel_path_matches_exact_dequant_path(bits, group, symmetric):
    torch.manual_seed(0)
    lin = nn.Linear(128, 64, bias=True)
    q = QuantLinear.from_linear(lin, Grid(bits, group, symmetric))
    x = torch.randn(2, 5, 128)  # 10 rows: below KERNEL_MAX_ROWS, the decode path
    with kernels(False):
        exact = q(x)
    reference = x @ q.dequantized_weight().t() + lin.bias.detach()
    assert torch.allclose(exact, reference, atol=1e-5)
    fast = q(x)
    if q._kernel[0] == "cpp":  # effspec's kernels: int8 activations by default, within ~1% of exact
        assert q._kernel[-1] == (8 if bits == 8 else 4)  # 2 and 3 bits run as 4-bit codes from a nibble copy
        assert (fast - exact).abs().max() < 0.03 * exact.abs().max()
    else:
        assert q._kernel[0] in ("int4", "int8")  # these shapes have a kernel; the test exercises it
        assert (fast - exact).abs().max() < 0.02 * exact.abs().max()  # bfloat16 activations


CPP_CASES = [(4, 32, False), (4, 64, True), (4, 0, True), (4, 128, False), (8, 0, False), (8, 32, True), (8, 64, False),
             (3, 64, True), (2, 32, False)]


@pytest.mark.parametrize("bits,group,symmetric", CPP_CASES)
def test_cpp_kernels_equal_their_references(bits, group, symmetric):
    """Float activations: the exact path up to summation order. int8 activations: the reference above."""
    from effspec import kernels as cpp

    if not cpp.available():
        pytest.skip("no C++ compiler here: the torch kernel paths are tested above")
    torch.manual_seed(1)
    lin = nn.Linear(256, 48, bias=True)
    q = QuantLinear.from_linear(lin, Grid(bits, group, symmetric))
    q(torch.randn(1, 256))  # builds the kernel form
    assert q._kernel[0] == "cpp"
    _, _, qweight, scale, minimum, bias = q._kernel[:6]
    bits = q._kernel[-1]  # 2- and 3-bit layers hand the kernel 4-bit nibbles
    for rows in (1, 3, 47):
        x = torch.randn(rows, 256) * torch.linspace(0.1, 5, 256)  # uneven columns, as activations are
        x[0, 7] = 40.0  # an outlier: its block's other values round coarsely, the others' must not
        with kernels(False):
            exact = q(x)
        as_float = cpp.lowbit_linear(x, qweight, scale, minimum, bias, 48, 256, q.group, bits, "float")
        assert torch.allclose(as_float, exact, atol=1e-4, rtol=1e-4), rows
        as_int8 = cpp.lowbit_linear(x, qweight, scale, minimum, bias, 48, 256, q.group, bits, "int8")
        assert torch.allclose(as_int8, int8_activation_reference(q, x), atol=1e-3, rtol=1e-4), rows
        assert (as_int8 - exact).abs().max() < 0.03 * exact.abs().max()


def test_int8_activation_kernel_keeps_leading_dims_and_zero_rows():
    from effspec import kernels as cpp

    if not cpp.available():
        pytest.skip("no C++ compiler here")
    torch.manual_seed(2)
    q = QuantLinear.from_linear(nn.Linear(128, 32, bias=False), Grid(4, 64, True))
    x = torch.randn(2, 3, 128)
    x[1, 2] = 0.0  # an all-zero row: scale 0, no division by zero
    y = q(x)
    assert y.shape == (2, 3, 32) and torch.isfinite(y).all() and torch.equal(y[1, 2], torch.zeros(32))
    assert torch.allclose(y, int8_activation_reference(q, x), atol=1e-3, rtol=1e-4)


def test_rtn_step_really_shrinks_the_model():
    loaded = load_model("tiny-llama")
    before = size(loaded.model)
    step = get_step("rtn")
    model = step.apply(loaded.model, step.config(bits=4, group_size=32, symmetric=False))
    after = size(model)
    assert after.params == before.params
    assert not any(type(m) is nn.Linear for n, m in model.named_modules() if "layers" in n)
    # 4-bit codes + float16 scale and minimum per 32 weights = 4 + 32/32 = 5 bits per weight
    assert after.linear_bits_per_param == pytest.approx(5.0)
    assert before.linear_stored_bytes / after.linear_stored_bytes == pytest.approx(32 / 5)
    w8 = step.apply(load_model("tiny-llama").model, step.config(bits=8, group_size=0))
    lin = [m for n, m in load_model("tiny-llama").model.named_modules() if n.endswith("proj")]
    weights, rows = sum(m.weight.numel() for m in lin), sum(m.out_features for m in lin)
    assert size(w8).linear_bits_per_param == pytest.approx(8 + 16 * rows / weights)  # int8 + a float16 scale per row


def test_w4_on_the_grid_the_weights_already_hold_is_lossless():
    """Weights that are already on a 4-bit g32 asymmetric grid (as smollm2's Q4_1) come back exactly."""
    torch.manual_seed(0)
    codes = torch.randint(0, 16, (32, 64)).float()
    codes[:, ::32] = 0
    codes[:, 1::32] = 15  # every group spans the whole grid, as Q4_1's min/max blocks do
    scale = (torch.rand(32, 2) + 0.01).half().float()
    minimum = -torch.rand(32, 2).half().float()
    W = (codes.view(32, 2, 32) * scale[..., None] + minimum[..., None]).view(32, 64)
    lin = nn.Linear(64, 32, bias=False)
    lin.weight.data = W
    q = QuantLinear.from_linear(lin, Grid(4, 32, False))
    assert torch.allclose(q.dequantized_weight(), W, atol=1e-6)


def test_group_size_that_does_not_divide_is_a_clear_error():
    step = get_step("rtn")
    with pytest.raises(UserError, match="group_size=48 does not divide the input width 64"):
        step.apply(load_model("tiny-llama").model, step.config(group_size=48))
    with pytest.raises(ValueError, match="bits"):
        step.config(bits=5)


def test_many_rows_take_the_exact_path():
    from effspec.layers import KERNEL_MAX_ROWS

    torch.manual_seed(0)
    q = QuantLinear.from_linear(nn.Linear(64, 32, bias=False), Grid(4, 32, True))
    x = torch.randn(KERNEL_MAX_ROWS, 64)
    assert torch.allclose(q(x), x @ q.dequantized_weight().t(), atol=1e-5)


def test_packed_output_head_saves_and_reloads_untied(tmp_path):
    """A packed lm_head of a tied model keeps its own bytes; the loader must not re-tie it to the embeddings."""
    from effspec.models import save_model

    lm = load_model("tiny-llama")
    assert lm.model.lm_head.weight is lm.model.model.embed_tokens.weight
    get_step("rtn").apply(lm.model, get_step("rtn").config(bits=8, group_size=0, targets=("lm_head",), ignore=()))
    assert isinstance(lm.model.lm_head, QuantLinear)
    x = torch.randint(0, 256, (1, 12))
    with torch.inference_mode():
        before = lm.model(x).logits
    save_model(lm.model, lm.tokenizer, tmp_path / "m", {})
    again = load_model(str(tmp_path / "m"))
    assert isinstance(again.model.lm_head, QuantLinear)
    with torch.inference_mode():
        assert torch.equal(again.model(x).logits, before)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_symmetric_grid_keeps_each_groups_peak_exactly(bits):
    """The largest-magnitude weight of every group is reproduced, whatever its sign (absmax/7.5 would clip it)."""
    torch.manual_seed(bits)
    lin = nn.Linear(128, 32, bias=False)
    W = lin.weight.detach().reshape(32, 4, 32)
    W_hat = QuantLinear.from_linear(lin, Grid(bits, 32, True)).dequantized_weight().reshape(32, 4, 32)
    idx = W.abs().argmax(-1, keepdim=True)
    peak, peak_hat = W.gather(-1, idx), W_hat.gather(-1, idx)
    assert torch.allclose(peak_hat, peak, rtol=1e-3)  # float16 scale
    assert (peak > 0).any() and (peak < 0).any()  # both signs were exercised


def test_int8_kernel_falls_back_to_float_when_width_is_not_whole_64_column_chunks():
    from effspec import kernels as cpp

    if not cpp.available():
        pytest.skip("no C++ compiler here")
    torch.manual_seed(3)
    q = QuantLinear.from_linear(nn.Linear(96, 16, bias=False), Grid(4, 32, False))  # 96 = 1.5 chunks
    x = torch.randn(1, 96)
    with kernels(False):
        exact = q(x)
    assert q(x) is not None and q._kernel[0] == "cpp"
    assert torch.allclose(q(x), exact, atol=1e-4, rtol=1e-4)  # the float kernel: exact up to order


@pytest.mark.parametrize("bits,K", [(8, 25), (8, 36), (4, 26), (4, 50)])
def test_odd_widths_decode_correctly(bits, K):
    """Widths like a low-rank factor's (rank 25): no kernel may read past a row or crash
    (torch's int8pack kernel segfaults unless K % 8 == 0, so it is not used there)."""
    torch.manual_seed(K)
    q = QuantLinear.from_linear(nn.Linear(K, 40, bias=True), Grid(bits, 0, True))
    x = torch.randn(24, K)
    with kernels(False):
        exact = q(x)
    assert torch.allclose(q(x), exact, atol=1e-4, rtol=1e-4)  # float-activation kernel or exact path


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7])
def test_pack_bits_layout_is_lsb_first_bit_stream(bits):
    """The stored byte layout (saved models depend on it): code i fills bits [bits*i, bits*(i+1)) of one stream."""
    q = torch.randint(0, 2**bits, (40,), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    stream = [(int(c) >> b) & 1 for c in q for b in range(bits)]  # reference: one bit at a time, LSB first
    expected = [sum(stream[8 * k + j] << j for j in range(8)) for k in range(len(stream) // 8)]
    assert pack_bits(q, bits).tolist() == expected
