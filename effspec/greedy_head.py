"""The exact argmax of a float32 head without reading all of its float32 weights: an int8 screen, then a recheck.

Greedy decoding needs only the index of the largest logit, yet a 49,152 x 576
float32 head is 113 MB read every step, a fifth of smollm2-135m's bytes. An
int8 copy of the head (per-row scale max|w| / 127) is a quarter of that. Its
logits y' differ from the float32 ones y by at most

    |y'_n - y_n| <= C_n * ||x||_1 + 4u |y'_n|,
    C_n = 1.01 * (max_k |w_nk - s_n q_nk| + gamma_K * (s_n max_k |q_nk| + max_k |w_nk|)),

the first term the rounding of the weights to the int8 grid, the second the float32 summation error of both dot
products (gamma_K = K u / (1 - K u), u = 2^-24, any order of K additions), the last the screen's final scaling.
With AVX512-VNNI the screen multiplies integers: x is rounded too, to two int8 levels (s_x (x1 + x2 / 254),
2^-15 of max|x|), and the bound gains 127 s_n sum_k |x_k - x^_k| (|w^_nk| <= 127 s_n); on smollm2 that term is
~4% of the bound.
Every n whose upper bound y'_n + b_n reaches the best lower bound max_m (y'_m - b_m) is recomputed with
`linear_rows`' own one-row arithmetic, so the chosen index is the first of the largest float32 logits, exactly
what `logits.argmax(-1)` gives, ties included. On smollm2 over 1,024 WikiText positions the bound left 5.5
candidates on average (at most 62) out of 49,152 (5.95 and 70 with x rounded as well). The head alone, 1 thread:
one row 4.06 -> 1.14 ms, 4 rows 4.34 -> 2.81, 8 rows 6.54 -> 5.48 with the float screen; the integer screen
0.15-1.1 ms less again (4 rows 2.10, 8 rows 4.61 against 2.89 and 5.69, one process alternating). A whole one-row
step at a 150-token context: 22.77 -> 18.98 ms.

The int8 copy is built once per head weight (0.1-0.2 s for smollm2; `LeanDecoder.prepare_argmax` builds it
before a timed prefill), cached on the module and rebuilt if the weight changes; it costs a quarter of the head's
bytes. The C++ part is `screened_argmax` in `effspec.kernels`.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from effspec import kernels

ROW_CHUNK = 4096  # rows of the head converted at a time: no whole-head float temporaries


class Int8Screen:
    """A float32 weight (N, K)'s int8 codes, per-row scales and error coefficients C_n."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight
        N, K = weight.shape
        u = 2.0 ** -24
        gamma = K * u / (1 - K * u)
        self.codes = torch.empty(N, K, dtype=torch.int8)
        self.scale = torch.empty(N, dtype=torch.float32)
        self.coef = torch.empty(N, dtype=torch.float32)
        for i in range(0, N, ROW_CHUNK):
            w = weight[i:i + ROW_CHUNK].detach()
            amax = w.abs().amax(1)
            scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
            q = torch.round(w / scale[:, None]).clamp(-127, 127)
            # max |w - s q| in float32: the product and the difference each round by at most u * amax
            grid = (w - q * scale[:, None]).abs().amax(1).double() + 2 * u * amax.double()
            coef = 1.01 * (grid + gamma * (scale.double() * q.abs().amax(1).double() + amax.double()))
            self.codes[i:i + ROW_CHUNK] = q.to(torch.int8)
            self.scale[i:i + ROW_CHUNK] = scale
            self.coef[i:i + ROW_CHUNK] = coef.float() * (1 + 2 ** -20)  # rounded up past float32's rounding

    @classmethod
    def rows_of(cls, parent: "Int8Screen", index: torch.Tensor, weight: torch.Tensor) -> "Int8Screen":
        """The screen of `weight` = parent.weight[index] (a draft's head over a vocabulary subset), its codes and
        bounds taken from the parent's rows instead of computed again."""
        screen = cls.__new__(cls)
        screen.weight = weight
        screen.codes = parent.codes[index].contiguous()
        screen.scale, screen.coef = parent.scale[index].contiguous(), parent.coef[index].contiguous()
        return screen

    def argmax(self, x: torch.Tensor) -> torch.Tensor | None:
        """The float32 logits' argmax of each row of x (rows <= 8, K), or None where the screen cannot say (a
        non-finite input or logit): the caller then computes the logits."""
        picks = kernels.decode_ops().screened_argmax(x.contiguous(), self.weight, self.codes, self.scale, self.coef)
        return None if bool((picks < 0).any()) else picks


# head -> ((its weight's data pointer, version), its screen, or None for a weight with a NaN or inf)
_SCREENS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def screen_of(head: nn.Module) -> Int8Screen | None:
    """The cached int8 screen of a plain float32 bias-free `nn.Linear` head, built on first use and again after its
    weight changes (a new tensor or an in-place update); None for any other head or without the compiled kernels."""
    if type(head) is not nn.Linear or head.bias is not None or head.weight.dtype != torch.float32:
        return None
    if kernels.decode_ops() is None or not head.weight.is_contiguous() or head.weight.device.type != "cpu":
        return None
    key = (head.weight.data_ptr(), head.weight._version)
    cached = _SCREENS.get(head)
    if cached is None or cached[0] != key:
        with torch.no_grad():  # a weight with a NaN or inf keeps the float32 path (None, remembered)
            finite = bool(torch.isfinite(head.weight).all())
            cached = (key, Int8Screen(head.weight.detach()) if finite else None)
        _SCREENS[head] = cached
    return cached[1]
