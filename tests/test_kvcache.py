"""Compressed KV caches against an uncompressed reference: 8-bit close, windows and sinks exact, top scores kept."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from effspec.errors import UserError
from effspec.kvcache import HeavyHitterCache, QuantizedKVCache, StreamingCache, make_cache, parse_cache_spec
from effspec.kvcache.kivi import dequantize_keys, dequantize_values, quantize_keys, quantize_values
from effspec.measure.long_context import long_context_perplexity
from effspec.measure.perplexity import perplexity
from effspec.models import load_model

IDS = torch.randint(0, 256, (60,), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def llama():
    return load_model("tiny-llama").model


def chunked_logits(model, ids, cache, chunk):
    with torch.inference_mode():
        return torch.cat([model(ids[None, s:s + chunk], past_key_values=cache, use_cache=True).logits[0]
                          for s in range(0, ids.numel(), chunk)])


def full_logits(model, ids):
    with torch.inference_mode():
        return model(ids[None], use_cache=False).logits[0]


# --- KIVI ----------------------------------------------------------------------------------------------------------

def reference_groups(x, bits):
    """Min/max asymmetric rounding of each row of the last axis, float16 parameters, written out plainly."""
    flat = x.reshape(-1, x.shape[-1])
    res = torch.empty_like(flat)
    for i, row in enumerate(flat):
        lo, hi = row.min(), row.max()
        scale = ((hi - lo) / (2**bits - 1)).half().float()
        scale = scale if scale > 0 else torch.tensor(1.0)
        lo = lo.half().float()
        res[i] = torch.clamp(torch.round((row - lo) / scale), 0, 2**bits - 1) * scale + lo
    return res.view(x.shape)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_kivi_keys_per_channel_values_per_token(bits):
    k = torch.randn(1, 2, 16, 8) * torch.tensor([1, 1, 1, 20, 1, 1, 1, 1.0])  # an outlier channel
    v = torch.randn(1, 2, 16, 8)
    pk, pv = quantize_keys(k, bits, 4), quantize_values(v, bits, 4)
    # keys: a group is 4 consecutive tokens of one channel
    ref_k = reference_groups(k.view(1, 2, 4, 4, 8).transpose(-1, -2), bits).transpose(-1, -2).reshape(k.shape)
    ref_v = reference_groups(v.view(1, 2, 16, 2, 4), bits).reshape(v.shape)
    assert torch.allclose(dequantize_keys(pk), ref_k, atol=1e-5)
    assert torch.allclose(dequantize_values(pv), ref_v, atol=1e-5)
    assert pk.codes.dtype == torch.uint8 and pk.codes.numel() == k.numel() * bits // 8  # really packed
    assert pk.nbytes() == k.numel() * bits // 8 + 2 * 2 * (k.numel() // 4)  # codes + float16 scale and minimum


def test_kivi_8bit_is_close_to_the_uncompressed_cache(llama):
    ref = full_logits(llama, IDS)
    got = chunked_logits(llama, IDS, QuantizedKVCache(llama, bits=8, group=8, residual=8, sinks=0), chunk=5)
    assert (got - ref).abs().max() < 2e-2 * ref.std()
    got2 = chunked_logits(llama, IDS, QuantizedKVCache(llama, bits=2, group=8, residual=8, sinks=0), chunk=5)
    assert (got2 - ref).abs().max() > (got - ref).abs().max()  # fewer bits, more error: the codes are used


def test_kivi_holds_sinks_and_residual_exact_and_counts_real_bytes(llama):
    cache = QuantizedKVCache(llama, bits=4, group=8, residual=16, sinks=2)
    dyn = DynamicCache(config=llama.config)
    chunked_logits(llama, IDS[:45], cache, chunk=9)
    chunked_logits(llama, IDS[:45], dyn, chunk=9)
    layer, ref = cache.layers[0], dyn.layers[0]  # block 0: its keys do not depend on earlier blocks
    assert layer.held == 45 and cache.get_seq_length() == 45
    assert torch.equal(layer.sink_keys, ref.keys[..., :2, :])
    tail = 45 - 2 - layer.quantized_tokens  # 43 = 2 x 16 quantized + 11 in the residual
    assert layer.quantized_tokens == 32 and tail == 11
    assert torch.equal(layer.keys, ref.keys[..., -tail:, :]) and torch.equal(layer.values, ref.values[..., -tail:, :])
    b, h, _, d = ref.keys.shape
    per_layer = 2 * (b * h * 32 * d // 2 + 2 * 2 * b * h * 32 * d // 8) + 2 * 4 * b * h * (2 + 11) * d
    assert cache.held_bytes() == len(cache.layers) * per_layer


def test_kivi_rejects_bad_settings(llama):
    with pytest.raises(UserError, match="bits=3"):
        QuantizedKVCache(llama, bits=3)
    with pytest.raises(UserError, match="multiple"):
        QuantizedKVCache(llama, group=32, residual=48)
    with pytest.raises(UserError, match="head dimension"):  # 12 does not divide 16; 32 would cover whole heads
        chunked_logits(llama, IDS[:4], QuantizedKVCache(llama, group=12, residual=24), chunk=4)


# --- StreamingLLM --------------------------------------------------------------------------------------------------

def test_streaming_with_room_for_everything_is_exact(llama):
    got = chunked_logits(llama, IDS, StreamingCache(llama, window=len(IDS), sinks=4), chunk=7)
    assert torch.allclose(got, full_logits(llama, IDS), atol=1e-5)


def test_streaming_keeps_exact_window_and_sinks_moved_next_to_it(llama):
    sinks, window, n = 3, 10, 40
    cache, dyn = StreamingCache(llama, window=window, sinks=sinks), DynamicCache(config=llama.config)
    for t in range(n):  # one token a step, as in generation
        with torch.inference_mode():
            llama(IDS[None, t:t + 1], past_key_values=cache, use_cache=True)
    with torch.inference_mode():
        llama(IDS[None, :n], past_key_values=dyn, use_cache=True)
    layer0, ref0 = cache.layers[0], dyn.layers[0]  # block 0's keys depend on its own token only: comparable
    assert layer0.held == sinks + window and cache.get_seq_length() == n
    assert torch.allclose(layer0.keys, ref0.keys[..., -window:, :], atol=1e-6)
    assert torch.allclose(layer0.sink_keys, ref0.keys[..., :sinks, :], atol=1e-6)
    # the keys the next step attends to: sinks re-rotated to sit right before the window (positions 27..29)
    new = torch.zeros_like(ref0.keys[..., :1, :])
    keys, _ = layer0.update(new, new)
    rotary = llama.model.rotary_emb
    delta = (n - window) - sinks
    cos, sin = rotary(new, torch.tensor([[delta]]))
    moved, _ = apply_rotary_pos_emb(ref0.keys[..., :sinks, :], ref0.keys[..., :sinks, :], cos, sin)
    assert torch.allclose(keys[..., :sinks, :], moved, atol=1e-5)


def test_streaming_memory_is_flat_in_transformers_generate(llama):
    cache = StreamingCache(llama, window=16, sinks=2)
    prompt = IDS[None, :8]
    with torch.inference_mode():
        out = llama.generate(prompt, past_key_values=cache, max_new_tokens=40, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
    assert out.shape[1] == 48
    assert cache.held_tokens() == 18 and cache.get_seq_length() == 47
    assert cache.held_bytes() == len(cache.layers) * 2 * 4 * (1 * 2 * 18 * 16)


# --- H2O -----------------------------------------------------------------------------------------------------------

def test_h2o_with_a_full_budget_is_exact(llama):
    got = chunked_logits(llama, IDS, HeavyHitterCache(llama, ratio=1.0), chunk=7)
    assert torch.allclose(got, full_logits(llama, IDS), atol=1e-5)


def test_h2o_keeps_the_most_attended_and_the_most_recent_tokens(llama):
    ratio, n = 0.4, 30
    cache = HeavyHitterCache(llama, ratio=ratio)
    with torch.inference_mode():
        llama(IDS[None, :n], past_key_values=cache, use_cache=True)
        llama.config._attn_implementation = "eager"
        try:
            attn = llama(IDS[None, :n], output_attentions=True, use_cache=False).attentions
        finally:
            llama.config._attn_implementation = "sdpa"
    keep = math.ceil(ratio * n)
    recent = round(keep * 0.5)
    for block, weights in enumerate(attn):  # (1, heads, n, n), already causal and softmaxed
        layer = cache.layers[block]
        kv_heads = layer.keys.shape[1]
        received = weights[0].view(kv_heads, -1, n, n).sum((1, 2))  # attention each key got, per KV head
        assert layer.held == keep
        for h in range(kv_heads):
            top = received[h, : n - recent].topk(keep - recent).indices
            expected = sorted(top.tolist()) + list(range(n - recent, n))
            assert layer.positions[0, h].tolist() == expected
            assert torch.allclose(layer.scores[0, h], received[h, expected], atol=1e-4)


def test_h2o_budget_follows_the_context(llama):
    cache = HeavyHitterCache(llama, ratio=0.25)
    chunked_logits(llama, IDS, cache, chunk=6)
    assert cache.held_tokens() == math.ceil(0.25 * len(IDS))
    assert all(layer.held == cache.held_tokens() for layer in cache.layers)


# --- specs, transformers generate, long-context perplexity ---------------------------------------------------------

@pytest.mark.parametrize("spec", ["kivi:bits=8,group=8,residual=8", "streaming:window=64", "h2o:1.0"])
def test_lossless_settings_reproduce_plain_greedy_in_transformers_generate(llama, spec):
    prompt = IDS[None, :12]
    with torch.inference_mode():
        plain = llama.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
        got = llama.generate(prompt, past_key_values=make_cache(spec, llama), max_new_tokens=12, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
    assert torch.equal(got, plain)


def test_cache_specs():
    assert parse_cache_spec("kivi:2")[1] == {"bits": 2}
    assert parse_cache_spec("streaming:window=64,sinks=2")[1] == {"window": 64, "sinks": 2}
    assert parse_cache_spec("h2o:0.1")[1] == {"ratio": 0.1}
    for bad, msg in [("lru:4", "unknown KV cache"), ("kivi:bitz=2", "unknown parameter"), ("h2o:half", "not a float")]:
        with pytest.raises(UserError, match=msg):
            parse_cache_spec(bad)


def test_long_context_perplexity_matches_one_window(llama):
    ref = perplexity(llama, IDS[None])
    for chunk in (7, 64):
        got = long_context_perplexity(llama, IDS, chunk=chunk)
        assert got.tokens == len(IDS) - 1
        assert math.isclose(got.perplexity, ref.perplexity, rel_tol=1e-5)
    bins = got.by_position(20)
    assert [p for p, _ in bins] == [1, 21, 41]
    nll = F.cross_entropy(full_logits(llama, IDS)[:20].float(), IDS[1:21]).item()
    assert math.isclose(bins[0][1], math.exp(nll), rel_tol=1e-5)
    squeezed = long_context_perplexity(llama, IDS, lambda: StreamingCache(llama, window=8, sinks=1), chunk=4)
    assert squeezed.peak_cache_bytes < got.peak_cache_bytes
    with pytest.raises(UserError):
        long_context_perplexity(llama, IDS[:1])
