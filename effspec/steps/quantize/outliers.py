"""LLM.int8(): int8 matmul with the outlier feature columns kept in float (Dettmers et al., NeurIPS 2022).

Sec. 3.2, "mixed-precision decomposition": the few hidden features whose
activations exceed a magnitude threshold alpha carry most of the signal, and
any int8 scale shared with them crushes the rest. With O the set of such input
columns,

    Y = sum_{h in O} X^h W^h  +  s_x s_w^T * sum_{h not in O} X_q^h W_q^h      (Eq. 2 with Eq. 1's rescale)

the first sum in 16-bit float, the second as an int8 x int8 -> int32 matmul with
"vector-wise" scales: one per token (row of X) and one per output channel (row
of W), from the absolute maxima of the non-outlier columns only. That int8
part is `effspec.steps.quantize.w8a8`'s (same quantizers and integer matmul).

The layer stores the int8 codes of the non-outlier columns (out x (in - |O|)
bytes), one scale per output channel, the outlier columns' weights in float16
(out x |O| x 2 bytes) and their indices (int32).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from effspec.calibrate import block_forward, run_blocks
from effspec.config import expect
from effspec.layers import PACKED_LAYERS
from effspec.quant import storage_dtype
from effspec.registry import register
from effspec.steps.quantize.w8a8 import Int8Matmul, int8_backend, quantize_per_channel, quantize_per_token
from effspec.surgery import linear_layers, replace_module

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OutliersConfig:
    threshold: float = 6.0  # Sec. 3.2: "alpha = 6.0 is sufficient to reduce transformer performance degradation close to zero"
    targets: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = ("lm_head",)

    def __post_init__(self):
        expect(self.threshold > 0, "threshold", self.threshold, "a positive activation magnitude")
        expect(len(self.targets) > 0, "targets", self.targets, "at least one module name pattern")


# deviation: the paper (and bitsandbytes) finds O anew in every batch at run time; here O is fixed from the
# calibration maxima, so the float columns are chosen once and the stored bytes are what runs
def outlier_columns(act_absmax: torch.Tensor, threshold: float) -> torch.Tensor:
    """Sorted indices (int64) of input columns whose calibration activations exceed `threshold` in magnitude."""
    return torch.nonzero(act_absmax > threshold).flatten()


def decompose(W: torch.Tensor, outliers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W_q int8 (out, in - |O|), s_w (out,), W_O float16 (out, |O|)) for W (out, in) and outlier columns O."""
    keep = torch.ones(W.shape[1], dtype=torch.bool)
    keep[outliers] = False
    W_q, s_w = quantize_per_channel(W[:, keep])
    return W_q, s_w, W[:, outliers].to(torch.float16)


class OutlierW8A8Linear(nn.Module):
    """LLM.int8() layer: float16 weights on the outlier input columns, W8A8 on the rest."""

    kind = "w8a8-outliers"
    outlier_idx: torch.Tensor  # (|O|,) int32, ascending
    outlier_weight: torch.Tensor  # (out, |O|) float16
    qweight: torch.Tensor  # (out, in - |O|) int8 codes of the other columns
    scales: torch.Tensor  # (out,) s_w
    bias: torch.Tensor | None

    def __init__(self, in_features: int, out_features: int, n_outliers: int, bias: bool, scale_dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("outlier_idx", torch.zeros(n_outliers, dtype=torch.int32))
        self.register_buffer("outlier_weight", torch.zeros(out_features, n_outliers, dtype=torch.float16))
        self.register_buffer("qweight", torch.zeros(out_features, in_features - n_outliers, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features, dtype=scale_dtype))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._mm: Int8Matmul | None = None
        self._inliers: torch.Tensor | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, act_absmax: torch.Tensor, threshold: float) -> "OutlierW8A8Linear":
        O = outlier_columns(act_absmax, threshold)
        W_q, s_w, W_O = decompose(linear.weight.detach().float(), O)
        layer = cls(linear.in_features, linear.out_features, len(O), linear.bias is not None, storage_dtype(s_w))
        layer.outlier_idx.copy_(O)
        layer.outlier_weight.copy_(W_O)
        layer.qweight.copy_(W_q)
        layer.scales.copy_(s_w)
        if linear.bias is not None and layer.bias is not None:
            layer.bias.copy_(linear.bias.detach().float())
        return layer

    def manifest(self) -> dict:
        return {"kind": self.kind, "outliers": self.outlier_idx.numel(), "bias": self.bias is not None,
                "scale_dtype": str(self.scales.dtype).removeprefix("torch.")}

    @classmethod
    def from_manifest(cls, m: dict, in_features: int, out_features: int) -> "OutlierW8A8Linear":
        return cls(in_features, out_features, int(m["outliers"]), bool(m["bias"]), getattr(torch, m["scale_dtype"]))

    @property
    def weight(self) -> torch.Tensor:
        """The float weight this layer represents (computed; for inspection and exporters)."""
        W = torch.empty(self.out_features, self.in_features)
        W[:, self.inliers()] = self.qweight.float() * self.scales.float()[:, None]
        W[:, self.outlier_idx.long()] = self.outlier_weight.float()
        return W

    def _load_from_state_dict(self, *args, **kwargs):  # new codes or columns invalidate the cached forms
        self._mm = self._inliers = None
        super()._load_from_state_dict(*args, **kwargs)

    def inliers(self) -> torch.Tensor:
        if self._inliers is None:
            keep = torch.ones(self.in_features, dtype=torch.bool)
            keep[self.outlier_idx.long()] = False
            self._inliers = torch.nonzero(keep).flatten()
        return self._inliers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        X = x.reshape(-1, shape[-1]).float()
        backend = int8_backend()
        if self._mm is None or self._mm.backend != backend:
            self._mm = Int8Matmul(self.qweight, self.scales, backend)
        X_q, s_x = quantize_per_token(X.index_select(1, self.inliers()))  # vector-wise: scales from inliers only
        y = self._mm(X_q) * s_x
        if self.outlier_idx.numel():
            # deviation: the outlier product runs in float32 (the model's dtype) on the float16-stored columns
            y = y + X.index_select(1, self.outlier_idx) @ self.outlier_weight.float().t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, outlier columns={self.outlier_idx.numel()}"


PACKED_LAYERS[OutlierW8A8Linear.kind] = OutlierW8A8Linear  # type: ignore[assignment]


@register("outliers", family="quantize", stage="inference", config=OutliersConfig, calibration=True)
def apply(model: nn.Module, cfg: OutliersConfig, calib=None) -> nn.Module:
    if calib is None:
        raise ValueError("outliers needs calibration data")
    targets = set(linear_layers(model, cfg.targets, cfg.ignore, step="outliers"))
    block_names = {id(m): n for n, m in model.named_modules()}
    counts: list[int] = []

    def process(i: int, block: nn.Module, xs: list[torch.Tensor], kwargs: dict) -> None:
        prefix = block_names[id(block)] + "."
        linears = {n: lin for n, lin in linear_layers(block, ("*",), ()).items() if prefix + n in targets}
        absmax = {n: torch.zeros(lin.in_features) for n, lin in linears.items()}

        def record(n):
            def hook(module, args):
                x = args[0].detach()
                absmax[n] = torch.maximum(absmax[n], x.reshape(-1, x.shape[-1]).abs().amax(0).float())
            return hook

        hooks = [lin.register_forward_pre_hook(record(n)) for n, lin in linears.items()]
        try:
            with torch.inference_mode():
                for x in xs:
                    block_forward(block, x, kwargs)
        finally:
            for h in hooks:
                h.remove()
        for n, lin in linears.items():
            layer = OutlierW8A8Linear.from_linear(lin, absmax[n], cfg.threshold)
            counts.append(layer.outlier_idx.numel())
            replace_module(block, n, layer)

    run_blocks(model, calib, process)
    left = set(linear_layers(model, cfg.targets, cfg.ignore))
    if left:
        log.warning("outliers: %d targeted layers outside the decoder blocks stay float: %s", len(left), sorted(left)[:3])
    log.info("outliers: %d layers, %d outlier columns in all (threshold %g)", len(counts), sum(counts), cfg.threshold)
    return model
