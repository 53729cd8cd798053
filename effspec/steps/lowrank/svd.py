"""Low-rank factorization of linear layers: plain SVD, and activation-aware SVD (ASVD, Yuan et al. 2023).

A linear layer W (out, in) becomes two, x -> B (A x), with A (r, in) and B (out,
r) from the rank-r truncated SVD, split symmetrically: W ~ U_r S_r V_r^T,
A = S_r^1/2 V_r^T, B = U_r S_r^1/2. That stores r (in + out) numbers instead of
in * out, so it saves only below r = in out / (in + out); `ratio` is the fraction
of each layer's parameters kept, r = floor(ratio * in out / (in + out)) (the
same ratio for every layer, so both steps compare at equal parameter count).

`asvd` first scales the input channels by their typical activation size,
s_j = mean_t |x_tj| ^ alpha (alpha 0.5, the paper's choice), decomposes
W diag(s), and folds diag(s)^-1 back into A: channels that carry large
activations -- where truncation error costs the most output error -- are
preserved first. Statistics come from one pass of the calibration data through
the unchanged model.

`scaling: whiten` replaces diag(s) by the full input statistics, SVD-LLM's
truncation-aware data whitening (Wang et al. 2024): with L the Cholesky factor
of X X^T / tokens (damped by `whiten_dampening` of its mean diagonal),
||(W - W') X||_F = ||(W - W') L||_F, so truncating the SVD of W L and folding
L^-1 back into A gives the rank-r factors with the least output error on the
calibration data (Eckart-Young in that norm; tested against the direct
solution). It costs an (in, in) statistic per layer instead of a vector.

`rank_search: sensitivity` (asvd) replaces the uniform ratio by per-layer
ratios from ASVD's sensitivity-based truncation rank search (`rank_search.py`),
within the same parameter budget; a layer may then stay dense.

The factors are float `nn.Linear`s inside a `LowRankLinear`, so later steps
(e.g. `rtn`) can quantize them and recovery tuning can train them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from effspec.config import expect
from effspec.errors import UserError
from effspec.layers import PACKED_LAYERS
from effspec.progress import track
from effspec.registry import register
from effspec.steps.lowrank.rank_search import choose_ratios, sensitivities
from effspec.surgery import linear_layers, replace_module

log = logging.getLogger(__name__)


class LowRankLinear(nn.Module):
    """y = B (A x) + b: a rank-`rank` stand-in for an (out, in) linear layer."""

    kind = "lowrank"

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.A = nn.Linear(in_features, rank, bias=False)
        self.B = nn.Linear(rank, out_features, bias=bias)

    @classmethod
    def from_factors(cls, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None) -> "LowRankLinear":
        layer = cls(A.shape[1], B.shape[0], A.shape[0], bias is not None)
        layer.A.weight.data = A.float().contiguous()
        layer.B.weight.data = B.float().contiguous()
        if bias is not None:
            layer.B.bias.data = bias.detach().float().clone()
        return layer

    def manifest(self) -> dict:
        return {"kind": self.kind, "rank": self.rank, "bias": self.B.bias is not None}

    @classmethod
    def from_manifest(cls, m: dict, in_features: int, out_features: int) -> "LowRankLinear":
        return cls(in_features, out_features, int(m["rank"]), bool(m["bias"]))

    @property
    def weight(self) -> torch.Tensor:
        return self.B.weight @ self.A.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.B.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.B(self.A(x))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}"


def factorize(W: torch.Tensor, rank: int, s: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (rank, in), B (out, rank)) with B A the best rank-`rank` approximation of W, in the norm weighted
    by the input scaling `s` when given -- channel scales (in,) (ASVD) or a lower-triangular L (in, in) with
    L L^T = X X^T (whitening), which makes it the best for the layer's outputs -- else the plain Frobenius norm."""
    return truncate(decompose(W, s), rank, s)


def decompose(W: torch.Tensor, s: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, Vh of W diag(s), W L (whitening) or W, in float64."""
    W = W.double()
    if s is not None:
        W = W @ s.double() if s.dim() == 2 else W * s.double()[None, :]
    return torch.linalg.svd(W, full_matrices=False)


def truncate(usv: tuple[torch.Tensor, torch.Tensor, torch.Tensor], rank: int,
             s: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of rank `rank` from `decompose`'s output, the scaling's inverse folded back into A."""
    U, S, Vh = usv
    root = S[:rank].sqrt()
    A = root[:, None] * Vh[:rank]
    if s is not None and s.dim() == 2:  # A L^-1, by triangular solve
        A = torch.linalg.solve_triangular(s.double(), A, upper=False, left=False)
    elif s is not None:
        A = A / s.double()[None, :]
    B = U[:, :rank] * root[None, :]
    return A.float(), B.float()


def rank_for(in_features: int, out_features: int, ratio: float) -> int:
    return int(ratio * in_features * out_features / (in_features + out_features))


def params_at(lin: nn.Linear, ratio: float) -> int:
    """Weights a layer keeps at `ratio` (1.0: left dense)."""
    if ratio >= 1.0:
        return lin.in_features * lin.out_features
    return rank_for(lin.in_features, lin.out_features, ratio) * (lin.in_features + lin.out_features)


@dataclass(frozen=True)
class SVDConfig:
    ratio: float = 0.8  # of each layer's parameters kept
    targets: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = ("lm_head",)

    def __post_init__(self):
        expect(0.0 < self.ratio < 1.0, "ratio", self.ratio, "a fraction in (0, 1): factors keep that share of parameters")


@dataclass(frozen=True)
class ASVDConfig(SVDConfig):
    alpha: float = 0.5  # s_j = mean |x_j| ^ alpha
    scaling: str = "absmean"  # "whiten": L with L L^T = X X^T instead of diag(s) (SVD-LLM's truncation-aware whitening)
    whiten_dampening: float = 0.01  # of X X^T's mean diagonal, added before the Cholesky (dead input channels)
    rank_search: str = "uniform"  # "sensitivity": per-layer ratios by ASVD's STRS (rank_search.py), same budget
    search_ratios: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)  # candidate ratios of each layer
    search_rows: int = 2  # calibration rows whose loss measures a truncation
    search_tokens: int = 256  # tokens of each such row

    def __post_init__(self):
        super().__post_init__()
        expect(0.0 <= self.alpha <= 2.0, "alpha", self.alpha, "an exponent in [0, 2]")
        expect(self.scaling in ("absmean", "whiten"), "scaling", self.scaling, "absmean (ASVD) or whiten (SVD-LLM)")
        expect(0 < self.whiten_dampening < 1, "whiten_dampening", self.whiten_dampening, "a fraction in (0, 1)")
        expect(self.rank_search in ("uniform", "sensitivity"), "rank_search", self.rank_search, "uniform or sensitivity")
        expect(len(self.search_ratios) > 0 and all(0 < r < 1 for r in self.search_ratios), "search_ratios",
               self.search_ratios, "fractions in (0, 1)")
        expect(min(self.search_ratios) <= self.ratio, "search_ratios", self.search_ratios,
               f"at least one candidate at or below ratio={self.ratio}, or the budget cannot be met")
        expect(self.search_rows >= 1, "search_rows", self.search_rows, "a positive number of rows")
        expect(self.search_tokens >= 2, "search_tokens", self.search_tokens, "at least 2 tokens")


@torch.inference_mode()
def input_statistics(model: nn.Module, layers: dict[str, nn.Linear], calib: torch.Tensor,
                     second_moment: bool = False) -> dict[str, torch.Tensor]:
    """Per layer, over every calibration token (one pass, unchanged model): mean |x| of each input channel (in,),
    or with `second_moment` X X^T / tokens (in, in) (float32 products per sample, summed in float64)."""
    sums = {n: torch.zeros((lin.in_features,) * (2 if second_moment else 1), dtype=torch.float64)
            for n, lin in layers.items()}
    count = [0]

    def hook(name):
        def add(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            sums[name] += (x.t() @ x).double() if second_moment else x.abs().double().sum(0)
        return add

    handles = [lin.register_forward_pre_hook(hook(n)) for n, lin in layers.items()]
    try:
        for ids in track(calib, "activation statistics", total=len(calib)):
            model(ids[None], use_cache=False)
            count[0] += ids.numel()
    finally:
        for h in handles:
            h.remove()
    return {n: (v / count[0]).float() for n, v in sums.items()}


def whitening(second_moment: torch.Tensor, dampening: float) -> torch.Tensor:
    """Lower-triangular L with L L^T = X X^T / tokens + dampening * mean diagonal * I."""
    C = second_moment.double()
    C = C + dampening * C.diagonal().mean() * torch.eye(C.shape[0], dtype=torch.float64)
    return torch.linalg.cholesky(C).float()


def _check_ranks(layers: dict[str, nn.Linear], ratios: Sequence[float], label: str) -> None:
    for name, lin in layers.items():
        for ratio in ratios:
            if rank_for(lin.in_features, lin.out_features, ratio) < 1:
                raise UserError(f"{label}: ratio={ratio} leaves rank 0 for {name} ({lin.out_features}x{lin.in_features})")


def _factorize_model(model: nn.Module, layers: dict[str, nn.Linear], ratios: dict[str, float],
                     scales: dict[str, torch.Tensor] | None, label: str) -> nn.Module:
    """Each layer replaced by its factors at its ratio; a layer at ratio 1.0 stays as it is."""
    for name, lin in track(layers.items(), label, total=len(layers)):
        if ratios[name] >= 1.0:
            continue
        r = rank_for(lin.in_features, lin.out_features, ratios[name])
        A, B = factorize(lin.weight.detach(), r, None if scales is None else scales[name])
        replace_module(model, name, LowRankLinear.from_factors(A, B, lin.bias))
    kept = sum(params_at(lin, ratios[n]) for n, lin in layers.items()) / sum(params_at(lin, 1.0) for lin in layers.values())
    log.info("%s: %d of %d layers factorized, %.1f%% of their parameters kept", label,
             sum(r < 1.0 for r in ratios.values()), len(layers), 100 * kept)
    return model


@register("svd", family="lowrank", stage="inference", config=SVDConfig)
def apply_svd(model: nn.Module, cfg: SVDConfig, calib=None) -> nn.Module:
    layers = linear_layers(model, cfg.targets, cfg.ignore, step="svd")
    _check_ranks(layers, (cfg.ratio,), "svd")
    return _factorize_model(model, layers, dict.fromkeys(layers, cfg.ratio), None, "svd")


@register("asvd", family="lowrank", stage="inference", config=ASVDConfig, calibration=True)
def apply_asvd(model: nn.Module, cfg: ASVDConfig, calib=None) -> nn.Module:
    if calib is None:
        raise ValueError("asvd needs calibration data")
    layers = linear_layers(model, cfg.targets, cfg.ignore, step="asvd")
    _check_ranks(layers, (cfg.ratio, *cfg.search_ratios) if cfg.rank_search == "sensitivity" else (cfg.ratio,), "asvd")
    whiten = cfg.scaling == "whiten"
    stats = input_statistics(model, layers, calib, second_moment=whiten)
    if whiten:
        scales = {n: whitening(v, cfg.whiten_dampening) for n, v in stats.items()}
    else:
        scales = {n: v.clamp(min=1e-6).pow(cfg.alpha) for n, v in stats.items()}
    ratios = dict.fromkeys(layers, cfg.ratio)
    if cfg.rank_search == "sensitivity":
        ratios = strs_ratios(model, layers, calib, scales, cfg)
    return _factorize_model(model, layers, ratios, scales, "asvd")


def strs_ratios(model: nn.Module, layers: dict[str, nn.Linear], calib: torch.Tensor,
                scales: dict[str, torch.Tensor], cfg: ASVDConfig) -> dict[str, float]:
    """Per-layer ratios by STRS within cfg.ratio of the layers' parameters (see rank_search.py)."""
    rows = calib[: cfg.search_rows, : cfg.search_tokens]
    current: dict[str, tuple] = {}  # the one layer being measured: its decomposition, computed once

    def stand_in(name: str, lin: nn.Linear, ratio: float) -> nn.Module:
        if name not in current:
            current.clear()
            current[name] = decompose(lin.weight.detach(), scales[name])
        A, B = truncate(current[name], rank_for(lin.in_features, lin.out_features, ratio), scales[name])
        return LowRankLinear.from_factors(A, B, lin.bias)

    sens = sensitivities(model, layers, rows, sorted(cfg.search_ratios), stand_in)
    budget = int(cfg.ratio * sum(params_at(lin, 1.0) for lin in layers.values()))
    ratios = choose_ratios(sens, {n: (lambda r, lin=lin: params_at(lin, r)) for n, lin in layers.items()}, budget)
    log.info("asvd: rank search chose ratios %s", {r: sum(v == r for v in ratios.values()) for r in sorted(set(ratios.values()))})
    return ratios


PACKED_LAYERS[LowRankLinear.kind] = LowRankLinear  # type: ignore[assignment]
