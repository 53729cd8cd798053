"""A lean decode loop for Llama-family models: the model's own modules, a static KV cache, no framework.

At batch 1 a 135M-parameter model spends as long in transformers' per-token
bookkeeping (cache objects, masks, rotary tables recomputed every step, kwargs
plumbing through 30 blocks) as in its matrix-vector products once those are
4-bit: measured on smollm2 with packed w4 layers, ~20 ms of a 45 ms token. This
module runs the same computation the way gpt-fast does -- one function per
block over a preallocated cache -- while calling the model's own submodules
(embeddings, norms, linears, head), so packed layers, rotation wrappers and tied
heads behave exactly as in the transformers forward. `greedy` uses it whenever
`supported(model)`; tests check logits and tokens against transformers.

The block it runs (Llama, Qwen2 without sliding windows; Mistral-style GQA):

    h = x + o_proj(attention(rope(q_proj(n1(x))), rope(k_proj(n1(x))), v_proj(n1(x))))
    y = h + down_proj(act(gate_proj(n2(h))) * up_proj(n2(h)))
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from effspec import kernels as effspec_kernels
from effspec.greedy_head import Int8Screen, screen_of

SUPPORTED_TYPES = ("llama", "qwen2")
RMS_NORMS = ("LlamaRMSNorm", "Qwen2RMSNorm")
SILU = ("SiLUActivation", "SiLU")
STEP_ROWS = 8  # up to this many new tokens (decode, speculative verify) take the compiled path
_USE_OPS = os.environ.get("EFFSPEC_CPP_KERNELS", "1") != "0"  # x * rsqrt(mean(x^2) + eps) * weight, as F.rms_norm
SCREEN_HEAD = True  # greedy tokens through the head's int8 screen (effspec.greedy_head); False: the logits' argmax


def supported(model: nn.Module) -> bool:
    """True for the block layout above: a transformers Llama/Qwen2 causal LM with plain full attention."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in SUPPORTED_TYPES or getattr(config, "use_sliding_window", False):
        return False
    body = getattr(model, "model", None)
    layers = getattr(body, "layers", None)
    if layers is None or not hasattr(body, "rotary_emb") or not hasattr(model, "lm_head"):
        return False
    for block in layers:
        attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
        if not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling", "head_dim")):
            return False
        if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            return False
        if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):  # Qwen3-style QK norms: not this block
            return False
    return True


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in transformers' half-split convention: x cos + rotate_half(x) sin."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


class StaticCache:
    """Keys and values of every block, (blocks, kv_heads, max_len, head_dim) each, filled left to right."""

    def __init__(self, blocks: int, kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype):
        self.k = torch.zeros(blocks, kv_heads, max_len, head_dim, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.length = 0

    @property
    def filled_bytes(self) -> int:
        return 2 * self.k[:, :, : self.length].numel() * self.k.element_size()


def tree_layout(parents: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows continuing rows `parents` (parents[t] < t; -1: the cached prefix): each row's position after the
    prefix (T,), and which rows each row sees (T, T) -- its ancestors and itself. A chain (parents t - 1) gives
    positions 0..T-1 and the causal mask."""
    T = len(parents)
    positions = torch.zeros(T, dtype=torch.long)
    visible = torch.eye(T, dtype=torch.bool)
    for t, p in enumerate(parents):
        if not -1 <= p < t:
            raise ValueError(f"parents[{t}] = {p}: a row continues the prefix (-1) or an earlier row")
        if p >= 0:
            positions[t] = positions[p] + 1
            visible[t] |= visible[p]
    return positions, visible


def _plain_weights(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(weight, bias) of a plain float32 `nn.Linear`, as `linear_rows` takes them; None for any other layer."""
    if type(module) is not nn.Linear or module.weight.dtype != torch.float32:
        return None
    bias = effspec_kernels.EMPTY if module.bias is None else module.bias.detach().float()
    return module.weight.detach(), bias


def _bitmasks(visible: torch.Tensor) -> torch.Tensor:
    """Each row of a (T, T) bool matrix as an int64 whose bit r is column r (the compiled kernel's form)."""
    return (visible.to(torch.long) << torch.arange(visible.shape[1])).sum(1)


class LeanDecoder:
    """Prefill and one-token steps of a supported model over a `StaticCache` of `max_len` positions."""

    def __init__(self, model: nn.Module, max_len: int, n_blocks: int | None = None,
                 vocab: torch.Tensor | None = None):
        """`n_blocks`: run only the first n blocks before the final norm and head (a self-speculation draft).
        `vocab`: token ids whose logits the head computes, the rest -inf (a draft's cheap head, see
        `effspec.speculative.frequent_tokens`); needs a float head."""
        if not supported(model):
            raise ValueError(f"{type(model).__name__}: not a block layout effspec.decoder runs")
        self.model, self.body = model, model.model
        self.blocks = list(self.body.layers)[:n_blocks]
        attn = self.blocks[0].self_attn
        cfg = model.config
        self.heads, self.head_dim = cfg.num_attention_heads, attn.head_dim
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        dtype = self.body.embed_tokens.weight.dtype
        self.cache = StaticCache(len(self.blocks), self.kv_heads, max_len, self.head_dim, dtype)
        positions = torch.arange(max_len)[None]
        probe = torch.zeros(1, 1, self.head_dim, dtype=dtype)
        cos, sin = self.body.rotary_emb(probe, positions)  # the model's own rotary (scaling types included)
        self.cos, self.sin = cos[0], sin[0]  # (max_len, head_dim)
        # compiled one-token helpers (effspec.kernels) for float32 models; None: eager torch throughout
        self.ops = effspec_kernels.decode_ops() if dtype == torch.float32 and _USE_OPS else None
        # (weight, bias) of each plain float linear the compiled path takes as it is, found on first use: looking
        # them up through nn.Module's attributes on every call was ~5% of a decode step (~100k lookups a 128-token
        # generation). A decoder lives for one generation; the model's modules do not change under it.
        self._plain: dict[nn.Module, tuple[torch.Tensor, torch.Tensor] | None] = {}
        self.vocab = self.head_rows = None
        self._vocab_screen = None  # (the whole head's screen, its rows for `vocab`)
        if vocab is not None:
            head = model.lm_head
            if type(head) is not nn.Linear or head.bias is not None:
                raise ValueError(f"a vocabulary subset needs a plain float head, not {type(head).__name__}")
            self.vocab = vocab.to(torch.long).unique()  # sorted, no repeats
            self.head_rows = nn.Linear(head.in_features, self.vocab.numel(), bias=False, device="meta")
            self.head_rows.weight = nn.Parameter(head.weight.detach()[self.vocab].contiguous(), requires_grad=False)

    def _norm(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """transformers' RMSNorm as one fused op when it is exactly that class; anything else (a rotation
        wrapper, another norm) through its own forward."""
        if type(norm).__name__ in RMS_NORMS:
            if self.ops is not None:
                return self.ops.rms_norm(x, norm.weight, norm.variance_epsilon)
            return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)
        return norm(x)

    def _attend(self, attn: nn.Module, q: torch.Tensor, K: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        """softmax(q K^T * scale + mask) V for q (heads, T, d) over K, V (kv_heads, L, d): (T, heads * d)."""
        T = q.shape[1]
        o = F.scaled_dot_product_attention(q[None], K[None], V[None], attn_mask=self._mask, is_causal=self._causal,
                                           scale=attn.scaling, enable_gqa=self.kv_heads != self.heads)
        return o[0].transpose(0, 1).reshape(T, -1)

    def _lin(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """A float linear on up to STEP_ROWS rows through the compiled `linear_rows`; everything else, packed
        layers included, through the module. On this AMD CPU BLAS is slow at few rows: with weights not in
        cache, one row of 576->1536 took 350 us in `F.linear` and 131 us in `linear_rows`, the 49152-row
        head 10.5 ms against 3.4 ms (1 thread); its few-row GEMM is 2-3x slower still than its GEMV.
        Layers that compute as float take the same path: a pruned layer's dense expansion, and a low-rank
        layer's two thin factors one after the other."""
        if x.shape[0] <= STEP_ROWS and self.ops is not None:
            if module not in self._plain:
                self._plain[module] = _plain_weights(module)
            plain = self._plain[module]
            if plain is not None and x.dtype == torch.float32:
                return self.ops.linear_rows(x.contiguous(), *plain)
            kind = getattr(module, "kind", None)
            if kind == "lowrank":
                return self._lin(module.B, self._lin(module.A, x))
            weight = module.expanded() if kind == "sparse" else None
            if weight is not None and weight.dtype == x.dtype:
                bias = effspec_kernels.EMPTY if module.bias is None else module.bias.to(x.dtype)
                return self.ops.linear_rows(x.contiguous(), weight, bias)
        return module(x)

    linear = _lin  # public too: a draft's own layers outside the blocks (EAGLE's FC) take the same path

    def _step(self, i: int, block: nn.Module, x: torch.Tensor, start: int, cos: torch.Tensor,
              sin: torch.Tensor) -> torch.Tensor:
        """Up to STEP_ROWS tokens through block i on the compiled helpers: norms, RoPE + cache write +
        attention, and silu(gate) * up each one call."""
        attn, mlp, ops = block.self_attn, block.mlp, self.ops
        h = self._norm(block.input_layernorm, x)
        o = ops.rope_attend(self._lin(attn.q_proj, h), self._lin(attn.k_proj, h), self._lin(attn.v_proj, h),
                            cos, sin, self.cache.k[i], self.cache.v[i], start, attn.scaling, self._see)
        x = x + self._lin(attn.o_proj, o)
        h = self._norm(block.post_attention_layernorm, x)
        if type(mlp.act_fn).__name__ in SILU:
            return x + self._lin(mlp.down_proj, ops.silu_mul(self._lin(mlp.gate_proj, h), self._lin(mlp.up_proj, h)))
        return x + self._lin(mlp.down_proj, mlp.act_fn(self._lin(mlp.gate_proj, h)) * self._lin(mlp.up_proj, h))

    def _block(self, i: int, block: nn.Module, x: torch.Tensor, start: int, cos: torch.Tensor,
               sin: torch.Tensor) -> torch.Tensor:
        T = x.shape[0]
        if T <= STEP_ROWS and self.ops is not None:
            return self._step(i, block, x, start, cos, sin)
        attn, mlp = block.self_attn, block.mlp
        h = self._norm(block.input_layernorm, x)
        q = attn.q_proj(h).view(T, self.heads, self.head_dim)
        k = attn.k_proj(h).view(T, self.kv_heads, self.head_dim)
        v = attn.v_proj(h).view(T, self.kv_heads, self.head_dim).transpose(0, 1)
        qk = rope(torch.cat((q, k), 1).transpose(0, 1), cos, sin)  # one RoPE pass for both
        end = start + T
        self.cache.k[i, :, start:end] = qk[self.heads:]
        self.cache.v[i, :, start:end] = v
        o = self._attend(attn, qk[: self.heads], self.cache.k[i, :, :end], self.cache.v[i, :, :end])
        x = x + attn.o_proj(o)
        h = self._norm(block.post_attention_layernorm, x)
        return x + mlp.down_proj(mlp.act_fn(mlp.gate_proj(h)) * mlp.up_proj(h))

    def forward(self, ids: torch.Tensor, last_only: bool = True) -> torch.Tensor:
        """Logits (T or 1, vocab) for the 1-D `ids` appended at the cache's end."""
        return self.logits(self.feed(ids, last_only))

    def feed(self, ids: torch.Tensor, last_only: bool = True, parents: list[int] | None = None) -> torch.Tensor:
        """`hidden` of the 1-D token `ids`' embeddings: the tokens appended at the cache's end."""
        return self.hidden(self.body.embed_tokens(ids), last_only, parents)

    def hidden(self, x: torch.Tensor, last_only: bool = True, parents: list[int] | None = None) -> torch.Tensor:
        """The final-normed hidden states (T or 1, hidden) -- what the head reads -- of the input vectors `x`
        (T, hidden) appended at the cache's end. Split from `forward` for drafts that feed on them: EAGLE reads
        the target's, and builds its own inputs instead of embedding tokens.

        `parents` makes the new rows a tree (a speculative verify of several candidate continuations at once):
        row t continues row parents[t] < t (-1: the cached prefix), sits at the position after its parent's and
        attends to the prefix, its ancestors and itself only. Every row's key and value still take a cache slot
        of their own (start + t); `keep` then moves the accepted path's to the front."""
        start, T = self.cache.length, x.shape[0]
        if start + T > self.cache.k.shape[2]:
            raise ValueError(f"cache holds {self.cache.k.shape[2]} positions; {start} used, {T} more asked")
        tree = parents is not None and any(p != t - 1 for t, p in enumerate(parents))
        # SDPA's is_causal aligns its mask top-left, right only for an empty cache; T new tokens after a
        # filled prefix (a speculative verify step) get the explicit mask: query t sees keys <= start + t
        self._causal = T > 1 and start == 0 and not tree
        self._mask, self._see = None, effspec_kernels.EMPTY
        if tree:
            positions, visible = tree_layout(parents)
            cos, sin = self.cos[start + positions], self.sin[start + positions]  # position <= slot: in the table
            self._mask = torch.cat((torch.ones(T, start, dtype=torch.bool), visible), 1)
            self._see = _bitmasks(visible) if T <= STEP_ROWS else None  # the compiled path's form
        else:
            cos, sin = self.cos[start:start + T], self.sin[start:start + T]
            if T > 1 and start:
                self._mask = torch.arange(start + T)[None] <= start + torch.arange(T)[:, None]
        for i, block in enumerate(self.blocks):
            x = self._block(i, block, x, start, cos, sin)
        self.cache.length = start + T
        return self._norm(self.body.norm, x[-1:] if last_only else x)

    def keep(self, start: int, path: list[int]) -> None:
        """After a tree step that began at cache length `start`: keep the keys and values of its rows `path`
        (increasing, a root-to-node path), moved to slots start, start + 1, ...; drop the other rows'."""
        for slot, row in enumerate(path):
            if row != slot:  # row >= slot, and no later source lies below this destination
                self.cache.k[:, :, start + slot] = self.cache.k[:, :, start + row]
                self.cache.v[:, :, start + slot] = self.cache.v[:, :, start + row]
        self.cache.length = start + len(path)

    def argmax(self, x: torch.Tensor) -> torch.Tensor:
        """The greedy tokens (rows,) of final-normed hidden states: `logits(x).argmax(-1)`, ties included, read
        through the head's int8 screen (`effspec.greedy_head`, a quarter of a float32 head's bytes) when the head
        is a plain float32 one on the compiled path."""
        if SCREEN_HEAD and self.ops is not None and x.dtype == torch.float32 and x.shape[0] <= STEP_ROWS:
            screen = self._screen()
            picks = None if screen is None else screen.argmax(x)
            if picks is not None:
                return picks if self.vocab is None else self.vocab[picks]
        return self.logits(x).argmax(-1)

    def screens_argmax(self) -> bool:
        """True when `argmax` reads the head's int8 screen, whose cost grows with the rows it is given."""
        return SCREEN_HEAD and self.ops is not None and self._screen() is not None

    def prepare_argmax(self) -> None:
        """Build the head's screen now (first use of a head: ~0.1-0.2 s for smollm2's), so that a timed prefill
        does not include it."""
        if SCREEN_HEAD and self.ops is not None:
            self._screen()

    def _screen(self):
        """The head's int8 screen; with `vocab`, its rows of the whole head's screen, taken once per decoder."""
        full = screen_of(self.model.lm_head)
        if self.vocab is None or full is None:
            return full
        if self._vocab_screen is None or self._vocab_screen[0] is not full:
            self._vocab_screen = (full, Int8Screen.rows_of(full, self.vocab, self.head_rows.weight.detach()))
        return self._vocab_screen[1]

    def next_token(self, ids: torch.Tensor) -> int:
        """The greedy token after the 1-D `ids`, appended at the cache's end."""
        return int(self.argmax(self.feed(ids))[-1])

    def top(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """The n likeliest tokens after the last row of x, likeliest first (fewer when `vocab` has fewer): with
        `vocab`, from its rows' logits alone, not a whole-vocabulary row of -inf (a draft's first step: ~0.3 ms
        less a round for EAGLE's 8,232-token head)."""
        if self.vocab is None:
            return self.logits(x[-1:])[0].topk(min(n, self.model.lm_head.out_features)).indices
        return self.vocab[self._lin(self.head_rows, x[-1:])[0].topk(min(n, self.vocab.numel())).indices]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The head's logits (rows, vocab) of final-normed hidden states; -inf outside `vocab` when it is set."""
        if self.vocab is None:
            return self._lin(self.model.lm_head, x)
        logits = x.new_full((x.shape[0], self.model.lm_head.out_features), float("-inf"))
        logits[:, self.vocab] = self._lin(self.head_rows, x)
        return logits
