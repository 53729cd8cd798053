"""Linear layers whose weights are really stored packed, not fake-quantized floats.

`QuantLinear` keeps integer codes bit-packed in a flat uint8 buffer (two 4-bit
codes a byte, eight 3-bit codes in three bytes, ...) plus per-group float16
scales and minimums (see `effspec.quant`). Its stored size is those bytes.

Forward has two paths that compute the same function, chosen by the number of
rows (tokens) in the input:

- kernel, below `KERNEL_MAX_ROWS` rows (decode): for 4- and 8-bit codes,
  effspec's own matrix-vector kernels (`effspec.kernels`, compiled on first
  use), which read the packed bytes in place; 2- and 3-bit codes go through
  the 4-bit kernel from a nibble copy made on first use. By default they round the
  activations to int8 per 32 columns as llama.cpp does (integer dot products;
  outputs within ~1% of the exact path); `EFFSPEC_KERNEL_ACTIVATIONS=float`
  keeps float32 activations, exact up to summation order. Where they are not
  available (no compiler, other
  bit widths): torch's CPU low-bit matmuls -- `_weight_int4pack_mm_for_cpu` for
  2/3/4-bit codes with groups of 32/64/128/256 (per-channel grids fed as
  repeated group scales) and `_weight_int8pack_mm` for per-channel 8-bit -- in
  bfloat16, the only dtype they are fast with (shared/FACTS.md; and only on
  CPUs with AVX512-BF16). Kernel operands are built once, on first use, and
  are not saved.
- dequant, from `KERNEL_MAX_ROWS` rows up (prefill, perplexity windows) or where
  no kernel fits: unpack, `w_hat = q * scale + minimum` in float32, `F.linear`.
  Exact. Matrix-vector kernels lose to a float32 matmul on unpacked weights
  once there are many rows (measured: torch's int4 kernel, 1 thread,
  1536x576 g64, wins below ~48 rows and loses 2x at 512).

So perplexity (long windows) is that of the exact quantized weights, the path
prefill speed times; decode runs the kernel path (tests bound the difference).
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from effspec import kernels as effspec_kernels
from effspec.errors import UserError
from effspec.frozen import frozen_linear, needs_grad
from effspec.layers_float import FP8Linear, NF4Linear  # never imports this module: no cycle
from effspec.sparsity import SparseLinear  # never imports this module: no cycle
from effspec.quant import Grid, dequantize, grid_params, pack_bits, quantize, storage_dtype, unpack_bits

_KERNELS = os.environ.get("EFFSPEC_KERNELS", "1") != "0"
INT4_GROUPS = (32, 64, 128, 256)
KERNEL_MAX_ROWS = 48


@contextlib.contextmanager
def kernels(enabled: bool) -> Iterator[None]:
    """Temporarily switch every packed layer between its kernel and exact dequant paths."""
    global _KERNELS
    before, _KERNELS = _KERNELS, enabled
    try:
        yield
    finally:
        _KERNELS = before


class QuantLinear(nn.Module):
    """y = x W_hat^T + b with W_hat on an integer grid (effspec.quant), stored packed."""

    kind = "quant"

    def __init__(self, in_features: int, out_features: int, grid: Grid, bias: bool, scale_dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features, self.grid = in_features, out_features, grid
        self.group = grid.group_size or in_features
        n_groups = in_features // self.group
        n_bytes = (in_features * out_features * grid.bits + 7) // 8
        self.register_buffer("qweight", torch.zeros(n_bytes, dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, n_groups, dtype=scale_dtype))
        if not grid.symmetric:
            self.register_buffer("mins", torch.zeros(out_features, n_groups, dtype=scale_dtype))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._kernel: tuple | None = None

    # ---- construction -------------------------------------------------------------
    @classmethod
    def from_codes(cls, q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, grid: Grid,
                   bias: torch.Tensor | None) -> "QuantLinear":
        """Wrap codes q (out, in) and their per-group (scale, minimum) into a packed layer."""
        out, inp = q.shape
        layer = cls(inp, out, grid, bias is not None, storage_dtype(scale, minimum))
        layer.qweight.copy_(pack_bits(q, grid.bits))
        return layer._store_grid(scale, minimum, bias)

    def _store_grid(self, scale: torch.Tensor, minimum: torch.Tensor, bias: torch.Tensor | None) -> "QuantLinear":
        """Copy the group scales (and minimums, asymmetric) and the bias into this layer's buffers; returns it."""
        self.scales.copy_(scale.to(self.scales.dtype))
        if not self.grid.symmetric:
            self.mins.copy_(minimum.to(self.mins.dtype))
        if bias is not None:
            self.bias.copy_(bias.detach().float())
        return self

    @classmethod
    def from_linear(cls, linear: nn.Module, grid: Grid, where: str = "") -> "QuantLinear":
        """Round-to-nearest quantization of a float linear layer, or of a pruned one (kept sparse)."""
        W = linear.weight.detach().float()
        group = grid.group_for(W.shape[1], where)
        scale, minimum = grid_params(W, grid, group)
        q = quantize(W, scale, minimum, grid)
        return packed_layer(q, scale, minimum, grid, linear.bias, pruned_mask(linear, grid, where))

    def manifest(self) -> dict:
        """What `effspec.models` needs to rebuild an empty layer of this shape before loading."""
        g = self.grid
        return {"kind": self.kind, "bits": g.bits, "group_size": g.group_size, "symmetric": g.symmetric,
                "bias": self.bias is not None, "scale_dtype": str(self.scales.dtype).removeprefix("torch.")}

    @classmethod
    def from_manifest(cls, m: dict, in_features: int, out_features: int) -> "QuantLinear":
        grid = Grid(int(m["bits"]), int(m["group_size"]), bool(m["symmetric"]))
        return cls(in_features, out_features, grid, bool(m["bias"]), getattr(torch, m["scale_dtype"]))

    # ---- views of the stored tensors -------------------------------------------------
    def codes(self) -> torch.Tensor:
        q = unpack_bits(self.qweight, self.grid.bits, self.in_features * self.out_features)
        return q.view(self.out_features, self.in_features)

    def minimums(self) -> torch.Tensor:
        s = self.scales.float()
        return self.mins.float() if not self.grid.symmetric else -(2 ** (self.grid.bits - 1)) * s

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize(self.codes(), self.scales.float(), self.minimums())

    @property
    def weight(self) -> torch.Tensor:
        """The float weight this layer represents (computed; for inspection and exporters)."""
        return self.dequantized_weight()

    def _load_from_state_dict(self, *args, **kwargs):  # new codes invalidate the kernel's copy
        self._kernel = None
        super()._load_from_state_dict(*args, **kwargs)

    # ---- forward ----------------------------------------------------------------------
    def _kernel_form(self) -> tuple | None:
        """Build (once) the packed operands of torch's int4/int8 CPU kernels, or None."""
        if self._kernel is not None:
            return self._kernel if self._kernel[0] != "none" else None
        g, N, K = self.grid, self.out_features, self.in_features
        form: tuple = ("none",)
        # effspec's kernels take any 8-bit grid and 4-bit groups of whole bytes (int8 activations need
        # groups of 32; other widths use their float-activation path). 2- and 3-bit codes are 4-bit codes that
        # leave the top values unused (w = q * scale + minimum either way): they run as 4-bit from a nibble copy
        # built here, a run-time copy of 4 bits a weight, as torch's int4 path below makes its own
        if (g.bits == 8 or (g.bits <= 4 and self.group % 2 == 0)) and effspec_kernels.available():
            bias = effspec_kernels.EMPTY if self.bias is None else self.bias.float().contiguous()
            codes, bits = self._kernel_codes()
            # everything the call needs, so the decode path reads no module attributes
            form = ("cpp", effspec_kernels.lowbit_linear_fn(), codes, self.scales.float().contiguous(),
                    self.minimums().contiguous(), bias, N, K, self.group, bits)
        elif g.bits <= 4 and N % 16 == 0:
            group = self.group if self.group in INT4_GROUPS else next(
                (c for c in (64, 32) if g.group_size == 0 and K % c == 0), None)
            if group is not None and K % group == 0:
                reps = self.group // group  # per-channel: the row's one scale repeated per kernel group
                s = self.scales.float().repeat_interleave(reps, 1)
                z = self.minimums().repeat_interleave(reps, 1) + 8 * s  # kernel: w = (q - 8) * s + z
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(self.codes().to(torch.int32), 2)
                sz = torch.stack([s.t(), z.t()], -1).to(torch.bfloat16).contiguous()  # (K/group, N, 2)
                form = ("int4", packed, group, sz)
        elif g.bits == 8 and g.group_size == 0 and K % 8 == 0:  # torch's int8pack kernel segfaults otherwise
            w8 = (self.codes().to(torch.int16) - 128).to(torch.int8)  # w = (q - 128) * s + (min + 128 s)
            s = self.scales.float()[:, 0]
            offset = None if g.symmetric else (self.minimums()[:, 0] + 128 * s)
            form = ("int8", w8, s.to(torch.bfloat16), offset)
        self._kernel = form
        return None if form[0] == "none" else form

    def _kernel_codes(self) -> tuple[torch.Tensor, int]:
        """Every code, dense and packed 4 or 8 bits a weight, as effspec's kernels read them."""
        if self.grid.bits in (4, 8):
            return self.qweight, self.grid.bits
        return pack_bits(self.codes(), 4), 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if needs_grad(x):  # inside training (QLoRA): the weight is frozen, its float copy not kept
            return frozen_linear(x, self)
        form = self._kernel
        if form is not None and form[0] == "cpp" and _KERNELS and x.numel() < KERNEL_MAX_ROWS * form[7]:
            # the decode hot path (210 calls a token on smollm2): kept to one C++ call
            _, fn, qweight, scale, minimum, bias, n, k, group, bits = form
            y = fn(x.float().contiguous(), qweight, scale, minimum, bias, n, k, group, bits, effspec_kernels.INT8_ACTIVATIONS)
            return y if x.dtype == torch.float32 else y.to(x.dtype)
        rows = x.numel() // x.shape[-1]
        form = self._kernel_form() if _KERNELS and rows < KERNEL_MAX_ROWS else None
        if form is None:
            return F.linear(x, self.dequantized_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        shape = x.shape
        if form[0] == "cpp":
            return self.forward(x)
        xb = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        if form[0] == "int4":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, form[1], form[2], form[3]).to(x.dtype)
        else:
            y = torch.ops.aten._weight_int8pack_mm(xb, form[1], form[2]).to(x.dtype)
            if form[3] is not None:
                y = y + x.reshape(-1, shape[-1]).sum(-1, keepdim=True) * form[3].to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        g = self.grid
        return (f"in={self.in_features}, out={self.out_features}, bits={g.bits}, "
                f"group={g.group_size or 'channel'}, {'sym' if g.symmetric else 'asym'}")


class SparseQuantLinear(QuantLinear):
    """A QuantLinear whose pruned weights are not stored: a bitmask of kept positions plus the kept codes only.

    Pruning and quantizing (`sparsegpt` with `bits`, or `rtn`/`gptq` after a
    pruning step) leaves exact zeros on a symmetric grid, where zero is the
    middle code 2^(bits-1). Dense codes would spend `bits` on each of them;
    here a weight costs 1 mask bit, plus `bits` when kept: at 50% and 4 bits,
    3 bits a weight instead of 4 (before the group scales). Everything that reads `codes()` -- dequantized
    forward, exporters, QLoRA -- sees the dense codes. The decode kernels read a
    dense 4- or 8-bit copy built on first use (as 2/3-bit layers do; not saved):
    decode speed is the dense packed layer's and run-time memory that plus the
    stored form; the stored bytes drop.
    """

    kind = "sparse-quant"

    def __init__(self, in_features: int, out_features: int, grid: Grid, bias: bool, scale_dtype: torch.dtype,
                 nnz: int):
        if not grid.symmetric:
            raise ValueError("sparse packed codes need a symmetric grid (its middle code is the exact zero)")
        super().__init__(in_features, out_features, grid, bias, scale_dtype)
        self.register_buffer("qweight", torch.zeros((nnz + 7) // 8 * grid.bits, dtype=torch.uint8))  # whole runs of 8
        self.register_buffer("mask", torch.zeros((in_features * out_features + 7) // 8, dtype=torch.uint8))
        self.nnz = nnz

    @classmethod
    def from_codes(cls, q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, grid: Grid,
                   bias: torch.Tensor | None, keep: torch.Tensor | None = None) -> "SparseQuantLinear":
        """Codes q (out, in) whose positions outside `keep` hold the zero code (keep: where q is not zero)."""
        zero = 2 ** (grid.bits - 1)
        keep = q != zero if keep is None else keep
        if bool((q[~keep] != zero).any()):
            raise ValueError("a pruned position holds a code other than the zero code")
        out, inp = q.shape
        layer = cls(inp, out, grid, bias is not None, storage_dtype(scale, minimum), int(keep.sum()))
        layer.qweight.copy_(pack_bits(q[keep], grid.bits))
        layer.mask.copy_(pack_bits(keep.reshape(-1).to(torch.uint8), 1))
        return layer._store_grid(scale, minimum, bias)

    def manifest(self) -> dict:
        return {**super().manifest(), "nnz": self.nnz}

    @classmethod
    def from_manifest(cls, m: dict, in_features: int, out_features: int) -> "SparseQuantLinear":
        grid = Grid(int(m["bits"]), int(m["group_size"]), bool(m["symmetric"]))
        return cls(in_features, out_features, grid, bool(m["bias"]), getattr(torch, m["scale_dtype"]), int(m["nnz"]))

    def keep(self) -> torch.Tensor:
        n = self.in_features * self.out_features
        return unpack_bits(self.mask, 1, n).view(self.out_features, self.in_features).bool()

    def codes(self) -> torch.Tensor:
        q = torch.full((self.out_features, self.in_features), 2 ** (self.grid.bits - 1), dtype=torch.uint8)
        q[self.keep()] = unpack_bits(self.qweight, self.grid.bits, self.nnz)
        return q

    def sparsity(self) -> float:
        return 1.0 - self.nnz / (self.in_features * self.out_features)

    def _kernel_codes(self) -> tuple[torch.Tensor, int]:
        bits = 8 if self.grid.bits == 8 else 4
        return pack_bits(self.codes(), bits), bits

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, sparsity={self.sparsity():.3f}"


def pruned_mask(linear: nn.Module, grid: Grid, where: str = "") -> torch.Tensor | None:
    """The kept positions of a pruned layer about to be quantized (None for a dense one); a UserError when the
    grid cannot hold its zeros exactly (asymmetric: zero is a code only by chance)."""
    if getattr(linear, "kind", None) != "sparse":
        return None
    if not grid.symmetric:
        raise UserError(f"{where or 'layer'}: a pruned layer is quantized on a symmetric grid only (its zeros must "
                        f"stay exact zeros); set symmetric: true")
    return linear.keep()


def packed_layer(q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, grid: Grid, bias: torch.Tensor | None,
                 keep: torch.Tensor | None = None) -> QuantLinear:
    """The packed layer of codes q: dense, or with `keep` (pruned positions hold the zero code) sparse."""
    if keep is None:
        return QuantLinear.from_codes(q, scale, minimum, grid, bias)
    return SparseQuantLinear.from_codes(q, scale, minimum, grid, bias, keep)


PACKED_LAYERS: dict[str, type[QuantLinear] | type[NF4Linear] | type[FP8Linear] | type[SparseLinear]] = {
    QuantLinear.kind: QuantLinear, SparseQuantLinear.kind: SparseQuantLinear, NF4Linear.kind: NF4Linear,
    FP8Linear.kind: FP8Linear, SparseLinear.kind: SparseLinear}
