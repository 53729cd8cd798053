"""effspec.generate: the filters against plain references, greedy against transformers' generate, seeded
sampling, stop strings, batches against one prompt at a time, a caller's cache."""

import pytest
import torch
import transformers
from transformers import DynamicCache

from effspec.generate import (SamplingConfig, TextStream, generate, generate_batch, greedy, probabilities,
                              top_k_filter, top_p_filter)
from effspec.models import byte_tokenizer, load_model

PROMPT = torch.randint(0, 256, (11,), generator=torch.Generator().manual_seed(0))
PROMPTS = [torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n)) for n in (4, 13, 9)]
ENGINES = ["lean", "transformers"]


def letters(ids: list[int]) -> str:
    """One character per token, so text positions are token positions."""
    return "".join(chr(0x100 + i) for i in ids)


def untied(config_name: str, **shape):
    """A random seeded model over the byte vocabulary with its own head and 10x the default weight scale. The
    builtin tiny models tie the head to the embeddings, so their greedy output mostly repeats the last token;
    these make varied choices, with logit gaps well above float rounding."""
    shape = shape or dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2)
    cfg = getattr(transformers, config_name)(vocab_size=257, tie_word_embeddings=False, eos_token_id=256,
                                             pad_token_id=256, bos_token_id=256, initializer_range=0.2, **shape)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tiny():
    """Lean-engine models (Llama, Qwen2) and one only transformers runs (GPT-2: learned positions)."""
    models = {name: load_model(name).model for name in ("tiny-llama", "tiny-qwen2")}
    models["untied-llama"] = untied("LlamaConfig")
    models["untied-qwen2"] = untied("Qwen2Config")
    models["gpt2"] = untied("GPT2Config", n_embd=64, n_layer=2, n_head=4)
    return models


LEAN = ["tiny-llama", "tiny-qwen2", "untied-llama", "untied-qwen2"]


# ---- the filters, against references written the obvious way -----------------------------------
def test_top_k_keeps_the_k_largest_of_each_row():
    logits = torch.randn(5, 30, generator=torch.Generator().manual_seed(1))
    for k in (1, 3, 29):
        kept = top_k_filter(logits, k).isfinite()
        for row, mask in zip(logits, kept):
            expected = set(sorted(range(30), key=lambda i: -row[i].item())[:k])
            assert set(mask.nonzero().flatten().tolist()) == expected
    assert torch.equal(top_k_filter(logits, 0), logits) and torch.equal(top_k_filter(logits, 30), logits)


@pytest.mark.parametrize("p", [0.05, 0.3, 0.75, 0.95, 0.999])
def test_top_p_keeps_the_smallest_set_whose_mass_reaches_p(p):
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(2)) * 2
    kept = top_p_filter(logits, p).isfinite()
    for row, mask in zip(logits.double().softmax(-1), kept):
        order = sorted(range(40), key=lambda i: -row[i].item())
        mass, expected = 0.0, set()
        for i in order:
            expected.add(i)
            mass += row[i].item()
            if mass >= p:
                break
        assert set(mask.nonzero().flatten().tolist()) == expected
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def test_probabilities_are_the_filtered_renormalized_softmax():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(3))
    T = 0.7
    assert torch.allclose(probabilities(logits, SamplingConfig(temperature=T)), (logits / T).softmax(-1))
    got = probabilities(logits, SamplingConfig(temperature=T, top_k=10, top_p=0.8))
    for row, probs in zip(logits, got):
        full = (row / T).softmax(-1)
        top10 = full.topk(10).indices
        within = torch.zeros(50).index_fill(0, top10, 1) * full
        within /= within.sum()  # top-k first, then the nucleus of what is left, as transformers' warpers
        order = within.argsort(descending=True)
        n = int((within[order].cumsum(0) < 0.8).sum()) + 1
        expected = torch.zeros(50).index_fill(0, order[:n], 1) * within
        assert torch.allclose(probs, expected / expected.sum(), atol=1e-6)
    greedy_probs = probabilities(logits, SamplingConfig())
    assert torch.equal(greedy_probs, torch.nn.functional.one_hot(logits.argmax(-1), 50).float())


@pytest.mark.parametrize("field, value", [("temperature", -0.1), ("temperature", float("inf")), ("top_k", -1),
                                          ("top_p", 0.0), ("top_p", 1.5), ("stop", ("",)), ("stop", "abc")])
def test_bad_configs_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field}="):
        SamplingConfig(**{field: value})


# ---- the loop --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, engine", [(n, e) for n in LEAN for e in ENGINES] + [("gpt2", "auto")])
def test_greedy_equals_transformers_generate(tiny, name, engine):
    model, eos = tiny[name], 256  # transformers stops at the config's eos: so do we
    expected = model.generate(PROMPT[None], attention_mask=torch.ones(1, PROMPT.numel(), dtype=torch.long),
                              do_sample=False, max_new_tokens=30)[0, PROMPT.numel():]
    assert torch.equal(generate(model, PROMPT, 30, eos_token_id=eos, engine=engine).tokens, expected)
    assert torch.equal(greedy(model, PROMPT, 30, eos, engine=engine).tokens, expected)
    # the general loop (taken with a callback) makes the same choices as the tight greedy one
    seen = []
    assert torch.equal(generate(model, PROMPT, 30, eos_token_id=eos, engine=engine, on_token=seen.append).tokens,
                       expected)
    assert seen == expected.tolist()


@pytest.mark.parametrize("name, engine", [("untied-llama", "lean"), ("untied-llama", "transformers"), ("gpt2", "auto")])
def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(tiny, name, engine):
    model = tiny[name]
    config = SamplingConfig(temperature=1.0, top_p=0.95, seed=7)
    a = generate(model, PROMPT, 40, config, engine=engine).tokens
    assert torch.equal(generate(model, PROMPT, 40, config, engine=engine).tokens, a)
    other = generate(model, PROMPT, 40, SamplingConfig(temperature=1.0, top_p=0.95, seed=8), engine=engine).tokens
    assert not torch.equal(other, a)
    plain = greedy(model, PROMPT, 40, engine=engine).tokens
    assert not torch.equal(a, plain)  # sampling at temperature 1 really samples
    top1 = generate(model, PROMPT, 40, SamplingConfig(temperature=1.5, top_k=1, seed=0), engine=engine).tokens
    assert torch.equal(top1, plain)


def test_lean_and_transformers_engines_sample_the_same_tokens(tiny):
    model = tiny["untied-qwen2"]
    config = SamplingConfig(temperature=0.8, top_k=40, seed=3)
    assert torch.equal(generate(model, PROMPT, 25, config, engine="lean").tokens,
                       generate(model, PROMPT, 25, config, engine="transformers").tokens)


@pytest.mark.parametrize("engine", ENGINES)
def test_stop_strings_end_generation_and_cut_the_text(tiny, engine):
    model = tiny["untied-llama"]
    plain = greedy(model, PROMPT, 40, engine=engine).tokens.tolist()
    full = letters(plain)
    stop = full[6:8]
    at = full.index(stop)
    gen = generate(model, PROMPT, 40, SamplingConfig(stop=("never", stop)), decode=letters, engine=engine)
    assert gen.text == full[:at]
    assert gen.tokens.tolist() == plain[: at + 2]  # through the token that completed the stop string
    assert generate(model, PROMPT, 40, decode=letters, engine=engine).text == full
    with pytest.raises(ValueError, match="decode"):
        generate(model, PROMPT, 5, SamplingConfig(stop=("x",)), engine=engine)


@pytest.mark.parametrize("engine", ENGINES)
def test_eos_ends_generation_and_is_kept(tiny, engine):
    model = tiny["untied-llama"]
    plain = greedy(model, PROMPT, 30, engine=engine).tokens.tolist()
    eos = plain[9]
    got = generate(model, PROMPT, 30, SamplingConfig(temperature=0.5, top_k=1), eos_token_id=eos, engine=engine)
    assert got.tokens.tolist() == plain[: plain.index(eos) + 1]


def test_text_stream_shows_a_prefix_and_never_the_stop_string():
    tok = byte_tokenizer()
    ids = tok("héllo wörld STOP and more", add_special_tokens=False)["input_ids"]

    def decode(t):
        return tok.decode(t)

    stream = TextStream(decode, ("STOP", "xyz"))
    shown = ""
    for i in ids:
        delta = stream.push(i)
        shown += delta
        assert "\ufffd" not in delta and "S" not in shown
        assert "héllo wörld ".startswith(shown)
    assert shown == "héllo wörld "
    assert shown + stream.rest("héllo wörld ") == "héllo wörld "


# ---- batches and caches ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", [*LEAN, "gpt2"])
def test_batch_greedy_equals_one_prompt_at_a_time(tiny, name):
    model = tiny[name]
    singles = [greedy(model, p, 20, engine="transformers").tokens for p in PROMPTS]
    batch = generate_batch(model, PROMPTS, 20)
    assert all(torch.equal(b.tokens, s) for b, s in zip(batch, singles))
    eos = singles[1][5].item()  # the middle row meets it early; each row stops on its own
    singles = [greedy(model, p, 20, eos, engine="transformers").tokens for p in PROMPTS]
    batch = generate_batch(model, PROMPTS, 20, eos_token_id=eos)
    assert [b.tokens.tolist() for b in batch] == [s.tolist() for s in singles]
    assert batch[1].tokens.numel() <= 6


def test_batch_stop_strings_per_row(tiny):
    model = tiny["untied-llama"]
    full = [letters(greedy(model, p, 20).tokens.tolist()) for p in PROMPTS]
    stop = full[0][3:5]
    batch = generate_batch(model, PROMPTS, 20, SamplingConfig(stop=(stop,)), decode=letters)
    assert [b.text for b in batch] == [f[: f.index(stop)] if stop in f else f for f in full]


class CountingCache(DynamicCache):
    """A stand-in for a compressed cache: reports its own held bytes."""

    def held_bytes(self) -> int:
        return 4242


def test_a_given_cache_is_used_and_reports_its_held_bytes(tiny):
    model = tiny["untied-llama"]
    plain = greedy(model, PROMPT, 12)
    cache = DynamicCache(config=model.config)
    gen = generate(model, PROMPT, 12, cache=cache)
    assert torch.equal(gen.tokens, plain.tokens)
    assert cache.get_seq_length() == PROMPT.numel() + 11  # the loop filled the cache it was given
    assert gen.cache_bytes == plain.cache_bytes
    counted = generate(model, PROMPT, 12, cache=CountingCache(config=model.config))
    assert counted.cache_bytes == 4242 and torch.equal(counted.tokens, plain.tokens)
    with pytest.raises(ValueError, match="lean"):
        generate(model, PROMPT, 12, cache=DynamicCache(config=model.config), engine="lean")
