"""Quantized KV cache (KIVI, Liu et al. 2024): keys per channel, values per token, a full-precision recent window.

KIVI's observation: key activations have a few *channels* with large
magnitudes (the same channels at every position), while values have no such
structure. So keys are quantized per channel -- each group is `group`
consecutive tokens of one channel, which keeps an outlier channel from blowing
up the scale of the others -- and values per token -- each group is `group`
consecutive channels of one token. Per-channel groups need `group` tokens
before they can be formed, so the newest tokens stay in full precision in a
*residual* window; when it reaches `residual` tokens (a multiple of `group`)
they are quantized together and appended to the packed store. The residual
also keeps the tokens a decode step attends to most (the recent ones) exact.
The first `sinks` tokens stay exact too (as in KVQuant): trained models park
spare attention on them ("attention sinks") and their keys are outliers that
would set the scale of their whole per-channel group -- on smollm2 at 2 bits,
keeping just the first token exact took 1,024-token perplexity (chunks of 64)
from 20.00 to 17.16 (13.82 uncompressed).

Codes are asymmetric min/max integers of `bits` (2, 4 or 8) packed into uint8
(`effspec.quant.pack_bits` layout), with float16 scale and minimum per group:
at 4 bits and group 32, 5 bits per element against float32's 32. `update`
dequantizes the store for the attention of the current step; only the packed
form is kept between steps, and `held_bytes` counts exactly that.
"""

from __future__ import annotations

import torch

from effspec.errors import UserError
from effspec.kvcache.base import CompressedCache, CompressedLayer, decoder_blocks, tensor_bytes
from effspec.quant import pack_bits, unpack_bits

KV_BITS = (2, 4, 8)


class PackedGroups:
    """Codes of `bits` packed into bytes, with float16 (scale, minimum) per group along axis `axis`."""

    def __init__(self, groups: torch.Tensor, bits: int, axis: int):
        """`groups`: float, each slice along `axis` one quantization group (the other axes index groups)."""
        lo, hi = groups.amin(axis, keepdim=True), groups.amax(axis, keepdim=True)
        maxq = 2**bits - 1
        scale = ((hi - lo) / maxq).to(torch.float16)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # constant group: any scale reproduces it
        self.scale, self.minimum = scale, lo.to(torch.float16)
        q = ((groups - self.minimum.float()) / self.scale.float()).round_().clamp_(0, maxq)
        self.shape, self.bits = groups.shape, bits
        self.codes = pack_bits(q.to(torch.uint8), bits)

    def dequantize(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """q * scale + minimum, shaped like the groups; written into `out` (any float dtype) if given."""
        n, c = self.shape.numel(), self.codes
        if self.bits == 8:
            q = c
        else:  # the codes of each byte side by side, least significant first (`pack_bits` order)
            mask = 2**self.bits - 1
            q = torch.stack([(c >> shift) & mask for shift in range(0, 8, self.bits)], -1).view(-1)
        q = q[:n].view(self.shape)
        out = q.float() if out is None else out.copy_(q)
        return out.mul_(self.scale.to(out.dtype)).add_(self.minimum.to(out.dtype))

    def nbytes(self) -> int:
        return tensor_bytes(self.codes, self.scale, self.minimum)


def quantize_keys(k: torch.Tensor, bits: int, group: int) -> PackedGroups:
    """k: (b, h, n, d), n a multiple of `group`; groups run along tokens, one per channel."""
    b, h, n, d = k.shape
    return PackedGroups(k.float().view(b, h, n // group, group, d), bits, axis=-2)


def dequantize_keys(p: PackedGroups) -> torch.Tensor:
    b, h, chunks, group, d = p.shape
    return p.dequantize().view(b, h, chunks * group, d)


def quantize_values(v: torch.Tensor, bits: int, group: int) -> PackedGroups:
    """v: (b, h, n, d), d a multiple of `group`; groups run along channels, one per token."""
    b, h, n, d = v.shape
    return PackedGroups(v.float().view(b, h, n, d // group, group), bits, axis=-1)


def dequantize_values(p: PackedGroups) -> torch.Tensor:
    b, h, n, chunks, group = p.shape
    return p.dequantize().view(b, h, n, chunks * group)


class QuantizedLayer(CompressedLayer):
    def __init__(self, bits: int, group: int, residual: int, sinks: int):
        super().__init__(sinks)
        self.bits, self.group, self.residual = bits, group, residual
        self.packed: list[tuple[PackedGroups, PackedGroups]] = []  # (keys, values) per flushed chunk
        self.quantized_tokens = 0

    def lazy_initialization(self, key_states, value_states):
        super().lazy_initialization(key_states, value_states)
        head_dim = key_states.shape[-1]
        self.value_group = min(self.group, head_dim)  # a value group never spans two heads
        if head_dim % self.value_group:
            raise UserError(f"kivi group={self.group} does not divide the head dimension {head_dim}")

    @property
    def held(self) -> int:
        if not self.is_initialized:
            return 0
        return self.sink_keys.shape[-2] + self.quantized_tokens + self.keys.shape[-2]

    def held_bytes(self) -> int:
        if not self.is_initialized:
            return 0
        codes = sum(k.nbytes() + v.nbytes() for k, v in self.packed)
        return codes + tensor_bytes(self.sink_keys, self.sink_values, self.keys, self.values)

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.seen += key_states.shape[-2]
        keys, values = self._states(key_states, value_states)
        key_states, value_states = self.take_sinks(key_states, value_states)  # the first tokens stay exact
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        flush = (self.keys.shape[-2] // self.residual) * self.residual
        if flush:
            self.packed.append((quantize_keys(self.keys[..., :flush, :], self.bits, self.group),
                                quantize_values(self.values[..., :flush, :], self.bits, self.value_group)))
            self.quantized_tokens += flush
            self.keys = self.keys[..., flush:, :].clone()
            self.values = self.values[..., flush:, :].clone()
        return keys, values

    def _states(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Everything held, dequantized, then the new states: written once into fresh (b, h, held + T, d)."""
        b, h, T, d = key_states.shape
        total = self.held + T
        keys, values = key_states.new_empty(b, h, total, d), value_states.new_empty(b, h, total, d)
        parts = [(self.sink_keys, self.sink_values)] + self.packed + [(self.keys, self.values), (key_states, value_states)]
        pos = 0
        for k, v in parts:
            if isinstance(k, PackedGroups):
                n = k.shape.numel() // (b * h * d)
                k.dequantize(out=keys[..., pos:pos + n, :].view(k.shape))
                v.dequantize(out=values[..., pos:pos + n, :].view(v.shape))
            else:
                n = k.shape[-2]
                keys[..., pos:pos + n, :], values[..., pos:pos + n, :] = k, v
            pos += n
        return keys, values

    def reset(self) -> None:
        super().reset()
        self.packed, self.quantized_tokens = [], 0


class QuantizedKVCache(CompressedCache):
    """KIVI cache for every block: `bits` codes in groups of `group`, `residual` newest and `sinks` first tokens exact."""

    def __init__(self, model, bits: int = 4, group: int = 32, residual: int = 128, sinks: int = 1):
        if bits not in KV_BITS:
            raise UserError(f"kivi bits={bits}: expected one of {', '.join(map(str, KV_BITS))}")
        if group < 1 or residual < group or residual % group:
            raise UserError(f"kivi residual={residual} must be a positive multiple of group={group}")
        if sinks < 0:
            raise UserError(f"kivi sinks={sinks} must be >= 0")
        self.bits, self.group, self.residual, self.sinks = bits, group, residual, sinks
        super().__init__([QuantizedLayer(bits, group, residual, sinks) for _ in range(decoder_blocks(model))])
