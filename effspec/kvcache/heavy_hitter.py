"""Heavy-hitter eviction (H2O, Zhang et al. 2023): keep the tokens that have drawn the most attention.

H2O's observation: the attention a token receives, summed over the queries
that have seen it, is heavy-tailed and stable -- a few "heavy hitters" take
most of it, and those stay important later. So each block keeps, per KV head,
a budget of `ratio` x the tokens seen: half the budget for the most recent
tokens (local context), half for the older tokens with the highest accumulated
attention; the rest are evicted for good. Different heads keep different tokens.

A `Cache` never sees queries, so the scores come from a forward hook on each
attention module: after the block's attention ran, it recomputes that step's
queries (q_proj and RoPE of the same input, one small matmul), takes the
softmax of their causal scores against the held keys -- the attention those
keys just received, summed over the queries and the query heads that share the
KV head -- adds it to the running scores, and evicts down to the budget. The
hooks are installed once per model and do nothing unless the forward's cache
is a `HeavyHitterCache`. Every block keeps the same count, so transformers'
single mask (sized from block 0) fits all of them.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from effspec.decoder import rope
from effspec.errors import UserError
from effspec.kvcache.base import CompressedCache, CompressedLayer, decoder_blocks, tensor_bytes

QUERY_CHUNK = 256  # queries scored at a time: a 4k-token prefill's full score matrix would be ~600 MB per block


class HeavyHitterLayer(CompressedLayer):
    def __init__(self, ratio: float, recent_share: float):
        super().__init__()
        self.ratio, self.recent_share = ratio, recent_share
        self.scores = None  # (batch, kv_heads, held) accumulated attention
        self.positions = None  # (batch, kv_heads, held) text position of each held token

    @property
    def held(self) -> int:
        return self.keys.shape[-2] if self.is_initialized else 0

    def held_bytes(self) -> int:
        return tensor_bytes(self.keys, self.values) if self.is_initialized else 0

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.scores = key_states.new_zeros(key_states.shape[:2] + (0,), dtype=torch.float32)
            self.positions = torch.zeros(key_states.shape[:2] + (0,), dtype=torch.long)
        new = torch.arange(self.seen, self.seen + key_states.shape[-2]).expand(*key_states.shape[:2], -1)
        self.positions = torch.cat([self.positions, new], -1)
        self.seen += key_states.shape[-2]
        self.keys = torch.cat([self.keys, key_states], -2)
        self.values = torch.cat([self.values, value_states], -2)
        self.scores = torch.cat([self.scores, self.scores.new_zeros(key_states.shape[:3])], -1)
        return self.keys, self.values

    def observe(self, queries: torch.Tensor, scaling: float) -> None:
        """Add the attention the held keys got from `queries` (b, q_heads, T, d), the step's last T tokens; evict."""
        b, qh, T, d = queries.shape
        kh, n = self.keys.shape[1], self.keys.shape[-2]
        q = queries.float().view(b, kh, qh // kh, T, d)
        keys = self.keys.float()
        for t0 in range(0, T, QUERY_CHUNK):
            t1 = min(T, t0 + QUERY_CHUNK)
            logits = torch.einsum("bkgtd,bknd->bkgtn", q[..., t0:t1, :], keys) * scaling
            visible = torch.arange(n)[None, :] <= (n - T + torch.arange(t0, t1))[:, None]  # causal over the new rows
            logits.masked_fill_(~visible, float("-inf"))
            self.scores += logits.softmax(-1).sum((2, 3))
        self.evict()

    def budget(self) -> int:
        return max(1, math.ceil(self.ratio * self.seen))

    def evict(self) -> None:
        n, keep = self.keys.shape[-2], self.budget()
        if n <= keep:
            return
        recent = max(1, round(keep * self.recent_share)) if keep > 1 else keep
        heavy = keep - recent
        old = self.scores[..., : n - recent]
        top = old.topk(heavy, dim=-1).indices.sort(-1).values if heavy else old.new_zeros(old.shape[:2] + (0,)).long()
        tail = torch.arange(n - recent, n).expand(*top.shape[:2], recent)
        idx = torch.cat([top, tail], -1)  # (b, kv_heads, keep)
        gather = idx[..., None].expand(-1, -1, -1, self.keys.shape[-1])
        self.keys = self.keys.gather(2, gather)
        self.values = self.values.gather(2, gather)
        self.scores = self.scores.gather(2, idx)
        self.positions = self.positions.gather(2, idx)

    def reset(self) -> None:
        super().reset()
        self.scores = self.positions = None


def _after_attention(module: nn.Module, args, kwargs, output) -> None:
    cache = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers >= 5.24 names it `cache`
    if not isinstance(cache, HeavyHitterCache):
        return
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    cos, sin = kwargs["position_embeddings"]
    b, T, _ = hidden.shape
    q = module.q_proj(hidden).view(b, T, -1, module.head_dim)
    if hasattr(module, "q_norm"):
        q = module.q_norm(q)
    q = rope(q.transpose(1, 2), cos.unsqueeze(1), sin.unsqueeze(1))
    cache.layers[module.layer_idx].observe(q, module.scaling)


def attach_hooks(model: nn.Module) -> None:
    """Install the score hooks on every attention module of `model`, once."""
    if getattr(model, "_effspec_h2o_hooks", False):
        return
    found = 0
    for module in model.modules():
        if all(hasattr(module, a) for a in ("q_proj", "k_proj", "layer_idx", "head_dim", "scaling")):
            module.register_forward_hook(_after_attention, with_kwargs=True)
            found += 1
    if not found:
        raise UserError(f"{type(model).__name__}: no attention modules with q_proj/layer_idx for the h2o cache to score")
    model._effspec_h2o_hooks = True


class HeavyHitterCache(CompressedCache):
    """Keep `ratio` of the tokens seen per block and KV head: `recent_share` of them the newest, the rest by score."""

    def __init__(self, model, ratio: float = 0.2, recent_share: float = 0.5):
        if not 0 < ratio <= 1 or not 0 < recent_share <= 1:
            raise UserError(f"h2o ratio={ratio} and recent_share={recent_share} must be in (0, 1]")
        self.ratio, self.recent_share = ratio, recent_share
        attach_hooks(model)
        super().__init__([HeavyHitterLayer(ratio, recent_share) for _ in range(decoder_blocks(model))])
