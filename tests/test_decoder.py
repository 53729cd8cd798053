"""effspec.decoder against transformers' own forward: same logits, same greedy tokens, packed or not."""

import math

import pytest
import torch
import transformers

from effspec import decoder, kernels
from effspec.decoder import LeanDecoder
from effspec.generate import greedy
from effspec.models import load_model
from effspec.registry import get_step

PROMPT = torch.randint(0, 256, (23,), generator=torch.Generator().manual_seed(0))


def hf_logits(model, ids):
    with torch.no_grad():
        return model(ids[None], use_cache=False).logits[0]


def lean_logits(model, ids, prefill: int, engine_ops: bool = True):
    """Logits of every position: a prefill of `prefill` tokens, then one token a step."""
    with torch.inference_mode():
        lean = LeanDecoder(model, ids.numel())
        if not engine_ops:
            lean.ops = None
        rows = [lean.forward(ids[:prefill], last_only=False)]
        for t in range(prefill, ids.numel()):
            rows.append(lean.forward(ids[t:t + 1]))
    return torch.cat(rows)


def rtn(model, bits=4, group=32):
    step = get_step("rtn")
    return step.apply(model, step.config(bits=bits, group_size=group, symmetric=True))


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
@pytest.mark.parametrize("ops", [True, False])
def test_lean_logits_equal_transformers_float(name, ops):
    model = load_model(name).model
    if ops and kernels.decode_ops() is None:
        pytest.skip("no C++ compiler: the eager path is the other parametrization")
    assert decoder.supported(model)
    expected = hf_logits(model, PROMPT)
    got = lean_logits(model, PROMPT, prefill=9, engine_ops=ops)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_lean_greedy_reproduces_transformers_greedy_with_packed_layers():
    model = rtn(load_model("tiny-llama").model)
    a = greedy(model, PROMPT, 20, engine="transformers")
    b = greedy(model, PROMPT, 20, engine="lean")
    assert torch.equal(a.tokens, b.tokens)
    assert a.cache_bytes == b.cache_bytes  # both hold prompt + 19 positions


def test_lean_decoder_runs_wrapped_modules_of_rotated_models():
    """rotate swaps norms and down_proj for wrappers: the lean loop must call them, not bypass them."""
    model = load_model("tiny-llama").model
    step = get_step("rotate")
    model = step.apply(model, step.config(seed=0))
    assert decoder.supported(model)
    assert torch.allclose(lean_logits(model, PROMPT, prefill=5), hf_logits(model, PROMPT), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("step,fields", [("magnitude", {"sparsity": 0.5}), ("svd", {"ratio": 0.6})])
def test_pruned_and_low_rank_layers_take_the_fast_path_with_transformers_logits(step, fields):
    if kernels.decode_ops() is None:
        pytest.skip("no C++ compiler: no fast path")
    info = get_step(step)
    model = info.apply(load_model("tiny-llama").model, info.config(**fields))
    expected = hf_logits(model, PROMPT)
    calls = []

    class CountingOps:  # the compiled helpers, counting calls of linear_rows
        def __init__(self, ops):
            self.ops = ops

        def __getattr__(self, name):
            return getattr(self.ops, name)

        def linear_rows(self, *args):
            calls.append(1)
            return self.ops.linear_rows(*args)

    with torch.inference_mode():
        lean = LeanDecoder(model, PROMPT.numel())
        lean.ops = CountingOps(lean.ops)
        rows = [lean.forward(PROMPT[:9], last_only=False)] + [lean.forward(PROMPT[t:t + 1]) for t in range(9, PROMPT.numel())]
    assert torch.allclose(torch.cat(rows), expected, atol=1e-4, rtol=1e-4)
    per_step = 7 * 2 * (2 if step == "svd" else 1) + 1  # q k v o gate up down in 2 blocks (factors: twice), head
    assert len(calls) >= per_step * (PROMPT.numel() - 9)  # every decode step ran its linears on linear_rows


def test_multi_token_step_after_prefill_is_causal():
    """A k-token step over a filled cache (a speculative verify) sees the prefix and its own earlier tokens."""
    model = load_model("tiny-llama").model
    expected = hf_logits(model, PROMPT)
    with torch.inference_mode():
        lean = LeanDecoder(model, PROMPT.numel())
        lean.forward(PROMPT[:10])
        got = lean.forward(PROMPT[10:16], last_only=False)
    assert torch.allclose(got, expected[10:16], atol=1e-4, rtol=1e-4)


def test_cache_overflow_is_a_clear_error():
    model = load_model("tiny-llama").model
    with torch.inference_mode():
        lean = LeanDecoder(model, 8)
        lean.forward(PROMPT[:8])
        with pytest.raises(ValueError, match="cache holds 8 positions"):
            lean.forward(PROMPT[8:9])


def test_unsupported_layouts_fall_back_to_transformers():
    cfg = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, use_sliding_window=True)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    assert not decoder.supported(model)
    assert not decoder.supported(torch.nn.Linear(2, 2))
    gen = greedy(model, torch.tensor([1, 2, 3]), 4)  # auto: transformers' forward
    assert gen.tokens.numel() == 4
    with pytest.raises(ValueError, match="not a block layout"):
        LeanDecoder(model, 8)


@pytest.mark.parametrize("d,pos", [(8, 7), (64, 37), (128, 20), (192, 37)])  # each head-size path, partial key blocks
def test_rope_attend_matches_a_reference_with_grouped_heads(d, pos):
    ops = kernels.decode_ops()
    if ops is None:
        pytest.skip("no C++ compiler here")
    g = torch.Generator().manual_seed(3)
    H, KV, L = 6, 2, pos + 5
    q, k, v = (torch.randn(1, n * d, generator=g) for n in (H, KV, KV))
    theta = torch.rand(d // 2, generator=g) * 3
    cos, sin = torch.cat([theta.cos()] * 2), torch.cat([theta.sin()] * 2)
    kc, vc = torch.randn(KV, L, d, generator=g), torch.randn(KV, L, d, generator=g)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    o = ops.rope_attend(q, k, v, cos, sin, kc, vc, pos, 0.3, kernels.EMPTY)

    def rope(x):  # transformers' rotate_half form
        return x * cos + torch.cat((-x[..., d // 2:], x[..., : d // 2]), -1) * sin

    kc_ref[:, pos], vc_ref[:, pos] = rope(k.view(KV, d)), v.view(KV, d)
    assert torch.allclose(kc, kc_ref, atol=1e-6) and torch.equal(vc, vc_ref)
    qh = rope(q.view(H, d))
    ref = []
    for h in range(H):
        kv = h // (H // KV)
        p = torch.softmax(kc_ref[kv, : pos + 1] @ qh[h] * 0.3, 0)
        ref.append(p @ vc_ref[kv, : pos + 1])
    assert torch.allclose(o, torch.cat(ref)[None], atol=1e-5)
    x = torch.randn(3, 16, generator=g)
    w = torch.rand(16, generator=g)
    assert torch.allclose(ops.rms_norm(x, w, 1e-6), x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w, atol=1e-6)
    assert torch.allclose(ops.silu_mul(x, w.expand(3, 16).contiguous()), torch.nn.functional.silu(x) * w, atol=1e-6)
    assert math.isfinite(float(o.sum()))


@pytest.mark.parametrize("start", [21, 28])
@pytest.mark.parametrize("d", [8, 64, 128])
@pytest.mark.parametrize("H,KV", [(9, 3), (8, 2)])
def test_rope_attend_rows_of_a_verify_step_equal_their_own_decode_steps(d, H, KV, start):
    """T new tokens in one call give, row for row, bitwise the outputs of T one-token calls, and match softmax
    attention computed in torch. The vectorized path takes a key/value head's T * H / KV queries 3 at a time:
    with 4 queries per head (8, 2) a query lands in a pass of 1, 2 or 3 depending on T. The 512-bit path scores
    keys 16 at a time: from start 28 a verify's last block is whole where its first row's decode step ends
    in a partial one. One thread gives the same outputs as the default count."""
    ops = kernels.decode_ops()
    if ops is None:
        pytest.skip("no C++ compiler here")
    g = torch.Generator().manual_seed(5)
    L = 40
    theta = torch.rand(L, d // 2, generator=g) * 3
    cos, sin = torch.cat([theta.cos()] * 2, -1), torch.cat([theta.sin()] * 2, -1)
    kc, vc = torch.randn(KV, L, d, generator=g), torch.randn(KV, L, d, generator=g)
    for T in (1, 2, 3, 5, 8):
        q, k, v = (torch.randn(T, n * d, generator=g) for n in (H, KV, KV))
        kc1, vc1, kc2, vc2 = kc.clone(), vc.clone(), kc.clone(), vc.clone()
        together = ops.rope_attend(q, k, v, cos[start:start + T], sin[start:start + T], kc1, vc1, start, 0.125,
                                   kernels.EMPTY)
        alone = torch.cat([ops.rope_attend(q[t:t + 1].contiguous(), k[t:t + 1].contiguous(), v[t:t + 1].contiguous(),
                                           cos[start + t:start + t + 1], sin[start + t:start + t + 1], kc2, vc2,
                                           start + t, 0.125, kernels.EMPTY) for t in range(T)])
        assert torch.equal(together, alone), T
        assert torch.equal(kc1, kc2) and torch.equal(vc1, vc2)
        threads = torch.get_num_threads()
        try:  # the threads' tasks (a key/value head and up to 3 of its queries) leave every query's arithmetic alone
            torch.set_num_threads(1)
            single = ops.rope_attend(q, k, v, cos[start:start + T], sin[start:start + T], kc.clone(), vc.clone(),
                                     start, 0.125, kernels.EMPTY)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(together, single), T
        qh = decoder.rope(q.view(T, H, d).transpose(0, 1), cos[start:start + T], sin[start:start + T])
        keys = kc1[:, : start + T].repeat_interleave(H // KV, 0)
        mask = torch.arange(start + T)[None] <= start + torch.arange(T)[:, None]
        ref = torch.softmax((qh @ keys.transpose(1, 2) * 0.125).masked_fill(~mask, float("-inf")), -1)
        ref = (ref @ vc1[:, : start + T].repeat_interleave(H // KV, 0)).transpose(0, 1).reshape(T, H * d)
        assert torch.allclose(together, ref, atol=1e-5), T


# (41, 37): K not a multiple of 16, the tail loop; N odd, rows outside the multi-row tiles. (50, 64): no tail.
@pytest.mark.parametrize("N,K", [(41, 37), (50, 64)])
def test_linear_rows_matches_f_linear_for_every_row_count(N, K):
    ops = kernels.decode_ops()
    if ops is None:
        pytest.skip("no C++ compiler here")
    g = torch.Generator().manual_seed(5)
    W, b = torch.randn(N, K, generator=g), torch.randn(N, generator=g)
    for M in range(1, 9):
        x = torch.randn(M, K, generator=g)
        assert torch.allclose(ops.linear_rows(x, W, b), torch.nn.functional.linear(x, W, b), atol=1e-5), M
        assert torch.allclose(ops.linear_rows(x, W, kernels.EMPTY), x @ W.t(), atol=1e-5), M


@pytest.mark.parametrize("N,K,bias", [(41, 37, True), (50, 1552, True), (7, 576, True), (50, 576, False)])
def test_linear_rows_give_each_row_bitwise_its_one_row_result(N, K, bias):
    """A verify step's rows must equal its tokens' decode steps bitwise, whatever the row count and tiling (one to
    six weight rows at a time, 256- or 512-bit accumulators, prefetching or not, a tail and bias or neither)."""
    ops = kernels.decode_ops()
    if ops is None:
        pytest.skip("no C++ compiler here")
    g = torch.Generator().manual_seed(6)
    W, x = torch.randn(N, K, generator=g), torch.randn(8, K, generator=g)
    b = torch.randn(N, generator=g) if bias else kernels.EMPTY
    alone = torch.cat([ops.linear_rows(x[i:i + 1].contiguous(), W, b) for i in range(8)])
    for M in range(1, 9):
        assert torch.equal(ops.linear_rows(x[:M].contiguous(), W, b), alone[:M]), M


@pytest.mark.parametrize("d,H,KV", [(8, 9, 3), (64, 8, 2)])
def test_rope_attend_tree_rows_equal_decode_steps_after_their_ancestors(d, H, KV):
    """Tree rows (`see` bitmasks): each row's output is the one-token step of its token after the prefix and its
    own ancestors only, its key rotated at its depth, not its slot. Not bitwise: the hidden keys' zero weights
    sit among the softmax sum's lanes and move the others'."""
    ops = kernels.decode_ops()
    if ops is None:
        pytest.skip("no C++ compiler here")
    g = torch.Generator().manual_seed(8)
    L, start, parents = 40, 17, [-1, 0, 1, 0, 3, -1, 5]
    positions, visible = decoder.tree_layout(parents)
    theta = torch.rand(L, d // 2, generator=g) * 3
    cos, sin = torch.cat([theta.cos()] * 2, -1), torch.cat([theta.sin()] * 2, -1)
    kc, vc = torch.randn(KV, L, d, generator=g), torch.randn(KV, L, d, generator=g)
    T = len(parents)
    q, k, v = (torch.randn(T, n * d, generator=g) for n in (H, KV, KV))
    at = start + positions
    see = decoder._bitmasks(visible)
    tree = ops.rope_attend(q, k, v, cos[at].contiguous(), sin[at].contiguous(), kc.clone(), vc.clone(), start, 0.125,
                           see)
    for t in range(T):
        path = [r for r in range(T) if visible[t, r]]  # ancestors, then the row itself
        kc2, vc2 = kc.clone(), vc.clone()
        for depth, r in enumerate(path):
            row = ops.rope_attend(q[r:r + 1].contiguous(), k[r:r + 1].contiguous(), v[r:r + 1].contiguous(),
                                  cos[start + depth:start + depth + 1], sin[start + depth:start + depth + 1], kc2, vc2,
                                  start + depth, 0.125, kernels.EMPTY)
        assert int(positions[t]) == len(path) - 1
        torch.testing.assert_close(tree[t], row[0], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("engine_ops", [True, False])
def test_tree_verify_rows_equal_their_paths_and_keep_compacts_the_cache(engine_ops):
    """`hidden(parents=...)`: every row's features equal decoding its own root-to-row path; `keep(path)` then
    leaves the cache the path's decode would have, so decoding continues exactly."""
    model = load_model("tiny-llama").model
    ids, parents = [5, 9, 11, 7, 13, 3], [-1, 0, 1, 0, 3, 0]  # rows 1 and 3 and 5 are siblings after row 0
    positions, visible = decoder.tree_layout(parents)
    with torch.inference_mode():
        lean = LeanDecoder(model, 40)
        if not engine_ops:
            lean.ops = None
        lean.forward(PROMPT[:12])
        h = lean.hidden(model.model.embed_tokens(torch.tensor(ids)), last_only=False, parents=parents)
        for t in range(len(ids)):
            path = [r for r in range(len(ids)) if visible[t, r]]
            ref = LeanDecoder(model, 40)
            if not engine_ops:
                ref.ops = None
            ref.forward(PROMPT[:12])
            want = torch.cat([ref.hidden(model.model.embed_tokens(torch.tensor([ids[r]]))) for r in path])
            torch.testing.assert_close(h[t], want[-1], atol=1e-5, rtol=1e-5)
        lean.keep(12, [0, 3, 4])
        ref = LeanDecoder(model, 40)
        if not engine_ops:
            ref.ops = None
        ref.forward(PROMPT[:12])
        for r in (0, 3, 4):
            ref.forward(torch.tensor([ids[r]]))
        assert lean.cache.length == ref.cache.length == 15
        torch.testing.assert_close(lean.cache.k[:, :, :15], ref.cache.k[:, :, :15], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lean.forward(torch.tensor([2])), ref.forward(torch.tensor([2])), atol=1e-5,
                                   rtol=1e-5)


def test_tree_layout_rejects_a_parent_that_is_not_earlier():
    with pytest.raises(ValueError, match="parents\\[1\\] = 1"):
        decoder.tree_layout([-1, 1])
