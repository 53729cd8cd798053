"""effspec.greedy_head: the int8-screened argmax equals the float32 logits' argmax, ties and near-ties included."""

import pytest
import torch
from torch import nn

from effspec import decoder, kernels
from effspec.decoder import LeanDecoder
from effspec.generate import greedy
from effspec.greedy_head import Int8Screen, screen_of
from effspec.models import load_model

pytestmark = pytest.mark.skipif(kernels.decode_ops() is None, reason="needs the compiled kernels")
E = kernels.EMPTY


def exact_argmax(x, W):
    return kernels.decode_ops().linear_rows(x.contiguous(), W, E).argmax(-1)


def near_tie_head(N: int, K: int, seed: int) -> torch.Tensor:
    """Random rows, plus rows the int8 grid cannot tell apart: row 1 is row 0 with one weight moved by a tenth of
    a grid step (same codes, different float32 logit), rows 2 and 3 are equal (an exact tie)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g) * 0.05
    W[1] = W[0]
    W[1, 0] += W[0].abs().max() / 127 / 10
    W[3] = W[2]
    return W


@pytest.mark.parametrize("K", [64, 40, 576])  # 40: a tail past the last 16-column chunk
@pytest.mark.parametrize("M", [1, 2, 3, 5, 8])
def test_screened_argmax_equals_the_float32_argmax(M, K):
    W = near_tie_head(700, K, seed=M * 1000 + K)
    screen = Int8Screen(W)
    g = torch.Generator().manual_seed(M + K)
    for trial in range(20):
        x = torch.randn(M, K, generator=g)
        if trial % 2 == 0:  # queries that put the near-tied rows 0 / 1, or the tied rows 2 / 3, on top
            x = W[[trial % 4] * M] * 40 + torch.randn(M, K, generator=g) * 1e-3
            x[:, 0] = torch.randn(M, generator=g).abs() * (1 if trial % 8 < 4 else -1)
        assert torch.equal(screen.argmax(x), exact_argmax(x, W))


def test_the_recheck_is_what_makes_it_exact():
    """The int8 screen alone picks wrongly on the near-tied rows (same codes); the recheck gives the float one."""
    K = 64
    W = near_tie_head(300, K, seed=1)
    screen = Int8Screen(W)
    x = W[[0]] * 40
    x[0, 0] = 1.0  # row 1's larger first weight makes its logit the larger
    approx = x @ (screen.codes.float() * screen.scale[:, None]).T
    assert int(approx.argmax()) == 0 and int(exact_argmax(x, W)) == 1
    assert int(screen.argmax(x)) == 1


def test_the_screen_error_stays_within_its_bound():
    K = 96
    W = near_tie_head(2000, K, seed=2) * torch.logspace(-3, 1, 2000)[:, None]  # rows of very different scales
    screen = Int8Screen(W)
    x = torch.randn(8, K) * torch.logspace(-2, 2, K)
    approx = (x.double() @ (screen.codes.double() * screen.scale.double()[:, None]).T)
    exact = kernels.decode_ops().linear_rows(x, W, E).double()
    bound = screen.coef.double()[None] * x.abs().sum(1, keepdim=True).double()
    err = (approx - exact).abs()
    assert bool((err <= bound).all())
    assert float((err / bound).max()) > 0.05  # the bound is not vacuous either


def test_non_finite_input_falls_back_to_the_logits():
    W = near_tie_head(100, 32, seed=3)
    screen = Int8Screen(W)
    x = torch.randn(2, 32)
    x[1, 3] = float("nan")
    assert screen.argmax(x) is None
    x[1, 3] = float("inf")
    assert screen.argmax(x) is None


def test_screen_is_cached_per_weight_and_rebuilt_when_the_weight_changes():
    head = nn.Linear(32, 200, bias=False)
    first = screen_of(head)
    assert first is not None and screen_of(head) is first
    with torch.no_grad():
        head.weight.mul_(2)  # in place: a new version of the same tensor
    second = screen_of(head)
    assert second is not first and torch.equal(second.scale, first.scale * 2)
    assert screen_of(nn.Linear(32, 200, bias=True)) is None  # a bias: the float32 path
    assert screen_of(nn.Linear(32, 200, bias=False).to(torch.bfloat16)) is None
    bad = nn.Linear(32, 200, bias=False)
    with torch.no_grad():
        bad.weight[0, 0] = float("nan")
    assert screen_of(bad) is None


def test_lean_decoder_greedy_tokens_are_unchanged_by_the_screen(monkeypatch):
    model = load_model("tiny-llama").model
    prompt = torch.randint(0, 256, (19,), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        lean = LeanDecoder(model, 40)
        h = lean.hidden(lean.body.embed_tokens(prompt), last_only=False)
        for rows in (1, 4, 8):
            assert torch.equal(lean.argmax(h[:rows]), lean.logits(h[:rows]).argmax(-1))
    screened = greedy(model, prompt, 24, engine="lean").tokens
    monkeypatch.setattr(decoder, "SCREEN_HEAD", False)
    assert torch.equal(greedy(model, prompt, 24, engine="lean").tokens, screened)
    assert torch.equal(greedy(model, prompt, 24, engine="transformers").tokens, screened)


def test_inputs_with_outlier_channels_keep_the_argmax_exact():
    """Hidden states carry a few channels hundreds of times larger than the rest (smollm2's final norm output
    does); where the screen rounds x too (AVX512-VNNI's integer form) its bound must cover that rounding."""
    K = 128
    W = near_tie_head(900, K, seed=5)
    screen = Int8Screen(W)
    g = torch.Generator().manual_seed(6)
    for trial in range(30):
        M = 1 + trial % 8
        x = W[[trial % 4] * M] * 40 + torch.randn(M, K, generator=g) * 1e-3
        x[:, 0] = torch.randn(M, generator=g).abs() * (1 if trial % 2 else -1)
        x[:, 7 + trial % 5] = 300.0 * (1 if trial % 3 else -1)  # an outlier channel
        assert torch.equal(screen.argmax(x), exact_argmax(x, W))


def two_level(x: torch.Tensor) -> torch.Tensor:
    """x as the VNNI screen rounds it: s (x1 + x2 / 254), s = max|x| / 127, x1 and x2 integers in [-127, 127]."""
    s = (x.abs().amax(-1, keepdim=True) / 127).double()
    t = x.double() / s
    a = t.round().clamp(-127, 127)
    return s * (a + ((t - a) * 254).round().clamp(-127, 127) / 254)


def test_the_bound_covers_the_rounding_of_x():
    """Rows on the int8 grid (no weight rounding at all) whose codes differ by 20 where x's rounding pushes every
    difference the same way: with x rounded as the integer screen rounds it row 0 looks best by 960 steps of x's
    second level, while in float32 row 1 is. The bound must keep row 1 a candidate."""
    K, s = 128, 2.0 ** -7
    g = torch.Generator().manual_seed(7)
    Q = torch.randint(-20, 21, (200, K), generator=g).float()
    Q[:, 0] = torch.randint(-50, 51, (200,), generator=g).float()  # channel 0: the large input
    Q[:, 1] = 127  # channel 1 (input 0): every row's scale is exactly s
    Q[0, 2:] = 0
    Q[1, 2:] = 0
    Q[0, 0] = Q[1, 0] = 100
    Q[1, 2:54] = 20  # 52 channels whose input rounds down to 0
    Q[1, 54:102] = -20  # 48 whose input rounds up to one step
    W = Q * s
    x = torch.zeros(1, K)
    x[0, 0] = 300.0
    step = 300.0 / 127 / 254
    x[0, 2:54] = 0.49 * step
    x[0, 54:102] = 0.51 * step
    screen = Int8Screen(W)
    rounded = (two_level(x) @ W.double().T)[0]
    assert int(rounded.argmax()) == 0 and float(rounded[0] - rounded[1]) > 900 * step * s
    assert int(exact_argmax(x, W)) == 1
    assert int(screen.argmax(x)) == 1


def test_a_vocabulary_subset_takes_its_rows_of_the_whole_screen():
    """A draft's head over some tokens (`LeanDecoder(vocab=...)`): the screen's rows for those tokens give the
    argmax of the subset's logits, as a token id of the whole vocabulary."""
    model = load_model("tiny-llama").model
    vocab = torch.tensor([3, 17, 40, 41, 99, 180, 255])
    with torch.inference_mode():
        lean = LeanDecoder(model, 40, vocab=vocab)
        h = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(8))
        got = lean.argmax(h)
        assert torch.equal(got, lean.logits(h).argmax(-1)) and set(got.tolist()) <= set(vocab.tolist())
        whole = screen_of(model.lm_head)
        assert lean._screen() is lean._screen() and torch.equal(lean._screen().codes, whole.codes[vocab])
