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

from effspec.config import expect
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
            shared.update({k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values", "past_key_value", "use_cache")})
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


CALIBRATION_DTYPES = ("float32", "bfloat16")


def check_calibration_dtype(value: str) -> None:
    """The config check of every step's `calibration_dtype` field."""
    expect(value in CALIBRATION_DTYPES, "calibration_dtype", value, f"one of {CALIBRATION_DTYPES}")


def precision(dtype: str) -> contextlib.AbstractContextManager:
    """The autocast context calibration forwards run under: bfloat16 matmuls are ~3x faster on AVX512-BF16 CPUs.

    Weights stay float32 (autocast casts per op), so steps still read the exact float weights. A layer's
    input then carries bf16 rounding; statistics of it (a layer-wise Hessian) are still taken in float32.
    """
    if dtype == "bfloat16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def block_forward(block: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def trace_block(block: nn.Module, x: torch.Tensor, kwargs: dict,
                on_input: Callable[[str, tuple, dict], None], on_output: Callable[[str, tuple, object], None]) -> None:
    """Run one input through `block` calling on_input(name, args, kwargs) / on_output(name, args, output)
    for every submodule call, in run order: how steps find which module feeds which linear layer.
    """
    hooks = []
    for n, m in block.named_modules():
        if n:
            hooks.append(m.register_forward_pre_hook(lambda m, a, k, n=n: on_input(n, a, k), with_kwargs=True))
            hooks.append(m.register_forward_hook(lambda m, a, o, n=n: on_output(n, a, o)))
    try:
        with torch.inference_mode():
            block_forward(block, x, kwargs)
    finally:
        for h in hooks:
            h.remove()


class Replay(nn.Module):
    """Stands in for a sub-module whose output for each calibration sample is already known.

    A block's attention or MLP is final once its last linear layer is compressed,
    and its output is that layer applied to inputs captured earlier; replaying it
    spares later passes over the block from recomputing attention or the MLP.
    `rewind` before each pass: the k-th call returns the k-th sample's output.
    """

    def __init__(self, outputs: list, rest: tuple | None):
        super().__init__()
        self.outputs, self.rest, self.next = outputs, rest, 0

    def forward(self, *args, **kwargs):
        out = self.outputs[self.next]
        self.next += 1
        return out if self.rest is None else (out, *self.rest)


def rewind(block: nn.Module) -> None:
    for m in block.modules():
        if isinstance(m, Replay):
            m.next = 0


def run_blocks(model: nn.Module, ids: torch.Tensor,
               process: Callable[[int, nn.Module, list[torch.Tensor], dict], list[torch.Tensor] | None],
               dtype: str = "float32") -> None:
    """For each block i: `process(i, block, inputs, kwargs)`, then inputs <- block(inputs).

    `ids` is (n, seqlen) calibration tokens. `process` may replace submodules of
    the block in place; the next block sees the outputs of the changed block
    (returned by `process` when it already computed them, else recomputed here).
    `dtype` is the precision of the propagation forwards (`precision`).
    """
    blocks = decoder_blocks(model)
    xs, kwargs = block0_inputs(model, ids)
    for i in track(range(len(blocks)), "calibrating blocks"):
        outs = process(i, blocks[i], xs, kwargs)
        if outs is None:
            with torch.inference_mode(), precision(dtype):
                outs = [block_forward(blocks[i], x, kwargs) for x in xs]
        xs = [x.float() for x in outs]
        for m in blocks[i].modules():  # done with this block: the dense copies its pruned layers built are not kept
            if hasattr(m, "drop_expanded"):  # (425 MB for smollm2 at 50%, beside the sparse storage)
                m.drop_expanded()
