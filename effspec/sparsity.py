"""Sparsity patterns every pruning step shares, and the layer that stores a pruned weight compressed.

Patterns (a boolean "keep" mask over a score of the same shape):

- unstructured, over a whole tensor (`unstructured_mask`) or per output row
  (`row_mask`, Wanda's comparison group): the `sparsity` fraction of lowest
  scores is removed;
- N:M (`nm_mask`): in every run of M consecutive input columns of a row, the N
  highest scores are kept (NVIDIA's 2:4 keeps 2 of 4), sparsity 1 - N/M.

`SparseLinear` stores a pruned weight as a bitmask (1 bit a weight, packed 8 a
byte) plus the kept values in the weight's own dtype: at 50% sparsity float32
weights take 17 of 32 bits (-47%). An N:M index would cost the same 1 bit a
weight at 2:4, so one format serves both. No sparse CPU kernel beats a dense
matrix-vector product at these sparsities (measured here, 1536x576 at 50%,
one token: torch CSR 937 us, dense 93 us), so the layer expands itself to a
dense float weight on its first forward and keeps that copy (not saved;
the lean decoder runs it on its float fast path too): decode and prefill
speed are the dense model's, as is run-time memory; the stored model is
smaller.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from effspec.calibrate import check_calibration_dtype
from effspec.config import expect
from effspec.errors import UserError
from effspec.quant import pack_bits, unpack_bits


# ---- patterns --------------------------------------------------------------------------------------------
def parse_nm(text: str) -> tuple[int, int]:
    parts = text.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"nm: got {text!r}, expected N:M with whole numbers, e.g. 2:4")
    return int(parts[0]), int(parts[1])


def unstructured_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """True where a weight is kept: all but the round(sparsity * numel) lowest scores."""
    k = int(round(sparsity * score.numel()))
    keep = torch.ones(score.numel(), dtype=torch.bool)
    if k:
        keep[torch.topk(score.flatten(), k, largest=False).indices] = False
    return keep.view_as(score)


def row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """True where kept: in every row, all but the round(sparsity * columns) lowest scores."""
    k = int(round(sparsity * score.shape[1]))
    keep = torch.ones_like(score, dtype=torch.bool)
    if k:
        keep.scatter_(1, torch.topk(score, k, dim=1, largest=False).indices, False)
    return keep


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """True where kept: the n highest scores in every run of m consecutive columns of a row."""
    rows, cols = score.shape
    if cols % m:
        raise ValueError(f"nm: input width {cols} is not a multiple of M={m}")
    groups = score.reshape(rows, cols // m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, groups.topk(n, dim=-1).indices, True)
    return keep.view(rows, cols)


@dataclass(frozen=True)
class PruneConfig:
    """Fields every weight-pruning step takes."""

    sparsity: float = 0.5  # ignored when `nm` is set
    nm: str = ""  # "N:M" keeps N of every M consecutive weights, e.g. "2:4"; "" = unstructured
    targets: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = ("lm_head",)

    def __post_init__(self):
        expect(0.0 <= self.sparsity < 1.0, "sparsity", self.sparsity, "a fraction in [0, 1)")
        if self.nm:
            n, m = parse_nm(self.nm)
            expect(0 < n < m, "nm", self.nm, "N:M with 0 < N < M, e.g. 2:4")

    @property
    def pattern(self) -> tuple[int, int] | None:
        return parse_nm(self.nm) if self.nm else None

    def check_widths(self, layers: dict[str, nn.Module]) -> None:
        """A UserError naming the first layer whose input width N:M does not divide."""
        if self.pattern:
            m = self.pattern[1]
            bad = [n for n, lin in layers.items() if lin.in_features % m]
            if bad:
                raise UserError(f"nm={self.nm}: input width of {bad[0]} ({layers[bad[0]].in_features}) "
                                f"is not a multiple of {m}")


@dataclass(frozen=True)
class CalibratedPruneConfig(PruneConfig):
    """Fields of the pruning steps that see calibration activations (Wanda, SparseGPT)."""

    allocation: str = "uniform"  # "owl": per-block sparsity from outlier ratios (effspec.owl), mean `sparsity`
    owl_m: float = 5.0  # OWL's M: a score is an outlier above M times its block's mean score
    owl_lambda: float = 0.08  # OWL's lambda: block sparsities span sparsity +- lambda
    calibration_dtype: str = "float32"  # "bfloat16": calibration forwards under bf16 autocast (effspec.calibrate.precision)

    def __post_init__(self):
        super().__post_init__()
        check_calibration_dtype(self.calibration_dtype)
        expect(self.allocation in ("uniform", "owl"), "allocation", self.allocation, "uniform or owl")
        if self.allocation == "owl":
            expect(not self.nm, "allocation", self.allocation, "uniform when nm is set (N:M fixes every row's sparsity)")
            expect(self.owl_m > 0, "owl_m", self.owl_m, "a positive multiple of the mean score")
            expect(0 < self.owl_lambda <= min(self.sparsity, 1 - self.sparsity) and self.sparsity + self.owl_lambda < 1,
                   "owl_lambda", self.owl_lambda, f"in (0, {min(self.sparsity, 1 - self.sparsity):g}] so every "
                   f"block's sparsity stays in [0, 1) around sparsity={self.sparsity:g}")


# ---- storage ---------------------------------------------------------------------------------------------
class SparseLinear(nn.Module):
    """y = x W^T + b with W stored as a bitmask of kept positions and the kept values, row-major."""

    kind = "sparse"

    def __init__(self, in_features: int, out_features: int, nnz: int, bias: bool, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("mask", torch.zeros((in_features * out_features + 7) // 8, dtype=torch.uint8))
        self.register_buffer("values", torch.zeros(nnz, dtype=dtype))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._dense: torch.Tensor | None = None

    @classmethod
    def from_weight(cls, W: torch.Tensor, keep: torch.Tensor, bias: torch.Tensor | None) -> "SparseLinear":
        """The layer keeping W where `keep` is True (W's values there are stored exactly)."""
        out, inp = W.shape
        layer = cls(inp, out, int(keep.sum()), bias is not None, W.dtype)
        layer.mask.copy_(pack_bits(keep.reshape(-1).to(torch.uint8), 1))
        layer.values.copy_(W.detach()[keep])
        if bias is not None:
            layer.bias.copy_(bias.detach().float())
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "SparseLinear":
        """The layer of a linear whose pruned weights are exact zeros."""
        return cls.from_weight(linear.weight.detach(), linear.weight.detach() != 0, linear.bias)

    def manifest(self) -> dict:
        return {"kind": self.kind, "nnz": self.values.numel(), "bias": self.bias is not None,
                "dtype": str(self.values.dtype).removeprefix("torch.")}

    @classmethod
    def from_manifest(cls, m: dict, in_features: int, out_features: int) -> "SparseLinear":
        return cls(in_features, out_features, int(m["nnz"]), bool(m["bias"]), getattr(torch, m["dtype"]))

    def keep(self) -> torch.Tensor:
        n = self.in_features * self.out_features
        return unpack_bits(self.mask, 1, n).view(self.out_features, self.in_features).bool()

    def dense_weight(self) -> torch.Tensor:
        W = torch.zeros(self.out_features, self.in_features, dtype=self.values.dtype)
        W[self.keep()] = self.values
        return W

    @property
    def weight(self) -> torch.Tensor:
        return self.dense_weight()

    def sparsity(self) -> float:
        return 1.0 - self.values.numel() / (self.in_features * self.out_features)

    def _load_from_state_dict(self, *args, **kwargs):  # new values invalidate the dense copy
        self._dense = None
        super()._load_from_state_dict(*args, **kwargs)

    def expanded(self) -> torch.Tensor:
        """The dense weight every forward multiplies by: built on first use and kept (never saved)."""
        if self._dense is None:
            self._dense = self.dense_weight()
        return self._dense

    def drop_expanded(self) -> None:
        """Forget the dense copy until the next forward needs it (calibration runs each block's passes once)."""
        self._dense = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.expanded().to(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, sparsity={self.sparsity():.3f}"
