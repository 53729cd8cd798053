"""SmoothQuant: migrate activation outliers into the weights, then W8A8 (Xiao et al., ICML 2023).

A few input channels of LLM activations are ~100x larger than the rest, so a
per-token int8 scale set by them rounds every other channel to a few levels.
SmoothQuant divides each input channel j of X by a factor s_j and multiplies
the matching weight column by it, which leaves the product unchanged (Eq. 3),

    Y = (X diag(s)^-1) (diag(s) W^T) = X_hat W_hat^T,

and picks (Eq. 4, with the migration strength alpha)

    s_j = max(|X_j|)^alpha / max(|W_j|)^(1 - alpha)

from per-channel activation maxima over calibration text. The division by s is
folded offline into the preceding normalization's scale (and bias), so the
smoothed model costs nothing extra at run time. As in the paper (Sec. 4, Fig. 6)
and its reference code for Llama-like models, the layers smoothed are those
reading a normalization's output: q/k/v after the input norm and gate/up after
the post-attention norm, one s per norm shared by every linear reading it, with
max|W_j| taken over all of them. o_proj and down_proj read an attention or
gated product no weight can absorb, and are quantized unsmoothed. Every
targeted linear then becomes a `W8A8Linear` (effspec.steps.quantize.w8a8).

Which module's output each linear reads is found by tracing one forward pass of
the block (tensor identity), never by attribute paths; a norm is folded only if
its output provably scales by 1/s when its weight does (RMSNorm, LayerNorm; not
e.g. a (1 + weight) norm), and the block's float output is checked unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from effspec.calibrate import block_forward, run_blocks, trace_block
from effspec.config import expect
from effspec.registry import register
from effspec.steps.quantize.w8a8 import quantize_linears
from effspec.surgery import linear_layers

log = logging.getLogger(__name__)

EPS = 1e-5  # floor of max|W_j| and of s_j, as in the reference code's smooth_ln_fcs


@dataclass(frozen=True)
class SmoothQuantConfig:
    # Sec. 3 "Migration strength": "alpha = 0.5 is a well-balanced point" (all OPT and BLOOM models);
    # larger (0.75 for GLM-130B) when activation outliers are stronger
    alpha: float = 0.5
    targets: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = ("lm_head",)

    def __post_init__(self):
        expect(0.0 <= self.alpha <= 1.0, "alpha", self.alpha, "a migration strength in [0, 1]")
        expect(len(self.targets) > 0, "targets", self.targets, "at least one module name pattern")


def smoothing_factors(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s (in,) of Eq. 4 from max|X_j| (in,) and the weights (out_i, in) of every layer reading X."""
    w_absmax = torch.cat([W.detach().float().abs() for W in weights], 0).amax(0).clamp(min=EPS)
    return (act_absmax.float().pow(alpha) / w_absmax.pow(1 - alpha)).clamp(min=EPS)


def _trace_producers(block: nn.Module, x: torch.Tensor, kwargs: dict) -> list[tuple[str, list[str], torch.Tensor]]:
    """(producer, [linears reading exactly its output], producer's input) for one forward pass of `block`.

    A producer is a submodule with a per-channel `weight` (a norm's scale) whose
    output tensor object is read by float linear layers and by no other
    submodule, not counting containers whose children read it too (the MLP
    module passing its input on to gate/up).
    """
    outputs: dict[int, tuple[str, torch.Tensor, torch.Tensor]] = {}  # id(output) -> (name, output, input)
    readers: dict[int, list[str]] = {}  # id(tensor) -> every submodule it was passed to
    held: list[torch.Tensor] = []  # keep every read tensor alive so no id is reused during the pass

    def on_output(name: str, args: tuple, out: object) -> None:
        if isinstance(out, torch.Tensor) and args and isinstance(args[0], torch.Tensor):
            outputs.setdefault(id(out), (name, out, args[0]))  # the innermost module comes first

    def on_input(name: str, args: tuple, kwargs: dict) -> None:
        for t in (*args, *kwargs.values()):
            if isinstance(t, torch.Tensor):
                held.append(t)
                readers.setdefault(id(t), []).append(name)

    trace_block(block, x, kwargs, on_input, on_output)
    floats = set(linear_layers(block, ("*",), ()))
    found = []
    for key, (name, out, inp) in outputs.items():
        names = readers.get(key, [])
        leaves = [n for n in names if not any(o.startswith(n + ".") for o in names)]
        weight = getattr(block.get_submodule(name), "weight", None)
        per_channel = isinstance(weight, torch.Tensor) and weight.shape == (out.shape[-1],)  # a norm's scale
        if leaves and per_channel and all(n in floats for n in leaves):
            found.append((name, leaves, inp))
    return found


@torch.no_grad()
def _fold(norm: nn.Module, linears: list[nn.Linear], s: torch.Tensor, x_in: torch.Tensor) -> bool:
    """norm.weight /= s (and bias), W *= s for each reader; False (nothing changed) if the norm does not scale."""
    weight, bias = getattr(norm, "weight", None), getattr(norm, "bias", None)
    if not isinstance(weight, torch.Tensor) or weight.shape != s.shape:
        return False
    before = norm(x_in)
    old_w, old_b = weight.detach().clone(), None if bias is None else bias.detach().clone()
    weight.div_(s.to(weight.dtype))
    if bias is not None:
        bias.div_(s.to(bias.dtype))
    after = norm(x_in)
    if not torch.allclose(after * s, before, rtol=1e-4, atol=1e-6 * before.abs().max().item()):
        weight.copy_(old_w)  # e.g. y = (1 + weight) * x_hat: dividing the weight does not divide y
        if bias is not None:
            bias.copy_(old_b)
        return False
    for lin in linears:
        lin.weight.mul_(s.to(lin.weight.dtype)[None, :])
    return True


def smooth_block(block: nn.Module, xs: list[torch.Tensor], kwargs: dict, alpha: float) -> int:
    """Smooth every (norm -> linears) pair of one block in place; returns how many were folded."""
    groups = _trace_producers(block, xs[0], kwargs)
    if not groups:
        return 0
    absmax = {name: torch.zeros(inp.shape[-1]) for name, _, inp in groups}
    producers = {name: block.get_submodule(name) for name, _, _ in groups}

    def record(name):
        def hook(module, args, out):
            absmax[name] = torch.maximum(absmax[name], out.detach().reshape(-1, out.shape[-1]).abs().amax(0).float())
        return hook

    hooks = [producers[n].register_forward_hook(record(n)) for n in producers]
    try:
        with torch.inference_mode():
            reference = [block_forward(block, x, kwargs) for x in xs[:1]]
            for x in xs[1:]:
                block_forward(block, x, kwargs)
    finally:
        for h in hooks:
            h.remove()
    folded = 0
    for name, readers, inp in groups:
        linears = [cast(nn.Linear, block.get_submodule(n)) for n in readers]
        s = smoothing_factors(absmax[name], [lin.weight for lin in linears], alpha)
        if _fold(producers[name], linears, s, inp.clone()):
            folded += 1
        else:
            log.warning("smoothquant: %s is not a scale-foldable norm; %s left unsmoothed", name, ", ".join(readers))
    with torch.inference_mode():
        after = block_forward(block, xs[0], kwargs)
    err = (after - reference[0]).abs().max() / reference[0].abs().max()
    if err > 1e-4:  # a reader the trace could not see (a functional op) would change the function
        raise RuntimeError(f"smoothquant: smoothing changed a block's float output (relative error {err:.2e})")
    return folded


def smooth_model(model: nn.Module, calib: torch.Tensor, alpha: float) -> nn.Module:
    """SmoothQuant's offline transform alone (no quantization): the float function is unchanged."""
    def process(i: int, block: nn.Module, xs: list[torch.Tensor], kwargs: dict) -> None:
        smooth_block(block, xs, kwargs, alpha)

    run_blocks(model, calib, process)
    return model


@register("smoothquant", family="quantize", stage="inference", config=SmoothQuantConfig, calibration=True)
def apply(model: nn.Module, cfg: SmoothQuantConfig, calib=None) -> nn.Module:
    if calib is None:
        raise ValueError("smoothquant needs calibration data")
    targets = set(linear_layers(model, cfg.targets, cfg.ignore, step="smoothquant"))
    block_names = {id(m): n for n, m in model.named_modules()}

    # deviation: the reference code takes activation maxima from the float model in one pass; here block i's
    # come from the already smoothed and quantized blocks < i (effspec.calibrate), as GPTQ's do
    def process(i: int, block: nn.Module, xs: list[torch.Tensor], kwargs: dict) -> None:
        folded = smooth_block(block, xs, kwargs, cfg.alpha)
        prefix = block_names[id(block)] + "."
        quantize_linears(block, [n for n in linear_layers(block, ("*",), ()) if prefix + n in targets])
        log.info("smoothquant: block %d, %d norms folded", i, folded)

    run_blocks(model, calib, process)
    rest = [n for n in linear_layers(model, cfg.targets, cfg.ignore) if n in targets]  # targets outside the blocks
    quantize_linears(model, rest)
    return model
