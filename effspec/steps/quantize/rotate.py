"""Rotate: QuaRot / SpinQuant incoherence processing, an orthogonal change of basis that spreads outliers before quantization.

QuaRot (Ashkboos et al. 2024, "QuaRot: Outlier-Free 4-Bit Inference in Rotated
LLMs", Sec. 3-4) and SpinQuant (Liu et al. 2024, R1 and R4) rest on the
computational invariance of pre-norm decoders (SliceGPT, Ashkboos et al. 2024,
Theorem 1): with the RMSNorm scale folded into the next linear layers,

    RMSNorm(x Q) = RMSNorm(x) Q         for any orthogonal Q (Q Q^T = I),

so the whole residual stream can live in the basis Q without changing the
function. Offline (QuaRot stage 1a, SpinQuant R1):

    fold       W <- W diag(gamma), gamma <- 1     every linear reading an RMSNorm
    embeddings E <- E Q
    readers    W <- W Q                          q/k/v, gate/up, the output head
    writers    W <- Q^T W,  b <- Q^T b           o_proj, down_proj

Online (QuaRot stage 1b, SpinQuant R4): the FFN's gated product cannot absorb
a rotation offline, so its down-projection gets W <- W H and runs on x H,
computed at inference by `RotatedInput`.

Q and H are randomized Hadamard matrices, Q = D (H_n (x) R_m) / sqrt(n): D a
random +-1 diagonal, H_n the Sylvester Hadamard matrix of the largest
power-of-two factor n of the width, R_m a seeded Haar-random m x m orthogonal
matrix for the odd rest m (smollm2: 576 = 64 x 9, 1536 = 512 x 3; no Hadamard
matrix of order 9 or 3 exists, QuaRot uses stored Hadamard matrices of orders
12, 20, 28, ... instead). x Q runs as two small matmuls, splitting
H_n = H_a (x) H_b with a, b ~ sqrt(n): O(d (sqrt(n) + sqrt(n) m)) per vector,
not the O(d^2) of a dense Q.

Weights rotate in float64. Layers and norms are found by tracing one forward
pass (which norm's output each linear reads), never by attribute paths; the
step checks that the logits are unchanged and refuses (UserError) norms with a
mean subtraction or bias (LayerNorm) and any model whose logits move.

Tied embeddings: the output head shares E, which becomes E Q, but the head
would need diag(gamma) E Q. QuaRot and SpinQuant untie (a second V x d float
matrix: +113 MB in float32 on smollm2-135m). Here the tie is kept and the
final norm runs in the original basis instead, RMSNorm(x Q^T) Q with its scale
intact (`RotatedNorm`): two structured transforms per token, no extra weights.
# deviation: keeps tied heads tied (no stored copy of the V x d embedding)

Pair it with GPTQ, not RTN, on models whose norms mute massive activations:
smollm2-135m's post-attention norms have scale ~0 on the few residual
channels holding about half the activation energy. Unrotated, that scale
hides those channels from the weight error; rotated, the error sees all of
that energy, so RTN's noise on gate/up grows ~4x. GPTQ weighs the error by
the real inputs (H = 2 X X^T) and gains (perplexity, 4 x 512 WikiText-2
tokens, w3 g64: GPTQ 126 -> 55 rotated; RTN 238 -> 4387).
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from effspec.config import expect
from effspec.errors import UserError
from effspec.layers import PACKED_LAYERS
from effspec.registry import register
from effspec.surgery import decoder_blocks, replace_module

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RotateConfig:
    # deviation: QuaRot/SpinQuant draw a fresh random Hadamard each run; seeded here so runs repeat (DESIGN.md)
    seed: int = 0
    residual: bool = True  # QuaRot stage 1a / SpinQuant R1: rotate the residual stream (both papers' default)
    down_proj: bool = True  # QuaRot stage 1b / SpinQuant R4: online Hadamard before the FFN down-projection

    def __post_init__(self):
        expect(self.seed >= 0, "seed", self.seed, "a non-negative integer")
        expect(self.residual or self.down_proj, "residual", self.residual,
               "true, or down_proj true (with both false there is nothing to rotate)")


# ---- the structured orthogonal matrix ---------------------------------------------------------
def sylvester_hadamard(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """H_n (n a power of two), entries +-1, H_{2k} = [[H_k, H_k], [H_k, -H_k]]."""
    H = torch.ones(1, 1, dtype=dtype)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


def odd_part(dim: int) -> int:
    """m such that dim = 2^k m with m odd."""
    return dim // (dim & -dim)


class Rotation(nn.Module):
    """x -> x Q (or x Q^T) with Q = D (H_n (x) R_m) / sqrt(n), applied on the last dimension.

    Stores only D (int8 signs, dim) and R (m x m); the small dense factors
    A = H_a / sqrt(a) and B = (H_b / sqrt(b)) (x) R, n = a b, are rebuilt on use.
    """

    def __init__(self, dim: int, m: int):
        super().__init__()
        n = dim // m
        if dim % m or n & (n - 1):
            raise ValueError(f"Rotation: dim={dim} is not a power of two times m={m}")
        self.dim, self.m, self.n = dim, m, n
        self.a = 2 ** (int(math.log2(n)) // 2)
        self.register_buffer("signs", torch.ones(dim, dtype=torch.int8))  # D
        self.register_buffer("R", torch.eye(m))  # R_m
        self._factors: dict = {}

    @classmethod
    def random(cls, dim: int, generator: torch.Generator) -> "Rotation":
        """A seeded randomized Hadamard rotation of width `dim`."""
        m = odd_part(dim)
        rot = cls(dim, m)
        rot.signs.copy_(torch.randint(0, 2, (dim,), generator=generator) * 2 - 1)
        if m > 1:  # Haar-random orthogonal: QR of a Gaussian, signs fixed by diag(R) (Mezzadri 2007)
            Z = torch.randn(m, m, generator=generator, dtype=torch.float64)
            Qm, Rm = torch.linalg.qr(Z)
            rot.R.copy_(Qm * torch.sign(torch.diagonal(Rm)))
        return rot

    def factors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if dtype not in self._factors:
            b = self.n // self.a
            A = sylvester_hadamard(self.a) / math.sqrt(self.a)  # (a, a), symmetric
            B = torch.kron(sylvester_hadamard(b) / math.sqrt(b), self.R.double().contiguous())  # (b m, b m)
            self._factors[dtype] = (A.to(dtype), B.to(dtype), self.signs.to(dtype))
        return self._factors[dtype]

    def forward(self, x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        A, B, s = self.factors(x.dtype)
        shape = x.shape
        if not transpose:
            x = x * s  # x D
        X = x.reshape(-1, self.a, self.dim // self.a)  # row vector x (A (x) B)  ==  A^T X B, per row
        y = (A @ (X @ (B.t() if transpose else B))).reshape(shape)
        return y * s if transpose else y  # x Q^T = x (A (x) B)^T D

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The dense Q (dim x dim), for tests and inspection."""
        return self(torch.eye(self.dim, dtype=dtype))

    def _load_from_state_dict(self, *args, **kwargs):  # new R or signs invalidate the cached factors
        self._factors = {}
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hadamard={self.n}, orthogonal={self.m}"


# ---- modules that apply a rotation at inference; saved through effspec.json's manifest ---------
class RotatedInput(nn.Module):
    """linear(x H): a linear layer (float or packed) whose input is rotated online; its weight holds W H."""

    manifest_kind = "rotated_input"

    def __init__(self, linear: nn.Module, rotation: Rotation):
        super().__init__()
        self.rotation, self.linear = rotation, linear

    in_features = property(lambda self: self.linear.in_features)
    out_features = property(lambda self: self.linear.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.rotation(x))

    def manifest(self) -> dict:
        return {"kind": self.manifest_kind, "dim": self.rotation.dim, "m": self.rotation.m}

    @classmethod
    def wrap(cls, m: dict, old: nn.Module) -> "RotatedInput":
        """Rebuild around the (empty) module a loader finds at this name; buffers come from the state dict."""
        return cls(old, Rotation(int(m["dim"]), int(m["m"])))


class RotatedNorm(nn.Module):
    """norm(x Q^T) Q: a norm with its scale, run in the unrotated basis (a tied head reads E Q)."""

    manifest_kind = "rotated_norm"

    def __init__(self, norm: nn.Module, rotation: Rotation):
        super().__init__()
        self.rotation, self.norm = rotation, norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rotation(self.norm(self.rotation(x, transpose=True)))

    manifest = RotatedInput.manifest

    @classmethod
    def wrap(cls, m: dict, old: nn.Module) -> "RotatedNorm":
        return cls(old, Rotation(int(m["dim"]), int(m["m"])))


PACKED_LAYERS.update({RotatedInput.manifest_kind: RotatedInput, RotatedNorm.manifest_kind: RotatedNorm})  # type: ignore[dict-item]


# ---- the weight algebra (float64) --------------------------------------------------------------
def fold_and_rotate_reader(W: torch.Tensor, gamma: torch.Tensor, Q: Rotation) -> torch.Tensor:
    """W diag(gamma) Q for a linear reading a norm's output; W (out, d)."""
    return Q(W.double() * gamma.double()).to(W.dtype)


def rotate_writer(W: torch.Tensor, Q: Rotation) -> torch.Tensor:
    """Q^T W for a linear writing the residual; W (d, in) -- or a bias (d,), giving Q^T b."""
    return Q(W.double().t()).t().to(W.dtype) if W.dim() == 2 else Q(W.double()).to(W.dtype)


# ---- finding norms, readers and writers by tracing ---------------------------------------------
@dataclass
class _Plan:
    readers: dict[str, list[str]]  # hidden-width norm -> linear layers reading its output, in run order
    writers: list[str]  # linear layers adding their output to the residual stream
    ffn_writers: list[str]  # writers that run after their block's last norm: the FFN output (down_proj)
    head_norm: str  # the norm the output head reads


def _hidden_norms(model: nn.Module, d: int) -> dict[str, nn.Module]:
    """Leaf modules with a (d,) scale, not linear or embedding: the norms on the residual stream."""
    found = {}
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if (isinstance(w, nn.Parameter) and tuple(w.shape) == (d,) and not list(m.children())
                and not isinstance(m, (nn.Linear, nn.Embedding))):
            found[name] = m
    return found


def _check_rms_norm(model: nn.Module, name: str, norm: nn.Module) -> None:
    """Refuse norms other than y = x / rms(x) * weight: a mean subtraction, bias or offset breaks invariance."""
    x = 3 * torch.randn(4, norm.weight.shape[0], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = norm(x)
        expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True)) * norm.weight
    if getattr(norm, "bias", None) is not None or not torch.allclose(y, expected, rtol=1e-3, atol=1e-4):
        raise UserError(f"rotate: unsupported architecture {type(model).__name__}: {name} ({type(norm).__name__}) is not "
                        "an RMSNorm y = x / rms(x) * weight (mean subtraction, bias or offset break rotation invariance)")


def _key(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), tuple(t.shape))  # a slice of the whole tensor (the head's input) keeps both


def _trace(model: nn.Module, ids: torch.Tensor, norms: dict[str, nn.Module], d: int) -> _Plan:
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    outputs: dict[tuple, str] = {}
    keep: list[torch.Tensor] = []  # norm outputs stay alive so their addresses are not reused
    events: list[tuple[str, str, str | None]] = []  # (norm|linear, name, norm whose output a linear reads)

    def on_norm(name):
        def hook(module, args, out):
            keep.append(out)
            outputs[_key(out)] = name
            events.append(("norm", name, None))
        return hook

    def on_linear(name):
        def hook(module, args):
            events.append(("linear", name, outputs.get(_key(args[0]))))
        return hook

    hooks = [m.register_forward_hook(on_norm(n)) for n, m in norms.items()]
    hooks += [m.register_forward_pre_hook(on_linear(n)) for n, m in linears.items()]
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    arch = type(model).__name__
    ran = {n for kind, n, _ in events if kind == "linear"}
    if idle := sorted(set(linears) - ran):
        raise UserError(f"rotate: unsupported architecture {arch}: {idle[0]} did not run on a probe pass "
                        "(conditional layers such as mixture-of-experts are not supported)")
    readers: dict[str, list[str]] = {n: [] for n in norms}
    for kind, name, src in events:
        if kind == "linear" and src is not None and name not in readers[src]:
            readers[src].append(name)
    if unread := [n for n, r in readers.items() if not r]:
        raise UserError(f"rotate: unsupported architecture {arch}: the output of norm {unread[0]} feeds no linear "
                        "layer (rotation needs pre-norm blocks: a norm before each attention, FFN and the head)")
    head = model.get_output_embeddings()
    head_name = next((n for n, m in linears.items() if m is head), None)
    head_norm = next((n for n, r in readers.items() if head_name in r), None)
    if head_norm is None:
        raise UserError(f"rotate: unsupported architecture {arch}: the output head does not read a norm's output")
    writers = list(dict.fromkeys(n for kind, n, src in events
                                 if kind == "linear" and src is None and linears[n].out_features == d and n != head_name))
    block_names = {id(m): n for n, m in model.named_modules()}
    prefixes = [block_names[id(b)] + "." for b in decoder_blocks(model)]

    def block_of(name: str) -> int | None:
        return next((i for i, p in enumerate(prefixes) if name.startswith(p)), None)

    last_norm = {block_of(n): i for i, (kind, n, _) in enumerate(events) if kind == "norm"}
    ffn = [n for i, (kind, n, _) in enumerate(events)
           if n in writers and block_of(n) is not None and i > last_norm.get(block_of(n), len(events))]
    return _Plan(readers, writers, list(dict.fromkeys(ffn)), head_norm)


# ---- the step ----------------------------------------------------------------------------------
def _rotate_residual(model: nn.Module, plan: _Plan, Q: Rotation) -> None:
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head.weight is emb.weight
    for norm_name, readers in plan.readers.items():
        norm = model.get_submodule(norm_name)
        if tied and norm_name == plan.head_norm:
            if len(readers) != 1:
                raise UserError(f"rotate: the final norm {norm_name} feeds more than the tied output head")
            replace_module(model, norm_name, RotatedNorm(norm, copy.deepcopy(Q)))  # head = E Q via the embedding
            continue
        for name in readers:
            lin = model.get_submodule(name)
            lin.weight.copy_(fold_and_rotate_reader(lin.weight, norm.weight, Q))  # W diag(gamma) Q
        norm.weight.fill_(1.0)
    emb.weight.copy_(Q(emb.weight.double()).to(emb.weight.dtype))  # E Q
    for name in plan.writers:
        lin = model.get_submodule(name)
        lin.weight.copy_(rotate_writer(lin.weight, Q))  # Q^T W
        if lin.bias is not None:
            lin.bias.copy_(rotate_writer(lin.bias, Q))  # Q^T b


def _rotate_ffn(model: nn.Module, plan: _Plan, seed: int) -> None:
    rotations: dict[int, Rotation] = {}  # one H per width, shared by every block (as QuaRot's R4)
    for name in plan.ffn_writers:
        lin = model.get_submodule(name)
        n_in = lin.weight.shape[1]
        if n_in not in rotations:
            rotations[n_in] = Rotation.random(n_in, torch.Generator().manual_seed(2 * seed + 1))
        H = copy.deepcopy(rotations[n_in])  # own buffers: the saved state stores each once
        lin.weight.copy_(H(lin.weight.double()).to(lin.weight.dtype))  # W H
        replace_module(model, name, RotatedInput(lin, H))


@register("rotate", family="quantize", stage="inference", config=RotateConfig)
def apply(model: nn.Module, cfg: RotateConfig, calib=None) -> nn.Module:
    arch = type(model).__name__
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if not isinstance(emb, nn.Embedding) or type(head) is not nn.Linear:
        raise UserError(f"rotate: unsupported architecture {arch}: needs an nn.Embedding input and an nn.Linear "
                        f"output head (found {type(emb).__name__}, {type(head).__name__})")
    done = [n for n, m in model.named_modules() if hasattr(m, "manifest")]
    if done:
        raise UserError(f"rotate: {done[0]} is already packed or rotated; put rotate before quantization steps, once")
    d = emb.weight.shape[1]
    norms = _hidden_norms(model, d)
    for name, norm in norms.items() if cfg.residual else ():
        _check_rms_norm(model, name, norm)
    ids = torch.randint(0, emb.weight.shape[0], (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids, use_cache=False).logits
    plan = _trace(model, ids, norms, d)
    touched = [n for r in plan.readers.values() for n in r] + plan.writers
    if sparse := [n for n in touched if (model.get_submodule(n).weight == 0).float().mean() > 0.1]:
        log.warning("rotate: %s is sparse and rotating makes it dense; put rotate before pruning steps", sparse[0])
    with torch.no_grad():
        if cfg.residual:
            _rotate_residual(model, plan, Rotation.random(d, torch.Generator().manual_seed(2 * cfg.seed)))
        if cfg.down_proj:
            _rotate_ffn(model, plan, cfg.seed)
        after = model(ids, use_cache=False).logits
    change = ((after - before).abs().max() / before.abs().max()).item()
    if not change < 1e-3:
        raise UserError(f"rotate: unsupported architecture {arch}: the logits changed by {change:.1e} (relative) "
                        "after rotating, so this model is not rotation-invariant as traced")
    log.info("rotate: %d norms folded, %d readers, %d writers, %d online FFN rotations; logits within %.1e",
             len(plan.readers), sum(map(len, plan.readers.values())), len(plan.writers), len(plan.ffn_writers), change)
    return model
