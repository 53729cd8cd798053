"""Streaming cache (StreamingLLM, Xiao et al. 2024): attention sinks plus a window of recent tokens.

A plain sliding window collapses once the first tokens leave it: softmax needs
somewhere to put attention mass a query does not want to spend, and trained
models park it on the first few tokens ("attention sinks") whatever they say.
Keeping those `sinks` tokens plus the `window` most recent ones holds memory
constant for unbounded generation while perplexity stays at the window's level.

Positions follow the paper's rule -- *within the cache*, not the text: the
held keys must look contiguous to a query, otherwise the distance from the
query to the sinks grows past anything seen in training. The window's keys
keep the rotation they got at their own text positions (the window is
contiguous and ends right before the query, so its distances are already
right), and the sinks are re-rotated on every step to sit just before the
window. RoPE rotations compose, so moving a key by `delta` positions is one
more rotation by `delta * inv_freq`; only the `sinks` keys are touched per step.
Queries keep their text positions; RoPE scores depend only on the difference,
so a query at position 16,000 against keys it sees at distances below
`sinks + window` behaves as within the trained context.
"""

from __future__ import annotations

import torch

from effspec.decoder import rope
from effspec.errors import UserError
from effspec.kvcache.base import CompressedCache, CompressedLayer, decoder_blocks, tensor_bytes


def rope_inv_freq(model) -> torch.Tensor:
    """The rotary frequencies (head_dim / 2,) of a RoPE model: the rotary embedding's `inv_freq` buffer."""
    for module in model.modules():
        inv = getattr(module, "inv_freq", None)
        if isinstance(inv, torch.Tensor):
            return inv.detach().double().clone()
    raise UserError(f"{type(model).__name__} has no rotary embedding (inv_freq): the streaming cache needs RoPE")


def rotate_by(k: torch.Tensor, delta: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """RoPE-rotate keys (..., d) by `delta` more positions, in transformers' half-split layout."""
    angle = torch.cat([delta * inv_freq] * 2)
    return rope(k, angle.cos().to(k.dtype), angle.sin().to(k.dtype))


class StreamingLayer(CompressedLayer):
    def __init__(self, sinks: int, window: int, inv_freq: torch.Tensor):
        super().__init__(sinks)  # sink keys stay rotated at their own positions 0..sinks-1
        self.window, self.inv_freq = window, inv_freq

    @property
    def held(self) -> int:
        if not self.is_initialized:
            return 0
        return self.sink_keys.shape[-2] + self.keys.shape[-2]

    def held_bytes(self) -> int:
        return tensor_bytes(self.sink_keys, self.sink_values, self.keys, self.values) if self.is_initialized else 0

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.seen += key_states.shape[-2]
        key_states, value_states = self.take_sinks(key_states, value_states)  # the first tokens become the sinks
        n_sinks = self.sink_keys.shape[-2]
        window_start = self.seen - key_states.shape[-2] - self.keys.shape[-2]  # window + new tokens: contiguous
        delta = window_start - n_sinks  # sinks move from 0..n-1 to just before the window
        sink_keys = rotate_by(self.sink_keys, delta, self.inv_freq) if delta else self.sink_keys
        keys = torch.cat([sink_keys, self.keys, key_states], -2)
        values = torch.cat([self.sink_values, self.values, value_states], -2)
        self.keys = keys[..., n_sinks:, :][..., -self.window:, :].clone()
        self.values = values[..., n_sinks:, :][..., -self.window:, :].clone()
        return keys, values


class StreamingCache(CompressedCache):
    """`sinks` first tokens plus the `window` latest ones, in every block; constant memory."""

    def __init__(self, model, window: int = 1024, sinks: int = 4):
        if window < 1 or sinks < 0:
            raise UserError(f"streaming window={window} must be >= 1 and sinks={sinks} >= 0")
        self.window, self.sinks = window, sinks
        inv_freq = rope_inv_freq(model)
        super().__init__([StreamingLayer(sinks, window, inv_freq) for _ in range(decoder_blocks(model))])
