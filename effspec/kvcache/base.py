"""What every compressed KV cache shares: a transformers `Cache` whose layers hold fewer bytes than they saw.

A compressed layer sees `seen` tokens but holds a subset of them (eviction) or
holds them in fewer bytes (quantization). Two numbers keep transformers' own
forward working unchanged on top of that:

- `get_seq_length()` is `seen`, so new tokens get their true text positions
  (RoPE only ever sees the *difference* of query and key positions, so a key
  kept from far back keeps its meaning);
- `get_mask_sizes(q)` is `(held + q, seen - held)`: the keys returned by
  `update` are the `held` old ones followed by the `q` new ones, and giving the
  old ones indices just below `seen` keeps the causal mask right (every held key
  is visible to every new token; the new tokens see each other causally).

`held_bytes()` counts the bytes of the tensors the layer actually keeps between
forward passes (codes, scales, full-precision rows) -- the figure the KV-memory
measure reports, not an estimate from the configuration.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from effspec.errors import UserError


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


class CompressedLayer(DynamicLayer):
    """One block's cache; subclasses implement `update`, `held` and `held_bytes`.

    `sinks`: how many of the first tokens ever seen the layer keeps as they are (`take_sinks`), apart from
    whatever it does with the rest -- the attention sinks StreamingLLM and KIVI's exact first token keep."""

    is_croppable = False
    is_sliding = False

    def __init__(self, sinks: int = 0):
        super().__init__()
        self.seen, self.sinks = 0, sinks
        self.sink_keys = self.sink_values = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys, self.values = key_states[..., :0, :], value_states[..., :0, :]  # (b, h, 0, d): shapes known
        self.sink_keys, self.sink_values = self.keys, self.values
        self.is_initialized = True

    def take_sinks(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep new tokens as sinks while there is room; the states of the tokens left over."""
        take = min(self.sinks - self.sink_keys.shape[-2], key_states.shape[-2])
        if take <= 0:
            return key_states, value_states
        self.sink_keys = torch.cat([self.sink_keys, key_states[..., :take, :]], -2)
        self.sink_values = torch.cat([self.sink_values, value_states[..., :take, :]], -2)
        return key_states[..., take:, :], value_states[..., take:, :]

    def reset(self) -> None:
        super().reset()
        self.seen, self.sink_keys, self.sink_values = 0, None, None

    @property
    def held(self) -> int:
        raise NotImplementedError

    def held_bytes(self) -> int:
        raise NotImplementedError

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.held + query_length, self.seen - self.held

    def get_max_length(self) -> int:
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        raise UserError(f"{type(self).__name__} cannot be rolled back (crop); use it without assisted generation")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise UserError(f"{type(self).__name__} does not support beam search")


class CompressedCache(Cache):
    """A `Cache` of one `CompressedLayer` per decoder block."""

    def __init__(self, layers: list[CompressedLayer]):
        super().__init__(layers=layers)

    def held_bytes(self) -> int:
        """Bytes of key/value state held right now, across all blocks."""
        return sum(layer.held_bytes() for layer in self.layers)

    def held_tokens(self) -> int:
        return self.layers[0].held if self.layers else 0


def decoder_blocks(model) -> int:
    """The number of attention blocks of a causal LM, from its config."""
    config = getattr(model, "config", model)
    n = getattr(config, "num_hidden_layers", None)
    if not n:
        raise UserError(f"cannot tell the number of decoder blocks of {type(model).__name__} (no num_hidden_layers)")
    return int(n)
