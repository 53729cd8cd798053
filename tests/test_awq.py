"""AWQ against straightforward references written from the paper, and against round-to-nearest."""

import pytest
import torch
import transformers

from effspec.config import ConfigError
from effspec.fsutil import atomic_dir
from effspec.layers import QuantLinear
from effspec.models import load_model, save_model
from effspec.quant import Grid, dequantize, grid_params, quantize
from effspec.recipe import load_recipe
from effspec.registry import get_step
from effspec.steps.quantize.awq import AWQConfig, gram_error, search_clip, search_scale

CALIB = torch.randint(0, 257, (4, 64), generator=torch.Generator().manual_seed(0))
HELD_OUT = torch.randint(0, 257, (2, 64), generator=torch.Generator().manual_seed(1))


def rtn(W, grid, group):
    s, m = grid_params(W, grid, group)
    return dequantize(quantize(W, s, m, grid), s, m)


def outlier_inputs(tokens=2048, n_in=128, seed=0):
    """(tokens, in) activations where a few input channels are 20x larger, as in LLMs (AWQ Sec. 3.1)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, n_in, generator=g)
    X[:, [3, 17, 40, 60]] *= 20
    return X


def mha_llama():
    """A tiny Llama without grouped-query attention, so v_proj -> o_proj can take scales too."""
    cfg = transformers.LlamaConfig(vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def with_outlier_channels(model):
    """Make a few hidden channels 10x larger at every norm's output, as trained LLMs have (AWQ Sec. 3.1)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):
                p[[1, 7, 30]] *= 10
    return model


@pytest.mark.parametrize("build", [lambda: load_model("tiny-llama").model, lambda: load_model("tiny-qwen2").model,
                                   mha_llama], ids=["llama-gqa", "qwen2-bias", "llama-mha"])
def test_scaling_alone_leaves_the_float_model_unchanged(build):
    model = with_outlier_channels(build())  # so that every search picks alpha > 0
    before = logits(model, HELD_OUT)
    norms = {n: p.clone() for n, p in model.named_parameters() if "norm" in n or "o_proj.weight" in n}
    up = model.model.layers[0].mlp.up_proj.weight.clone()
    model = get_step("awq").apply(model, AWQConfig(quantize=False, clip=False), CALIB)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    # the scales went somewhere: both norms before q/k/v and gate/up, and up_proj's rows before down_proj
    changed = {n for n, p in model.named_parameters() if n in norms and not torch.equal(p, norms[n])}
    assert {f"model.layers.{i}.{n}.weight" for i in (0, 1) for n in ("input_layernorm", "post_attention_layernorm")} <= changed
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, up)
    # o_proj is scaled (into v_proj) only without grouped-query attention, as in the reference code
    assert ("model.layers.0.self_attn.o_proj.weight" in changed) == (build is mha_llama)
    assert torch.allclose(logits(model, HELD_OUT), before, atol=1e-5, rtol=0)


def test_an_input_read_by_an_untargeted_layer_is_left_unscaled():
    model = with_outlier_channels(load_model("tiny-llama").model)
    before = logits(model, HELD_OUT)
    norm = model.model.layers[0].input_layernorm.weight.clone()
    post = model.model.layers[0].post_attention_layernorm.weight.clone()
    cfg = AWQConfig(quantize=False, clip=False, ignore=("lm_head", "*k_proj"))  # k_proj also reads q/v's input
    model = get_step("awq").apply(model, cfg, CALIB)
    assert torch.equal(model.model.layers[0].input_layernorm.weight, norm)
    assert not torch.equal(model.model.layers[0].post_attention_layernorm.weight, post)  # gate/up still scaled
    assert torch.allclose(logits(model, HELD_OUT), before, atol=1e-5, rtol=0)


def reference_scale_search(W, X, grid, group, n_grid=20):
    """Eq. 4-5 written out: for each alpha, s = mean|x|^alpha (normalised), error of the layer's real output."""
    x_mean = X.abs().mean(0)
    best = (float("inf"), None)
    for k in range(n_grid):
        s = x_mean.pow(k / n_grid).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        W_hat = rtn(W * s, grid, group) / s
        err = (X @ W_hat.t() - X @ W.t()).pow(2).mean().item()
        if err < best[0]:
            best = (err, s)
    return best


@pytest.mark.parametrize("bits,group,symmetric", [(4, 32, False), (3, 64, True)])
def test_scale_search_matches_the_reference_and_beats_rtn(bits, group, symmetric):
    torch.manual_seed(0)
    W = torch.randn(48, 128)
    X = outlier_inputs()
    grid = Grid(bits, group, symmetric)
    ref_err, ref_s = reference_scale_search(W, X, grid, group)
    s, alpha = search_scale(W, X.abs().mean(0), gram_error(W, X.t() @ X / X.shape[0]), grid, group, 20)
    assert torch.allclose(s, ref_s) and 0 < alpha < 1
    out_error = lambda Wq: (X @ (Wq - W).t()).pow(2).mean().item()  # noqa: E731
    assert out_error(rtn(W * s, grid, group) / s) == pytest.approx(ref_err, rel=1e-4)
    assert ref_err < 0.8 * out_error(rtn(W, grid, group))


def test_clip_search_matches_a_per_group_reference():
    torch.manual_seed(1)
    W = torch.randn(16, 64)
    W[:, 5] *= 6  # a few large weights make clipping worthwhile
    X = outlier_inputs(512, 64, seed=2)
    grid, group, n_grid = Grid(3, 32, False), 32, 20
    clip = search_clip(W, X.t() @ X / X.shape[0], grid, group, n_grid, 0.5)
    # reference: for each row and group, the shrink whose rounded group has the least output error on X
    w_max = W.reshape(16, 2, 32).abs().amax(-1)
    expected = torch.empty_like(w_max)
    for o in range(16):
        for g in range(2):
            cols = slice(g * group, (g + 1) * group)
            errs = []
            for i in range(10):
                c = w_max[o, g] * (1 - i / n_grid)
                wq = rtn(W[o:o + 1, cols].clamp(-c, c), grid, group)
                errs.append(((X[:, cols] @ (wq - W[o:o + 1, cols]).t()) ** 2).mean().item())
            expected[o, g] = w_max[o, g] * (1 - min(range(10), key=errs.__getitem__) / n_grid)
    assert torch.allclose(clip, expected)
    assert (clip < w_max).any()  # clipping was chosen somewhere


def test_awq_beats_rtn_on_a_tiny_model_at_3_bits():
    base = logits(with_outlier_channels(load_model("tiny-llama").model), HELD_OUT)
    errors = {}
    for name in ("awq", "rtn"):
        step = get_step(name)
        cfg = step.config(bits=3, group_size=32, symmetric=False)
        model = step.apply(with_outlier_channels(load_model("tiny-llama").model), cfg, CALIB if name == "awq" else None)
        assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14
        errors[name] = (logits(model, HELD_OUT) - base).pow(2).mean().item()
    assert errors["awq"] < 0.7 * errors["rtn"], errors


@pytest.mark.parametrize("recipe", ["awq-gptq-w4-g64", "awq-gptq-w3-g64"])
def test_awq_then_gptq_recipe_runs(recipe):
    r = load_recipe(recipe)
    assert [name for name, _ in r.steps] == ["awq", "gptq"] and r.steps[0][1].quantize is False
    assert r.steps[0][1].grid == r.steps[1][1].grid
    model = load_model("tiny-llama").model
    base = logits(model, HELD_OUT)
    model = get_step("awq").apply(model, r.steps[0][1], CALIB)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())  # awq left the rounding to gptq
    model = get_step("gptq").apply(model, r.steps[1][1], CALIB)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 14 and all(m.grid == r.steps[1][1].grid for m in layers)
    after = logits(model, HELD_OUT)
    assert 10 * torch.log10(base.var() / (after - base).var()) > 10


@pytest.mark.parametrize("recipe,bits", [("awq-w4-g64", 4), ("awq-w3-g64", 3)])
def test_awq_recipes(recipe, bits):
    (name, cfg), = load_recipe(recipe).steps
    assert name == "awq" and cfg == AWQConfig(bits=bits)


def test_save_load_round_trip_keeps_logits(tmp_path):
    loaded = load_model("tiny-qwen2")
    model = get_step("awq").apply(loaded.model, AWQConfig(bits=3, group_size=32), CALIB)
    with atomic_dir(tmp_path / "m") as tmp:
        save_model(model, loaded.tokenizer, tmp, {"recipe": "awq"})
    again = load_model(str(tmp_path / "m"))
    assert isinstance(again.model.get_submodule("model.layers.1.mlp.down_proj"), QuantLinear)
    assert torch.equal(logits(again.model, HELD_OUT), logits(model, HELD_OUT))


@pytest.mark.parametrize("field,value", [("bits", 5), ("n_grid", 0), ("max_shrink", 1.0)])
def test_impossible_configs_name_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        AWQConfig(**{field: value})
