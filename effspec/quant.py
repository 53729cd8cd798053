"""The integer weight grid every quantization step shares: parameters, rounding, bit packing.

A grid is `bits` wide and applies per group of `group_size` consecutive input
columns of a weight row (`group_size=0` means one group per row, i.e.
per-channel). Dequantization is one affine map per group,

    w_hat = q * scale + minimum,   q in {0, ..., 2**bits - 1}

- asymmetric: `minimum` is the group's smallest weight and
  `scale = (max - min) / (2**bits - 1)` -- the min/max form of GGML's Q4_1 and of
  torch's int4 CPU kernel. The offset is a float, not an integer zero point, so
  a grid that already holds the weights (smollm2's Q4_1 blocks of 32)
  reproduces them exactly.
- symmetric: the zero point is fixed at the middle code `2**(bits-1)`, so
  `minimum = -2**(bits-1) * scale` is implied and not stored, and
  `scale = peak / -2**(bits-1)`, where `peak` is the group's largest-magnitude
  weight *with its sign* (GGML's Q4_0 rule; the scale is negative when the peak
  is positive). The peak lands exactly on code 0, the end of the grid with one
  more step, and the other side keeps 2**(bits-1) - 1 steps. GPTQ's reference
  and llm-compressor use `scale = 2 * absmax / (2**bits - 1)` instead, which
  puts the peak on a rounding tie and pulls half the peaks in by half a step; on
  smollm2 at w4 g64 that costs 7% perplexity (26.37 vs 24.43 on two 2048-token
  WikiText-2 windows), because a small model's largest weights matter most.

Scales and minimums are stored in float16 (as GGML does) unless a value falls
outside float16's normal range, in which case float32 is kept; codes are
computed against the stored, rounded parameters so dequantization is exactly
what was optimized.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from effspec.errors import UserError

SUPPORTED_BITS = (2, 3, 4, 8)
FP16_MIN_NORMAL = 6.104e-05


@dataclass(frozen=True)
class Grid:
    bits: int
    group_size: int  # 0 = per-channel (one group per output row)
    symmetric: bool

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def group_for(self, in_features: int, where: str = "") -> int:
        """Effective group size for a layer, or a UserError if it does not divide."""
        if self.group_size == 0:
            return in_features
        if in_features % self.group_size:
            divisors = [g for g in (32, 64, 128, 256) if in_features % g == 0]
            raise UserError(
                f"group_size={self.group_size} does not divide the input width {in_features}"
                f"{' of ' + where if where else ''}; use one of {divisors or 'per-channel (group_size: 0)'}"
            )
        return self.group_size


def storage_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float16 when every nonzero value is a normal float16 number, else float32."""
    for t in tensors:
        a = t.abs()
        if a.numel() and (a.amax() > 6.0e4 or torch.where(a > 0, a, 1.0).amin() < FP16_MIN_NORMAL):
            return torch.float32
    return torch.float16


def grid_params(W: torch.Tensor, grid: Grid, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (scale, minimum), each (out, in/group), rounded to their storage dtype."""
    out, inp = W.shape
    Wg = W.float().reshape(out, inp // group, group)
    wmin, wmax = Wg.amin(-1), Wg.amax(-1)  # two passes: 7x faster than torch.aminmax here
    if grid.symmetric:
        peak = torch.where(wmax >= -wmin, wmax, wmin)  # ties go to the positive side
        scale = peak / -(2 ** (grid.bits - 1))
    else:
        scale = (wmax - wmin) / grid.maxq
    scale = torch.where(scale != 0, scale, torch.ones_like(scale))  # all-zero group: any scale works
    if grid.symmetric:
        minimum = -(2 ** (grid.bits - 1)) * scale
    else:
        minimum = wmin
    dtype = storage_dtype(scale, minimum)
    scale = scale.to(dtype).float()
    minimum = (-(2 ** (grid.bits - 1)) * scale) if grid.symmetric else minimum.to(dtype).float()
    return scale, minimum


def quantize(W: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Round-to-nearest codes (out, in) as uint8 for the given per-group parameters."""
    out, inp = W.shape
    group = inp // scale.shape[1]
    Wg = W.float().reshape(out, -1, group)
    q = (Wg - minimum[..., None]).div_(scale[..., None]).round_().clamp_(0, grid.maxq)
    return q.reshape(out, inp).to(torch.uint8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    """w_hat = q * scale + minimum, per group; (out, in) float32."""
    out, inp = q.shape
    group = inp // scale.shape[1]
    Wg = q.float().reshape(out, -1, group) * scale[..., None] + minimum[..., None]
    return Wg.reshape(out, inp)


def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes < 2**bits into a flat uint8 stream, 8 codes into `bits` bytes, LSB first."""
    flat = q.reshape(-1).to(torch.uint8)
    if bits == 8:
        return flat.clone()
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    if 8 % bits == 0:  # 2 or 4 bits: whole codes per byte, OR-ed in place (10x faster than bit planes)
        per = flat.view(-1, 8 // bits)
        out = per[:, 0].clone()
        for i in range(1, 8 // bits):
            out |= per[:, i] << (i * bits)
        return out
    # 3, 5, 6, 7 bits: 8 codes fill `bits` bytes, code i at bits [bits*i, bits*(i+1)) of the run, LSB first. Each code
    # is OR-ed into the one or two bytes it touches, in uint8 (shifts drop the bits that belong to the next byte):
    # no wider temporaries, ~6x faster than forming 64-bit words (unpacking below: ~5x)
    codes = flat.view(-1, 8)
    out = torch.zeros(codes.shape[0], bits, dtype=torch.uint8)
    for i in range(8):
        byte, shift = divmod(bits * i, 8)
        c = codes[:, i]
        out[:, byte] |= c << shift
        if shift + bits > 8:
            out[:, byte + 1] |= c >> (8 - shift)
    return out.reshape(-1)


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of `pack_bits`: the first `numel` codes as uint8."""
    if bits == 8:
        return packed[:numel]
    if bits == 4:  # the common case, two nibbles per byte, without the bit-plane detour
        return torch.stack([packed & 0xF, packed >> 4], -1).reshape(-1)[:numel]
    if bits == 2:  # four codes per byte (2-bit KV caches unpack every step)
        shifts = torch.arange(0, 8, 2, dtype=torch.uint8)
        return ((packed.view(-1, 1) >> shifts) & 3).reshape(-1)[:numel]
    # the other widths: `bits` bytes hold 8 codes, code i from bit bits*i on (see `pack_bits`)
    runs = packed.view(-1, bits)
    codes = torch.empty(runs.shape[0], 8, dtype=torch.uint8)
    for i in range(8):
        byte, shift = divmod(bits * i, 8)
        c = runs[:, byte] >> shift
        if shift + bits > 8:
            c = c | (runs[:, byte + 1] << (8 - shift))
        codes[:, i] = c & (2**bits - 1)
    return codes.reshape(-1)[:numel]
