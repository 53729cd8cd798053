"""Packed linear layers in the two non-integer weight formats: NF4 (QLoRA) and FP8 e4m3.

- `NF4Linear` (Dettmers et al., "QLoRA: Efficient Finetuning of Quantized
  LLMs", 2023, Sec. 3): each weight is a 4-bit index into the 16-value
  NormalFloat codebook `nf4_codebook()`, two indices a byte (low nibble first,
  as `effspec.quant.pack_bits` does for 4 bits), scaled by the absolute
  maximum of its block of `blocksize` consecutive input columns,

      W_hat[o, j] = absmax[o, j // blocksize] * NF4[q[o, j]]          (Eq. 1 dequantized)

  The absmax is stored in float16, or with double quantization (Sec. 3,
  "Double Quantization"; Eq. 6's doubleDequant) as 8-bit floats c2 per absmax,
  one float32 scale c1 per block of `DQ_BLOCKSIZE` = 256 of them, and the
  float32 mean that was subtracted before: absmax = c2 * c1 + mean.
- `FP8Linear`: each weight is an OCP FP8 E4M3 number (torch.float8_e4m3fn,
  1 byte: sign, 4 exponent bits with bias 7, 3 mantissa bits, max 448, no
  infinities) times a float32 scale per output channel or per group:
  W_hat = fp8 * scale.

Stored size is those bytes. Forward rebuilds W_hat on every call (no float
copy stays resident) and runs `F.linear`. torch 2.13 has no CPU matmul that
reads either format from weights alone: `torch._scaled_mm` runs on CPU but
needs float8 activations as well (a W8A8 method, not this one) and measured
~100x slower than a float32 matmul of the same shape. Casting float8 to
float32 with `.float()` is also slow on CPU (~10 ns a weight), so both formats
decode through lookup tables with `index_select`: NF4 maps each packed byte to
its two values at once (a 256-entry table of value pairs), FP8 each pair of
bytes to its two values (a 65536-entry table).

Rebuilding W_hat costs more than a batch-1 matmul (1536x576: ~1.5 ms against
~0.1 ms), so decode runs several times slower than float32 (measured on
smollm2-135m, 1 thread, on a shared loaded machine: float32 3.3-4.4, NF4 1.4,
FP8 1.1 tokens/s). Like `QuantLinear`, NF4 below `effspec.layers.KERNEL_MAX_ROWS` rows
dequantizes and multiplies in bfloat16 (1.2-1.3x faster decode than float32;
differs from the exact path by bfloat16 rounding, tests bound it) and from
that many rows up (perplexity windows, prefill) in float32, exact;
`effspec.layers.kernels(False)` / `EFFSPEC_KERNELS=0` forces float32. For FP8
bfloat16 measured slower, so it always runs the exact float32 path.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from effspec.frozen import frozen_linear, needs_grad

# The outermost probability at which the N(0, 1) quantile function is evaluated:
# Eq. 4 taken literally ends at Q_X(1) = inf, so QLoRA's reference code
# (bitsandbytes `create_normal_map`) stops at delta = 0.9677083, numerically
# 1/2 * ((1 - 1/(2*15)) + (1 - 1/(2*16))), the mean of the centres of the
# outermost of 15 and of 16 equal-probability bins. It reproduces the published
# table (QLoRA appendix E; checked in tests/test_nf4_fp8.py).
NF4_DELTA = 0.9677083
DQ_BLOCKSIZE = 256  # QLoRA Sec. 3: "8-bit Floats with a blocksize of 256 for the second quantization"
FP8_MAX = 448.0  # largest finite float8_e4m3fn: 1.75 * 2**8


def nf4_codebook() -> torch.Tensor:
    """The 16 NF4 values, ascending, in [-1, 1] with an exact zero (QLoRA Sec. 3, Eq. 4, appendix E).

    "Estimating the quantiles q_i of two ranges": 2^(k-1) = 8 quantiles of N(0, 1)
    for the negative half and 2^(k-1) + 1 = 9 for the positive half, each at
    equally spaced probabilities from delta down to 1/2 (the last of which is the
    median, zero), so both halves contain an exact 0; unify the sets, keep one
    zero (7 negative + 0 + 8 positive = 16 values) and normalize by the largest
    value into [-1, 1].
    """
    k = 4
    p_pos = torch.linspace(NF4_DELTA, 0.5, 2 ** (k - 1) + 1, dtype=torch.float64)  # 9 probabilities
    p_neg = torch.linspace(NF4_DELTA, 0.5, 2 ** (k - 1), dtype=torch.float64)  # 8 probabilities
    q_pos = torch.special.ndtri(p_pos)[:-1]  # 8 positive quantiles (the 9th is the zero)
    q_neg = -torch.special.ndtri(p_neg)[:-1]  # 7 negative quantiles
    q = torch.cat([q_neg, torch.zeros(1, dtype=torch.float64), q_pos]).sort().values
    return (q / q.max()).float()  # q_neg's end -Q(delta) and q_pos's end Q(delta) normalize to -1 and 1


_PAIR_INT = {torch.float32: torch.int64, torch.bfloat16: torch.int32}  # an integer as wide as two values


@functools.lru_cache(maxsize=2)
def _nf4_byte_table(dtype: torch.dtype) -> torch.Tensor:
    """(256,) integers: for each packed byte, its (low nibble, high nibble) NF4 values as two `dtype` values."""
    C = nf4_codebook()
    b = torch.arange(256)
    pairs = torch.stack([C[b & 0xF], C[b >> 4]], -1).to(dtype).contiguous()  # (256, 2)
    return pairs.view(_PAIR_INT[dtype]).view(256)


@functools.lru_cache(maxsize=1)
def fp8_table() -> torch.Tensor:
    """(256,) float32: the value of every float8_e4m3fn bit pattern (NaN at 0x7F and 0xFF)."""
    return torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()


@functools.lru_cache(maxsize=1)
def _fp8_pair_table() -> torch.Tensor:
    """(65536,) int64: for every 2-byte pattern (read as int16), its two float8 values as two float32."""
    byte_pairs = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.uint8).view(65536, 2).long()
    return fp8_table()[byte_pairs].contiguous().view(torch.int64).view(65536)  # 512 KB, built once


def fp8_to_float(x: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn -> float32 by table lookup (torch's own cast measured 5-10x slower on CPU).

    Two bytes per lookup when the count is even (measured ~1.2x faster decode than one byte per lookup).
    """
    flat = x.contiguous().view(torch.uint8).reshape(-1)
    if flat.numel() % 2:
        return fp8_table().index_select(0, flat.int()).view(x.shape)
    idx = flat.view(torch.int16).int() & 0xFFFF
    return _fp8_pair_table().index_select(0, idx).view(torch.float32).view(x.shape)


def dequantize_absmax(c2: torch.Tensor, c1: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Double-quantized absmax back to float32: c2 (any shape, float8) * c1 (per 256) + mean."""
    flat = fp8_to_float(c2).reshape(-1)
    n = flat.numel()
    flat = F.pad(flat, (0, (-n) % DQ_BLOCKSIZE)).view(-1, DQ_BLOCKSIZE)
    return (flat * c1[:, None] + mean).reshape(-1)[:n].view(c2.shape)


def _bias(layer: NF4Linear | FP8Linear, bias: torch.Tensor | None) -> None:
    if bias is not None and layer.bias is not None:
        layer.bias.copy_(bias.detach().float())


class NF4Linear(nn.Module):
    """y = x W_hat^T + b with W_hat = absmax * NF4[q], codes packed two a byte."""

    kind = "nf4"
    qweight: torch.Tensor  # (out * in / 2,) uint8
    absmax: torch.Tensor  # (out, in / blocksize) float16, without double quantization
    absmax_q: torch.Tensor  # (out, in / blocksize) float8_e4m3fn, with it
    absmax_scale: torch.Tensor  # (ceil(out * in / blocksize / 256),) float32
    absmax_mean: torch.Tensor  # (1,) float32
    bias: torch.Tensor | None

    def __init__(self, in_features: int, out_features: int, blocksize: int, bias: bool,
                 absmax_dtype: torch.dtype, double_quant: bool):
        """absmax_dtype: float16 or float32 for plain absmax; with double_quant the codes are float8_e4m3fn."""
        super().__init__()
        self.in_features, self.out_features, self.blocksize = in_features, out_features, blocksize
        self.double_quant = double_quant
        n_blocks = in_features // blocksize
        self.register_buffer("qweight", torch.zeros(in_features * out_features // 2, dtype=torch.uint8))
        if double_quant:
            n_dq = (out_features * n_blocks + DQ_BLOCKSIZE - 1) // DQ_BLOCKSIZE
            self.register_buffer("absmax_q", torch.zeros(out_features, n_blocks, dtype=torch.float8_e4m3fn))
            self.register_buffer("absmax_scale", torch.ones(n_dq))
            self.register_buffer("absmax_mean", torch.zeros(1))
        else:
            self.register_buffer("absmax", torch.ones(out_features, n_blocks, dtype=absmax_dtype))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_codes(cls, q: torch.Tensor, absmax: dict[str, torch.Tensor], blocksize: int,
                   bias: torch.Tensor | None) -> "NF4Linear":
        """Wrap codes q (out, in) in 0..15 and the stored absmax tensors (buffer name -> tensor)."""
        out, inp = q.shape
        double = "absmax_q" in absmax
        dtype = torch.float8_e4m3fn if double else absmax["absmax"].dtype
        layer = cls(inp, out, blocksize, bias is not None, dtype, double)
        pairs = q.reshape(-1, 2).to(torch.uint8)  # blocksize is even, so every row packs whole bytes
        layer.qweight.copy_(pairs[:, 0] | (pairs[:, 1] << 4))
        for name, t in absmax.items():
            getattr(layer, name).copy_(t)
        _bias(layer, bias)
        return layer

    def manifest(self) -> dict:
        dtype = self.absmax_q.dtype if self.double_quant else self.absmax.dtype
        return {"kind": self.kind, "blocksize": self.blocksize, "double_quant": self.double_quant,
                "bias": self.bias is not None, "absmax_dtype": str(dtype).removeprefix("torch.")}

    @classmethod
    def from_manifest(cls, m: dict, in_features: int, out_features: int) -> "NF4Linear":
        return cls(in_features, out_features, int(m["blocksize"]), bool(m["bias"]),
                   getattr(torch, m["absmax_dtype"]), bool(m["double_quant"]))

    def absmax_values(self) -> torch.Tensor:
        """(out, in/blocksize) float32 absmax, as dequantization uses it."""
        if self.double_quant:
            return dequantize_absmax(self.absmax_q, self.absmax_scale, self.absmax_mean)
        return self.absmax.float()

    def codes(self) -> torch.Tensor:
        """(out, in) uint8 NF4 indices."""
        b = self.qweight
        return torch.stack([b & 0xF, b >> 4], -1).view(self.out_features, self.in_features)

    def dequantized_weight(self) -> torch.Tensor:
        return self._dequantize(torch.float32)

    def _dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        out, inp = self.out_features, self.in_features
        values = _nf4_byte_table(dtype).index_select(0, self.qweight.int()).view(dtype)  # (out * in,)
        W = values.view(out, inp // self.blocksize, self.blocksize) * self.absmax_values().to(dtype)[..., None]
        return W.view(out, inp)

    @property
    def weight(self) -> torch.Tensor:
        """The float weight this layer represents (computed; for inspection and exporters)."""
        return self.dequantized_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from effspec import layers  # the shared kernel switch and row threshold (importing at the top would cycle)

        if needs_grad(x):  # inside training (QLoRA): the weight is frozen, its float copy not kept
            return frozen_linear(x, self)
        if layers._KERNELS and x.numel() // x.shape[-1] < layers.KERNEL_MAX_ROWS:  # decode: bfloat16 path
            y = F.linear(x.to(torch.bfloat16), self._dequantize(torch.bfloat16)).to(x.dtype)
            return y if self.bias is None else y + self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, nf4, block={self.blocksize}"
                f"{', double_quant' if self.double_quant else ''}")


class FP8Linear(nn.Module):
    """y = x W_hat^T + b with W_hat = fp8 * scale, one float32 scale per row or per group."""

    kind = "fp8"
    qweight: torch.Tensor  # (out, in) float8_e4m3fn
    scales: torch.Tensor  # (out, in / group) float32
    bias: torch.Tensor | None

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.group = group_size or in_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.float8_e4m3fn))
        self.register_buffer("scales", torch.ones(out_features, in_features // self.group))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_codes(cls, w8: torch.Tensor, scale: torch.Tensor, group_size: int,
                   bias: torch.Tensor | None) -> "FP8Linear":
        """Wrap float8 weights w8 (out, in) and their float32 scales (out, in/group)."""
        out, inp = w8.shape
        layer = cls(inp, out, group_size, bias is not None)
        layer.qweight.copy_(w8)
        layer.scales.copy_(scale)
        _bias(layer, bias)
        return layer

    def manifest(self) -> dict:
        return {"kind": self.kind, "group_size": self.group_size, "bias": self.bias is not None}

    @classmethod
    def from_manifest(cls, m: dict, in_features: int, out_features: int) -> "FP8Linear":
        return cls(in_features, out_features, int(m["group_size"]), bool(m["bias"]))

    def dequantized_weight(self) -> torch.Tensor:
        out, inp = self.out_features, self.in_features
        W = fp8_to_float(self.qweight).view(out, inp // self.group, self.group) * self.scales[..., None]
        return W.view(out, inp)

    @property
    def weight(self) -> torch.Tensor:
        """The float weight this layer represents (computed; for inspection and exporters)."""
        return self.dequantized_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if needs_grad(x):
            return frozen_linear(x, self)
        return F.linear(x, self.dequantized_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, fp8 e4m3, group={self.group_size or 'channel'}"
