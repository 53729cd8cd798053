"""EAGLE draft head (Li, Wei, Zhang and Zhang, ICML 2024, "EAGLE: Speculative Sampling Requires Rethinking
Feature Uncertainty"): a one-block draft that extrapolates the target's own features.

The target's *feature* f_j is its final-normed hidden state at position j, the vector its head turns into the
logits of token j + 1. A draft that reads only tokens has to rebuild that state from scratch, which a few
blocks cannot (smollm2's first 4 blocks, even distilled, agree with the target on ~20% of tokens). EAGLE's
draft reads the features the target has already computed, plus the token one step ahead, which settles the
one thing a feature leaves open -- which token was drawn from it (the paper's "feature uncertainty"):

    f'_{j+1} = Block(FC([e(t_{j+1}); f_j]))          (Sec. 4.1; e: the target's embedding, frozen)
    p'_{j+2} = softmax(LM_Head(f'_{j+1}))            (the target's head, frozen)

FC (2d -> d, with bias) and the block (the target's own block type, one layer) are the only trained weights.
Training (Sec. 4.2) runs on the target's features of fixed text and regresses the next feature while matching
the target's next-token distribution:

    L = SmoothL1(f_{j+1}, f'_{j+1}) + w_cls * CE(p_{j+2}, p'_{j+2}),   w_cls = 0.1 (the paper's),

with uniform noise on the input features (U(-0.1, 0.1) in the paper) so that the draft tolerates its own
errors when, past its first proposal of a round, it reads its own predicted features.

At decode (`EagleDraft`) the target's verify pass yields the feature of every token it keeps; the draft catches
up on them (slot s of its one-block KV cache holds the input (t_{s+1}, f_s)), then proposes autoregressively on
its own predictions, and the target verifies as for any draft (`effspec.speculative`), so output stays exact.

Deviations: proposals are a chain plus the draft's 2nd and 3rd likeliest first tokens beside it (`width`, 3 by
default; one level of the paper's tree, `EagleDraft.propose_tree`), not the paper's full tree; the block keeps
its input norm (EAGLE drops it on its single layer), so it is exactly the target's block type and runs on
`effspec.decoder`'s compiled path; the noise amplitude is relative to the features' RMS (`noise` x RMS; the
paper's absolute 0.1 assumes Vicuna's feature scale); the draft's head may be restricted to frequent tokens
(`effspec.speculative.frequent_tokens`, FR-Spec), in training and decode alike, since the head is most of a
one-block draft's cost; at decode the draft runs on 8-bit codes of its weights (`coded`).

Measured on smollm2-135m (README, "Speculative decoding"), trained on the shared Alpaca file: 300 steps gave 44%
held-out first-proposal agreement and 1.20x plain greedy on open generation, 500 steps 49% and 1.26x (1 thread,
output identical), where the target's first 4 blocks distilled for 200 steps gave 1.05x; 1,000 steps on the Alpaca
rows plus the target's own greedy answers (`effspec train-draft --own-answers`) 55% and 1.25x (1.22x for the 500-step
head in the same six-prompt run). `unroll=2` measured 1.21x against 1.20x at 300 steps, so it is off by default.
With prompt lookup as a second branch of one verified tree (`effspec.speculative.Branches`) the 1,000-step head
gave 1.30x (3 prompts) and 1.34x (6 prompts) where it alone gave 1.15x and 1.14x in the same runs. `width=2`
measured 1.12x against the chain's 1.14x while a 3-row verify cost more than a 2-row one; once 2-4 rows cost about
the same (`effspec.kernels.linear_rows`), the 500-step head gave 1.16x against the chain's 1.09x, and with lookup
in one tree 1.33x against 1.26x (3 prompts x 3 runs, one process). Width 3 did better still and 4 worse (3 prompts
x 2 runs, one process: the head alone 1.18x / 1.22-1.23x / 1.14x at widths 2 / 3 / 4, the tree with lookup 1.33x /
1.36-1.37x / 1.30x), so 3 is the default.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from effspec import kernels as effspec_kernels
from effspec.decoder import LeanDecoder, rope, supported
from effspec.generate import SamplingConfig, probabilities
from effspec.layers import QuantLinear
from effspec.progress import status_bar, track
from effspec.quant import Grid
from effspec.surgery import linear_layers, replace_module

log = logging.getLogger(__name__)
WEIGHTS, META = "eagle.safetensors", "eagle.json"
FORMAT = "effspec-eagle-1"


@dataclass(frozen=True)
class EagleConfig:
    """How an EAGLE head is trained; defaults from the paper unless marked."""

    steps: int = 500  # optimizer steps (deviation: the paper trains 20 epochs of ShareGPT on GPUs; a CPU budget)
    batch_size: int = 8  # rows of `seqlen` tokens per step
    seqlen: int = 512
    lr: float = 1e-3  # deviation: the paper's 3e-5 is for large batches; a fresh one-block head learns fast here
    warmup: int = 20  # linear warm-up steps, then cosine decay to 0
    cls_weight: float = 0.1  # w_cls (Sec. 4.2)
    noise: float = 0.1  # uniform input-feature noise amplitude, times the features' RMS (paper: absolute 0.1)
    clip: float = 0.5  # gradient-norm clip (the paper's code)
    vocab: int = 8192  # the draft head's tokens, the most frequent of the training text (0: the whole vocabulary)
    unroll: int = 1  # 1: the paper's loss; 2: also the second proposal's, made from the draft's own prediction (HASS)
    holdout: float = 0.05  # share of rows held out to measure agreement with the target
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size", "seqlen"):
            if getattr(self, name) < 1 or (name == "seqlen" and self.seqlen < 3):
                raise ValueError(f"{name}: expected a positive count (seqlen >= 3), got {getattr(self, name)}")
        for name in ("lr", "clip"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: expected a positive number, got {getattr(self, name)}")
        for name in ("cls_weight", "noise", "vocab", "warmup"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}: expected a non-negative number, got {getattr(self, name)}")
        if self.unroll not in (1, 2):
            raise ValueError(f"unroll: expected 1 or 2, got {self.unroll}")
        if not 0 <= self.holdout < 1:
            raise ValueError(f"holdout: expected a share in [0, 1), got {self.holdout}")


class _DraftBody(nn.Module):
    """The draft's body as `effspec.decoder` reads one: its block and final norm, and the target's embedding and
    rotary table -- shared, so kept out of the module tree."""

    def __init__(self, block: nn.Module, norm: nn.Module, target_body: nn.Module):
        super().__init__()
        self.layers = nn.ModuleList([block])
        self.norm = norm
        object.__setattr__(self, "embed_tokens", target_body.embed_tokens)
        object.__setattr__(self, "rotary_emb", target_body.rotary_emb)


class _DraftModel(nn.Module):
    """A view of the draft as a one-block causal LM over the target's head, for `LeanDecoder`."""

    def __init__(self, head: "EagleHead", target: nn.Module):
        super().__init__()
        self.config = head.config
        self.model = _DraftBody(head.block, head.norm, target.model)
        object.__setattr__(self, "lm_head", target.lm_head)


class EagleHead(nn.Module):
    """FC([e; f]) -> one decoder block -> norm: the trained part of an EAGLE draft (the rest is the target's)."""

    def __init__(self, target: nn.Module, vocab: torch.Tensor | None = None, seed: int = 0):
        super().__init__()
        if not supported(target):
            raise ValueError(f"{type(target).__name__}: EAGLE needs a Llama/Qwen2 block layout (effspec.decoder)")
        self.config = copy.deepcopy(target.config)
        self.config.num_hidden_layers = 1
        d = self.config.hidden_size
        std = getattr(self.config, "initializer_range", 0.02)
        gen = torch.Generator().manual_seed(seed)
        dtype = target.model.embed_tokens.weight.dtype
        self.fc = nn.Linear(2 * d, d, bias=True, dtype=dtype)
        self.block = type(target.model.layers[-1])(self.config, layer_idx=0).to(dtype)
        for name, p in self.named_parameters():  # the paper's Llama init: N(0, std) matrices, zero bias, unit norms
            with torch.no_grad():
                if p.dim() == 2:
                    p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
                else:
                    p.fill_(1.0 if "norm" in name else 0.0)
        self.norm = copy.deepcopy(target.model.norm)  # deviation (module docstring): starts as the target's
        self.register_buffer("vocab", None if vocab is None else vocab.to(torch.long).unique(), persistent=False)

    def inputs(self, target: nn.Module, tokens: torch.Tensor, f: torch.Tensor, linear=None) -> torch.Tensor:
        """FC([e(tokens); f]): the block's input for tokens t_{j+1} (..., T) and features f_j (..., T, d);
        `linear(module, x)` runs FC another way (the decoder's few-row path)."""
        x = torch.cat((target.model.embed_tokens(tokens), f), -1)
        return self.fc(x) if linear is None else linear(self.fc, x)

    def _project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Queries, keys and values (B, heads or kv_heads, T, head_dim) of the block's input x (B, T, d), RoPE'd."""
        attn, cfg, (B, T, _) = self.block.self_attn, self.config, x.shape
        heads, hd = cfg.num_attention_heads, attn.head_dim
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        h = self.block.input_layernorm(x)
        q = attn.q_proj(h).view(B, T, heads, hd).transpose(1, 2)
        k = attn.k_proj(h).view(B, T, kv, hd).transpose(1, 2)
        v = attn.v_proj(h).view(B, T, kv, hd).transpose(1, 2)
        return rope(q, cos, sin), rope(k, cos, sin), v

    def _finish(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """The rest of the block after attention output o (B, heads, T, head_dim), then the final norm."""
        block = self.block
        x = x + block.self_attn.o_proj(o.transpose(1, 2).reshape(*x.shape[:2], -1))
        return self.norm(x + block.mlp(block.post_attention_layernorm(x)))

    def train_forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """The block over a batch (B, T, d) with causal attention from position 0: (predicted features f',
        the keys and values, for `train_ahead`)."""
        q, k, v = self._project(x, cos, sin)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.block.self_attn.scaling,
                                           enable_gqa=k.shape[1] != q.shape[1])
        return self._finish(x, o), (k, v)

    def train_ahead(self, x2: torch.Tensor, kv: tuple, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The draft's *second* proposal, for every position at once (training-time test, as in HASS / EAGLE-3):
        row j of x2 (B, T-1, d) is slot j + 1's input built from the first pass's own prediction, and attends,
        as at decode, to slots 0..j of the first pass (computed from the target's features) and to itself."""
        k, v = kv
        q2, k2, v2 = self._project(x2, cos[:, :, 1:], sin[:, :, 1:])
        rep, T1 = q2.shape[1] // k.shape[1], x2.shape[1]
        K, V = k[:, :, :T1].repeat_interleave(rep, 1), v[:, :, :T1].repeat_interleave(rep, 1)
        scale = self.block.self_attn.scaling
        s = (q2 @ K.transpose(-1, -2)) * scale  # (B, heads, T-1, T-1): row j, slot s <= j
        s = s.masked_fill(~torch.ones(T1, T1, dtype=torch.bool).tril(), float("-inf"))
        own = (q2 * k2.repeat_interleave(rep, 1)).sum(-1, keepdim=True) * scale
        P = torch.softmax(torch.cat((s, own), -1), -1)
        o = P[..., :-1] @ V + P[..., -1:] * v2.repeat_interleave(rep, 1)
        return self._finish(x2, o)

    def view(self, target: nn.Module) -> nn.Module:
        return _DraftModel(self, target)

    # ---- storage --------------------------------------------------------------------------------------------
    def save(self, out: Path, info: dict) -> None:
        """The trained weights (FC, block, norm: 17 MB for smollm2-135m) and what they fit; never the target's."""
        from safetensors.torch import save_file

        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(out / WEIGHTS))
        meta = {"format": FORMAT, "kind": "eagle", "model_type": self.config.model_type,
                "hidden_size": self.config.hidden_size, "vocab_size": self.config.vocab_size,
                "vocab": None if self.vocab is None else self.vocab.tolist(), **info}
        (out / META).write_text(json.dumps(meta, indent=1, default=str))

    @classmethod
    def load(cls, target: nn.Module, path: str | Path) -> "EagleHead":
        """A head saved by `save`, checked against `target` (ValueError naming the mismatch)."""
        from safetensors.torch import load_file

        path = Path(path)
        try:
            meta = json.loads((path / META).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: not an EAGLE head directory ({META}: {e})") from None
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: {META} is not an {FORMAT} head")
        cfg = target.config
        for key in ("model_type", "hidden_size", "vocab_size"):
            if meta.get(key) != getattr(cfg, key, None):
                raise ValueError(f"{path}: trained for {key}={meta.get(key)}, this model has {getattr(cfg, key, None)}")
        vocab = None if meta.get("vocab") is None else torch.tensor(meta["vocab"], dtype=torch.long)
        head = cls(target, vocab)
        state = load_file(str(path / WEIGHTS))
        missing, unexpected = head.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{path}: weights do not fit this model's block (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
        return head.eval()


# ---- training ---------------------------------------------------------------------------------------------
@torch.inference_mode()
def target_features(model: nn.Module, rows: torch.Tensor, batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's final-normed hidden states (N, S, d) of token rows (N, S), and its greedy next tokens (N, S)."""
    feats, greedy = [], []
    for i in track(range(0, rows.shape[0], batch), "target features", total=math.ceil(rows.shape[0] / batch)):
        h = model.model(input_ids=rows[i:i + batch]).last_hidden_state
        feats.append(h.float())
        greedy.append(model.lm_head(h).argmax(-1))
    return torch.cat(feats), torch.cat(greedy)


def pack_rows(sequences: list[torch.Tensor], seqlen: int) -> torch.Tensor:
    """Token sequences laid end to end and cut into rows of `seqlen` (the tail that does not fill one dropped)."""
    flat = torch.cat([s.reshape(-1) for s in sequences])
    n = flat.numel() // seqlen
    if n == 0:
        raise ValueError(f"training text has {flat.numel()} tokens, fewer than one row of {seqlen}")
    return flat[: n * seqlen].view(n, seqlen)


@dataclass
class EagleLog:
    losses: list[float]
    agreement: float  # held-out share of positions where the draft's first proposal is the target's greedy token
    tokens: int
    seconds: float


def _lr(step: int, cfg: EagleConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * t))


def _head_rows(head: EagleHead, target: nn.Module) -> torch.Tensor:
    """The target's head rows of the draft's tokens (all rows without a subset): taken once, not per batch."""
    W = target.lm_head.weight.detach()
    return W if head.vocab is None else W[head.vocab]


def _feature_loss(pred: torch.Tensor, truth: torch.Tensor, W: torch.Tensor, cfg: EagleConfig) -> torch.Tensor:
    """SmoothL1(f, f') + w_cls * CE(p, p'), p the target's next-token distribution over the rows of W."""
    with torch.no_grad():
        p = torch.softmax(truth @ W.T, -1)
    cls = -(p * torch.log_softmax(pred @ W.T, -1)).sum(-1).mean()
    return F.smooth_l1_loss(pred, truth) + cfg.cls_weight * cls


def _batch_loss(head: EagleHead, target: nn.Module, tokens: torch.Tensor, f: torch.Tensor, W: torch.Tensor, cos,
                sin, cfg: EagleConfig, noise: float, gen: torch.Generator | None) -> torch.Tensor:
    """The loss of rows of tokens (B, S) with their target features (B, S, d): the first proposal's, plus with
    `unroll` 2 the second's, made from the first's own predicted features."""
    f_in = f[:, :-1]
    if noise > 0:
        f_in = f_in + (torch.rand(f_in.shape, generator=gen) * 2 - 1) * noise
    pred, kv = head.train_forward(head.inputs(target, tokens[:, 1:], f_in), cos, sin)  # f'_{j+1}, (B, S-1, d)
    loss = _feature_loss(pred, f[:, 1:], W, cfg)
    if cfg.unroll == 2:
        pred2 = head.train_ahead(head.inputs(target, tokens[:, 2:], pred[:, :-1]), kv, cos, sin)  # f'_{j+2}
        loss = loss + _feature_loss(pred2, f[:, 2:], W, cfg)
    return loss


@torch.no_grad()
def agreement(head: EagleHead, target: nn.Module, tokens: torch.Tensor, f: torch.Tensor,
              greedy: torch.Tensor) -> float:
    """Share of positions of the given text whose first proposal (argmax over the draft's tokens, the target's
    features fed in) is the target's greedy token: the first proposal's acceptance rate on that text."""
    if tokens.shape[0] == 0:
        return float("nan")
    cos, sin = _rotary(target, tokens.shape[1] - 1)
    hits = total = 0
    W = _head_rows(head, target)
    for i in range(0, tokens.shape[0], 4):
        pred, _ = head.train_forward(head.inputs(target, tokens[i:i + 4, 1:], f[i:i + 4, :-1]), cos, sin)
        ids = (pred @ W.T).argmax(-1)
        ids = ids if head.vocab is None else head.vocab[ids]
        hits += int((ids == greedy[i:i + 4, 1:]).sum())
        total += ids.numel()
    return hits / total


def _rotary(target: nn.Module, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = target.model.embed_tokens.weight.dtype
    probe = torch.zeros(1, 1, target.model.layers[0].self_attn.head_dim, dtype=dtype)
    cos, sin = target.model.rotary_emb(probe, torch.arange(T)[None])
    return cos[:, None], sin[:, None]  # (1, 1, T, head_dim): broadcast over batch and heads


def train_eagle(target: nn.Module, rows: torch.Tensor, cfg: EagleConfig = EagleConfig(),
                vocab: torch.Tensor | None = None, features: tuple | None = None) -> tuple[EagleHead, EagleLog]:
    """Train an EAGLE head for `target` on token rows (N, S) (`pack_rows`); `vocab` (else all tokens) is the
    draft head's token set. The target stays frozen; its features are computed once (or given: `features`, what
    `target_features(target, rows)` returns), then reused every epoch."""
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(rows.shape[0], generator=gen)
    n_eval = int(rows.shape[0] * cfg.holdout)
    train_idx, eval_idx = order[n_eval:], order[:n_eval]
    if train_idx.numel() == 0:
        raise ValueError(f"{rows.shape[0]} rows leave none to train on after holding out {cfg.holdout:.0%}")
    feats, greedy = target_features(target, rows) if features is None else features
    noise = cfg.noise * float(feats[train_idx[:64]].pow(2).mean().sqrt())  # the features' RMS, on a sample
    head = EagleHead(target, vocab, cfg.seed).train()
    frozen = [(p, p.requires_grad) for p in target.parameters()]  # the target's own flags, restored after
    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        losses = _fit(head, target, rows[train_idx], feats[train_idx], cfg, noise, gen)
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
    head.eval()
    agree = agreement(head, target, rows[eval_idx], feats[eval_idx], greedy[eval_idx])
    log.info("eagle: %d steps, loss %.4f -> %.4f, held-out first-proposal agreement %.3f", cfg.steps, losses[0],
             losses[-1], agree)
    return head, EagleLog(losses, agree, cfg.steps * cfg.batch_size * rows.shape[1], time.perf_counter() - t0)


def _fit(head: EagleHead, target: nn.Module, rows: torch.Tensor, feats: torch.Tensor, cfg: EagleConfig,
         noise: float, gen: torch.Generator) -> list[float]:
    """AdamW over the head's weights, `cfg.batch_size` rows a step, the rows in turn, epoch after epoch."""
    opt = torch.optim.AdamW([p for p in head.parameters()], lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    cos, sin = _rotary(target, rows.shape[1] - 1)
    W = _head_rows(head, target)
    losses: list[float] = []
    with status_bar("eagle", cfg.steps) as advance:
        for step in range(cfg.steps):
            idx = torch.arange(step * cfg.batch_size, (step + 1) * cfg.batch_size) % rows.shape[0]
            for g in opt.param_groups:
                g["lr"] = _lr(step, cfg)
            loss = _batch_loss(head, target, rows[idx], feats[idx], W, cos, sin, cfg, noise, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), cfg.clip)
            opt.step()
            losses.append(float(loss.detach()))
            advance(loss=losses[-1])
    return losses


# ---- decoding ---------------------------------------------------------------------------------------------
def coded(module: nn.Module, bits: int) -> nn.Module:
    """`module` with its float linears replaced by `bits`-bit codes (round to nearest, symmetric, groups of 32 input
    columns, per row where 32 does not divide), run by effspec's low-bit kernels.

    A draft needs no exact arithmetic: the target verifies every proposal, so the draft's rounding can change
    the speed, never the output. At 8 bits it reads a quarter of the float bytes and proposed the same tokens on
    smollm2-135m's 500-step head: the same accepted tokens and rounds as the float head on each of bench/decode.py's
    open prompts. With its head rows coded too, the draft's time a round fell 2.92 -> 2.19 ms, and the tree with
    lookup rose 1.294x -> 1.332x plain greedy (1 thread, one process ABBA). The head rows stay float (the target's
    rows, whose int8 screen gives the chain's exact argmax): coding them saved 0.25 ms a round (2.53 -> 2.28) and
    nothing measurable end to end (1.374x against 1.368x, ABBA). At 4 bits it accepted fewer (170 against 179)
    and gained less."""
    for name, linear in linear_layers(module, exclude=()).items():
        grid = Grid(bits, 32 if linear.in_features % 32 == 0 else 0, True)
        replace_module(module, name, QuantLinear.from_linear(linear, grid, name))
    return module


class EagleDraft:
    """Proposals of an EAGLE head: catches up on the target's features of the kept tokens, then runs on its own.

    `effspec.speculative` calls `observe(features)` with the target's features of every token the target has
    kept (prompt first, then each round's), and `propose` / `sample` with all tokens so far: the newest one
    has no feature yet (the target has not read it), which is exactly what the draft's first step takes.
    """

    def __init__(self, head: EagleHead, target: nn.Module, max_len: int, vocab: torch.Tensor | None = None,
                 width: int = 3, bits: int | None = 8):
        """`vocab`: the tokens the draft may propose; default the head's own (from training). `width` > 1:
        greedy rounds also propose the draft's 2nd..width-th likeliest first tokens (`propose_tree`); 3 by default,
        since a verify of 2-4 rows costs about the same (1: the chain alone). `bits` (8, the default, or 4): the
        draft's FC and block run as codes of that width (`coded`; a copy, the head itself is untouched);
        None: as they are. Without the low-bit kernels they stay float, which is faster than decoding codes in
        torch."""
        if width < 1:
            raise ValueError(f"width: expected a positive count, got {width}")
        if bits is not None and bits not in (4, 8):
            raise ValueError(f"bits: expected 8, 4 or None, got {bits}")
        if bits is not None and head.fc.weight.dtype == torch.float32 and effspec_kernels.available():
            head = coded(copy.deepcopy(head), bits)
        else:
            bits = None
        self.head, self.target, self.width, self.bits = head, target, width, bits
        vocab = head.vocab if vocab is None else vocab
        self.lean = LeanDecoder(head.view(target), max_len, vocab=vocab)  # its head rows: the target's, float
        self.features: list[torch.Tensor] = []  # observed, not yet fed: the tokens fed..seen - 1
        self.seen = 0  # tokens whose target features were observed
        self.fed = 0  # cache slots computed from target features (slot s: input (t_{s+1}, f_s))

    def observe(self, features: torch.Tensor) -> None:
        self.features.append(features.detach())
        self.seen += features.shape[0]

    def _catch_up(self, tokens: list[int], k: int) -> tuple[torch.Tensor | None, int]:
        """Feed the slots the target's features allow; (predicted feature of the newest token, room for k)."""
        if len(tokens) != self.seen + 1:
            raise ValueError(f"EagleDraft: {len(tokens)} tokens but features of {self.seen}: "
                             "observe() the target's features of every token but the newest")
        if self.seen == 0:
            return None, 0
        k = min(k, self.lean.cache.k.shape[2] - self.seen)
        if k <= 0:
            return None, 0
        f = torch.cat(self.features) if len(self.features) > 1 else self.features[0]  # tokens fed..seen - 1
        self.features = []
        self.lean.cache.length = self.fed  # drop last round's own-prediction slots
        new = torch.tensor(tokens[self.fed + 1: self.seen + 1])
        x = self.head.inputs(self.target, new, f, self.lean.linear)
        self.fed = self.seen
        return self.lean.hidden(x, last_only=True), k

    def _next(self, token: int, f: torch.Tensor) -> torch.Tensor:
        return self.lean.hidden(self.head.inputs(self.target, torch.tensor([token]), f, self.lean.linear))

    def _chain(self, tokens: list[int], k: int) -> tuple[list[int], list[int]]:
        """Up to k greedy proposals, and the first step's `width` likeliest tokens (none when there is no room or
        no feature)."""
        f, k = self._catch_up(tokens, k)
        if f is None:
            return [], []
        top = self.lean.top(f, self.width).tolist()
        out = top[:1]
        while len(out) < k:
            f = self._next(out[-1], f)
            out.append(int(self.lean.argmax(f)[-1]))
        return out, top

    @torch.inference_mode()
    def propose(self, tokens: list[int], k: int) -> list[int]:
        return self._chain(tokens, k)[0]

    @torch.inference_mode()
    def propose_tree(self, tokens: list[int], k: int) -> tuple[list[int], list[int]]:
        """The chain of `propose`, then the draft's next `width` - 1 likeliest first tokens as siblings of its
        first: (tokens, parents), parent -1 for a first token and i for the token after the chain's i-th.

        The first step's logits give the siblings for free, and the target verifies them in the same pass
        (tree rows, `effspec.decoder.LeanDecoder.hidden`): where the draft's top choice is wrong its second is
        often right (smollm2's 1,000-step head, held out: top-1 59%, top-2 71%). A one-level form of EAGLE's
        token tree (Sec. 4.3), sized for a verify that costs about one step at 2-3 rows but not at 8."""
        out, top = self._chain(tokens, k)
        siblings = top[1:]
        return out + siblings, list(range(-1, len(out) - 1)) + [-1] * len(siblings)

    @torch.inference_mode()
    def sample(self, tokens: list[int], k: int, config: SamplingConfig,
               generator: torch.Generator | None) -> tuple[list[int], torch.Tensor]:
        """Up to k tokens drawn from the draft's `config`-filtered distribution q, and q's rows (n, vocab)."""
        f, k = self._catch_up(tokens, k)
        out, q = [], []
        while f is not None and len(out) < k:
            q.append(probabilities(self.lean.logits(f)[-1:], config))
            out.append(int(torch.multinomial(q[-1], 1, generator=generator)))
            if len(out) < k:
                f = self._next(out[-1], f)
        return out, (torch.cat(q) if q else torch.empty(0, 0))
