"""Run calibration data through a model one decoder block at a time.

GPTQ, SparseGPT, Wanda and AWQ all fit block i to the inputs it sees *after*
blocks < i were already compressed. `run_blocks` gives each step exactly that:
it captures what enters the first block (hidden states plus the keyword
arguments the model passes every block -- position embeddings, masks), hands
block i and its inputs to the step's `process`, then runs the (possibly
changed) block to produce the inputs of block i+1. Only one block's inputs are
held at a time, so peak memory is about one block plus its activations, not
the whole model's.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from effspec.progress import track
from effspec.surgery import decoder_blocks


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass once block 0's inputs are known."""


def block0_inputs(model: nn.Module, ids: torch.Tensor) -> tuple[list[torch.Tensor], dict]:
    """Hidden states entering block 0 for each calibration sequence, and the shared block kwargs."""
    blocks = decoder_blocks(model)
    xs: list[torch.Tensor] = []
    shared: dict = {}

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        xs.append(hidden.detach())
        if not shared:
            shared.update({k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache")})
        raise _Captured

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.inference_mode():
            for row in ids:
                with contextlib.suppress(_Captured):
                    model(row[None], use_cache=False)
    finally:
        handle.remove()
    return xs, shared


def block_forward(block: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def run_blocks(model: nn.Module, ids: torch.Tensor,
               process: Callable[[int, nn.Module, list[torch.Tensor], dict], None]) -> None:
    """For each block i: `process(i, block, inputs, kwargs)`, then inputs <- block(inputs).

    `ids` is (n, seqlen) calibration tokens. `process` may replace submodules of
    the block in place; the next block sees the outputs of the changed block.
    """
    blocks = decoder_blocks(model)
    xs, kwargs = block0_inputs(model, ids)
    for i in track(range(len(blocks)), "calibrating blocks"):
        process(i, blocks[i], xs, kwargs)
        with torch.inference_mode():
            xs = [block_forward(blocks[i], x, kwargs) for x in xs]
