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
            if symmetric:
                scale = 2 * w.abs().max() / maxq
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


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_unpack_roundtrip_and_bytes(bits):
    q = torch.randint(0, 2**bits, (13, 24), dtype=torch.uint8)
    packed = pack_bits(q, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == (q.numel() * bits + 7) // 8
    assert torch.equal(unpack_bits(packed, bits, q.numel()).view(13, 24), q)


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
    if q._kernel[0] == "cpp":  # effspec's float32 kernels: exact up to summation order
        assert bits in (4, 8) and torch.allclose(fast, exact, atol=1e-4, rtol=1e-4)
    else:
        assert q._kernel[0] in ("int4", "int8")  # these shapes have a kernel; the test exercises it
        assert (fast - exact).abs().max() < 0.02 * exact.abs().max()  # bfloat16 activations


@pytest.mark.parametrize("bits,group,symmetric", [(4, 32, False), (4, 64, True), (4, 0, True), (8, 0, False), (8, 32, True)])
def test_cpp_kernels_equal_the_exact_path(bits, group, symmetric, monkeypatch):
    from effspec import kernels as cpp

    if not cpp.available():
        pytest.skip("no C++ compiler here: the torch kernel paths are tested above")
    torch.manual_seed(1)
    lin = nn.Linear(192, 48, bias=False)
    q = QuantLinear.from_linear(lin, Grid(bits, group, symmetric))
    for rows in (1, 3, 47):
        x = torch.randn(rows, 192)
        with kernels(False):
            exact = q(x)
        fast = q(x)
        assert q._kernel[0] == "cpp"
        assert torch.allclose(fast, exact, atol=1e-4, rtol=1e-4), rows


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
