"""W8A8: int8 weights per output channel, int8 activations per token, multiplied as integers.

Every targeted linear layer y = X W^T + b (X: tokens x in) becomes

    s_w[o] = max_j |W[o, j]| / 127,   W_q = round(W / s_w)        per output channel, static, stored
    s_x[t] = max_j |X[t, j]| / 127,   X_q = round(X / s_x)        per token, dynamic (at run time)
    y      = (X_q W_q^T) * s_x s_w^T + b                          int8 x int8 -> int32, then rescale

the scheme of llm-compressor's `W8A8` preset (compressed-tensors INT8 W8A8:
symmetric int8 weights per channel, symmetric int8 input activations per
token, dynamic) and of SmoothQuant's reference `W8A8Linear` for Llama-like
models (weight "per_channel", activation "per_token"). Codes stay in [-127, 127]
with scale absmax / 127 as in SmoothQuant's and LLM.int8()'s reference code
(compressed-tensors divides by 127.5 and clamps to [-128, 127]); the int8
kernels below need |code| <= 127. The layer stores the int8 codes (1 byte a
weight) and one scale per output channel (float16, float32 if out of range).

The integer matmul. `torch._int_mm` on CPU computes exactly on any shape (no
CUDA-style rows > 16 / multiple-of-8 rules: checked from 1 row and odd widths
up). oneDNN's u8 x s8 -> s32 GEMM (`torch.ops.onednn.qlinear_pointwise`, the
op torch's inductor lowers int8 linears to) is vectorized everywhere, but
without AVX512-VNNI it multiplies byte pairs into saturating int16 sums (x86
`vpmaddubsw`): u8 codes up to 255 times s8 up to 127 overflow. So, by backend:

- "onednn": one u8 GEMM on X_q + 128 with input zero point 128, used where a
  probe shows full-range sums are exact (VNNI CPUs).
- "onednn-split": X_q = X+ - X- with X+, X- = max(+-X_q, 0) in [0, 127], computed as
  one u8 GEMM [X+, X-] @ [W_q, -W_q]^T over 2 * in columns: every byte pair sums
  to at most 2 * 127 * 127 = 32258 < 2^15, so it is exact whatever the int8
  instructions, at twice the multiply-adds. The default where the probe fails.
- "int_mm": `torch._int_mm(X_q, W_q^T)`; exact, portable.

Measured at a prefill shape (2048x576 @ 576x1536, 1 thread, best of 5):
- Zen 4 (AVX512-VNNI; the probe passes): float32 41.6 ms, bf16 18.3 ms,
  "onednn" 10.5 ms (11.7 ms with the per-token quantization of X),
  "onednn-split" 18.9 ms, "int_mm" 11.1 ms. int8 prefill is ~3.5x float32.
- An earlier AVX2 machine without VNNI: "onednn-split" 546 ms against float32's
  278 ms, and `_int_mm` 15-20x slower than float32 (a plain loop; oneDNN is not
  reached). There, int8 buys bytes, not time.
At a few rows (decode, a speculative verify) the per-call overheads of that
path (quantizing X in ~8 torch ops, the oneDNN call) are not amortized: W8A8
decoded at about half the speed of effspec's float32 path. Up to FEW_ROWS rows
the layer therefore calls effspec.kernels' `w8a8_rows` instead: the same
quantizer and exact int32 dot products in one compiled call, equal to the
backends' outputs bitwise (tested), unless a backend is forced.

oneDNN returns float32 (int32 sum converted, times s_w fused), so outputs equal
the int64 reference to float32 rounding. Backend operands are built on first
use and not saved.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass
from typing import Iterator, cast

import torch
from torch import nn

from effspec import kernels
from effspec.config import expect
from effspec.layers import PACKED_LAYERS
from effspec.progress import track
from effspec.quant import storage_dtype
from effspec.registry import register
from effspec.surgery import linear_layers, replace_module

log = logging.getLogger(__name__)

QMAX = 127  # symmetric int8 codes in [-127, 127] (SmoothQuant / LLM.int8() reference quantizers)
BACKENDS = ("onednn", "onednn-split", "int_mm")
FEW_ROWS = 8  # up to this many rows (tokens), the compiled w8a8_rows kernel; more, the backend's GEMM
_forced_backend: str | None = None


# ---- the quantizers (pure) --------------------------------------------------------------------
def quantize_per_channel(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_q int8 (out, in), s_w (out,) float32 holding its stored value) for W (out, in)."""
    s_w = W.float().abs().amax(1) / QMAX
    s_w = torch.where(s_w > 0, s_w, torch.ones_like(s_w))  # an all-zero row: any scale works
    s_w = s_w.to(storage_dtype(s_w)).float()  # codes against the stored, rounded scale
    W_q = torch.round(W.float() / s_w[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return W_q, s_w


def quantize_per_token(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(X_q (tokens, in) float32 holding integers in [-127, 127], s_x (tokens, 1)) for X (tokens, in)."""
    s_x = X.abs().amax(-1, keepdim=True) / QMAX
    s_x = torch.where(s_x > 0, s_x, torch.ones_like(s_x))
    return torch.round(X / s_x).clamp_(-QMAX, QMAX), s_x


# ---- the integer matmul -----------------------------------------------------------------------
def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")


def _qlinear(X_u8: torch.Tensor, zero_point: int, packed: torch.Tensor, s_w: torch.Tensor) -> torch.Tensor:
    """oneDNN u8 x s8 -> s32 GEMM, returned as float32 (X_u8 - zero_point) @ W^T * s_w."""
    zeros = torch.zeros(s_w.shape[0], dtype=torch.long)
    return torch.ops.onednn.qlinear_pointwise(X_u8, 1.0, zero_point, packed, s_w, zeros, None, 1.0, 0,
                                              torch.float32, "none", [], "")


@functools.cache
def _onednn_exact_full_range() -> bool:
    """Whether oneDNN's u8 GEMM keeps exact int32 sums for codes up to 255 x 127 on this CPU (VNNI)."""
    g = torch.Generator().manual_seed(0)
    X_q = torch.full((4, 64), QMAX, dtype=torch.int16)
    X_q[2:] = torch.randint(-QMAX, QMAX + 1, (2, 64), generator=g, dtype=torch.int16)
    W_q = torch.full((8, 64), QMAX, dtype=torch.int8)
    W_q[4:] = torch.randint(-QMAX, QMAX + 1, (4, 64), generator=g, dtype=torch.int8)
    y = _qlinear((X_q + 128).to(torch.uint8), 128, torch.ops.onednn.qlinear_prepack(W_q, None), torch.ones(8))
    return bool(torch.equal(y.double(), X_q.double() @ W_q.double().t()))


def int8_backend() -> str:
    """The integer matmul in use: forced by `use_backend`, else the fastest exact one here."""
    if _forced_backend is not None:
        return _forced_backend
    if not _onednn_available():
        return "int_mm"
    return "onednn" if _onednn_exact_full_range() else "onednn-split"


def available_backends() -> list[str]:
    """Backends that compute exactly on this machine."""
    if not _onednn_available():
        return ["int_mm"]
    return (["onednn"] if _onednn_exact_full_range() else []) + ["onednn-split", "int_mm"]


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force one integer matmul backend (tests, benchmarks)."""
    global _forced_backend
    expect(name in BACKENDS, "backend", name, f"one of {BACKENDS}")
    before, _forced_backend = _forced_backend, name
    try:
        yield
    finally:
        _forced_backend = before


class Int8Matmul:
    """X_q (tokens, in) -> (X_q W_q^T) * s_w as float32, with W_q prepared once for one backend."""

    def __init__(self, W_q: torch.Tensor, s_w: torch.Tensor, backend: str):
        self.backend, self.s_w = backend, s_w.float().contiguous()
        if backend == "onednn":
            self.W = torch.ops.onednn.qlinear_prepack(W_q.contiguous(), None)
        elif backend == "onednn-split":
            self.W = torch.ops.onednn.qlinear_prepack(torch.cat([W_q, -W_q], 1).contiguous(), None)  # (out, 2 in)
        else:
            self.W = W_q.t()  # (in, out) view: measured faster than a contiguous transpose

    def __call__(self, X_q: torch.Tensor) -> torch.Tensor:
        if self.backend == "onednn":
            return _qlinear((X_q + 128).to(torch.uint8), 128, self.W, self.s_w)
        if self.backend == "onednn-split":
            q = X_q.to(torch.int8)
            X_pm = torch.cat([q.clamp(min=0), q.neg().clamp_(min=0)], 1).view(torch.uint8)  # [X+, X-] in [0, 127]
            return _qlinear(X_pm, 0, self.W, self.s_w)
        return torch._int_mm(X_q.to(torch.int8), self.W).float() * self.s_w


# ---- the packed layer -------------------------------------------------------------------------
class W8A8Linear(nn.Module):
    """y = int8(X) int8(W)^T rescaled, + b: int8 codes per output channel, activations quantized per token."""

    kind = "w8a8"
    qweight: torch.Tensor  # (out, in) int8 codes
    scales: torch.Tensor  # (out,) s_w
    bias: torch.Tensor | None

    def __init__(self, in_features: int, out_features: int, bias: bool, scale_dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features, dtype=scale_dtype))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._mm: Int8Matmul | None = None

    @classmethod
    def from_codes(cls, W_q: torch.Tensor, s_w: torch.Tensor, bias: torch.Tensor | None) -> "W8A8Linear":
        out, inp = W_q.shape
        layer = cls(inp, out, bias is not None, storage_dtype(s_w))
        layer.qweight.copy_(W_q)
        layer.scales.copy_(s_w)
        if bias is not None and layer.bias is not None:
            layer.bias.copy_(bias.detach().float())
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "W8A8Linear":
        W_q, s_w = quantize_per_channel(linear.weight.detach())
        return cls.from_codes(W_q, s_w, linear.bias)

    def manifest(self) -> dict:
        return {"kind": self.kind, "bias": self.bias is not None,
                "scale_dtype": str(self.scales.dtype).removeprefix("torch.")}

    @classmethod
    def from_manifest(cls, m: dict, in_features: int, out_features: int) -> "W8A8Linear":
        return cls(in_features, out_features, bool(m["bias"]), getattr(torch, m["scale_dtype"]))

    @property
    def weight(self) -> torch.Tensor:
        """The float weight W_q * s_w this layer represents (computed; for inspection and exporters)."""
        return self.qweight.float() * self.scales.float()[:, None]

    def _load_from_state_dict(self, *args, **kwargs):  # new codes invalidate the backend's copy
        self._mm = None
        super()._load_from_state_dict(*args, **kwargs)

    def matmul(self) -> Int8Matmul:
        backend = int8_backend()
        if self._mm is None or self._mm.backend != backend:
            self._mm = Int8Matmul(self.qweight, self.scales, backend)
        return self._mm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        X = x.reshape(-1, shape[-1]).float()
        mm = self.matmul()
        ops = kernels.decode_ops() if 0 < X.shape[0] <= FEW_ROWS and _forced_backend is None else None
        if ops is not None:
            y = ops.w8a8_rows(X.contiguous(), self.qweight, mm.s_w, kernels.EMPTY if self.bias is None else self.bias)
        else:
            X_q, s_x = quantize_per_token(X)
            y = mm(X_q) * s_x
            if self.bias is not None:
                y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, w8 per-channel, a8 per-token, {int8_backend()}"


PACKED_LAYERS[W8A8Linear.kind] = W8A8Linear  # type: ignore[assignment]


# ---- the step ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class W8A8Config:
    targets: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = ("lm_head",)  # llm-compressor's W8A8 examples keep the output head in float

    def __post_init__(self):
        expect(len(self.targets) > 0, "targets", self.targets, "at least one module name pattern")


def quantize_linears(model: nn.Module, names: list[str]) -> None:
    """Replace each named float linear of `model` by its W8A8Linear (round to nearest)."""
    for name in names:
        replace_module(model, name, W8A8Linear.from_linear(cast(nn.Linear, model.get_submodule(name))))


@register("w8a8", family="quantize", stage="inference", config=W8A8Config)
def apply(model: nn.Module, cfg: W8A8Config, calib=None) -> nn.Module:
    names = list(linear_layers(model, cfg.targets, cfg.ignore, step="w8a8"))
    for name in track(names, "w8a8", total=len(names)):
        quantize_linears(model, [name])
    log.info("w8a8: %d linear layers to int8 weights and activations (%s matmul)", len(names), int8_backend())
    return model
