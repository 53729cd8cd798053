"""rotate: the structured Q is orthogonal, rotating keeps the float model's function, and it helps RTN with outliers."""

import pytest
import torch
import transformers
from torch import nn

from effspec.errors import UserError
from effspec.layers import QuantLinear
from effspec.models import load_model, save_model
from effspec.registry import get_step
from effspec.steps.quantize.rotate import RotateConfig, RotatedInput, RotatedNorm, Rotation, sylvester_hadamard

IDS = torch.randint(0, 257, (4, 64), generator=torch.Generator().manual_seed(1))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def tiny(name="tiny-llama", tied=True, outliers=(), factor=20.0):
    """A tiny model with non-trivial norm scales (their init is all ones) and optional outlier residual channels.

    Outliers: the embeddings and every norm scale are `factor` times larger on
    those channels, so the residual stream carries a few large channels and the
    layers reading them large weight columns once the scales are folded in.
    """
    model = load_model(name).model
    if not tied:
        model.config.tie_word_embeddings = False
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
                p[list(outliers)] *= factor
        model.get_input_embeddings().weight[:, list(outliers)] *= factor
    return model


def maxdiff(a, b):
    return (a.double() - b.double()).abs().max().item()


def rotate(model, **cfg):
    return get_step("rotate").apply(model, RotateConfig(**cfg))


# ---- the structured orthogonal matrix ------------------------------------------------------------
@pytest.mark.parametrize("dim,m", [(1, 1), (12, 3), (64, 1), (96, 3), (576, 9)])
def test_rotation_is_orthogonal_and_the_fast_op_equals_the_dense_matrix(dim, m):
    R = Rotation.random(dim, torch.Generator().manual_seed(0))
    assert R.m == m and R.n == dim // m
    Q = R.matrix()
    assert maxdiff(Q @ Q.t(), torch.eye(dim, dtype=torch.float64)) < 1e-6
    x = torch.randn(3, 5, dim, generator=torch.Generator().manual_seed(1))
    assert maxdiff(R(x), x.double() @ Q) < 1e-5
    assert maxdiff(R(x, transpose=True), x.double() @ Q.t()) < 1e-5
    # Q = D (H_n (x) R_m) / sqrt(n), built independently of the factored op
    D = torch.diag(R.signs.double())
    expected = D @ torch.kron(sylvester_hadamard(R.n), R.R.double()) / R.n**0.5
    assert maxdiff(Q, expected) < 1e-12


def test_sylvester_hadamard_and_seeding():
    H = sylvester_hadamard(16)
    assert set(H.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(H @ H.t(), 16 * torch.eye(16, dtype=torch.float64))
    a, b, c = (Rotation.random(576, torch.Generator().manual_seed(s)).matrix() for s in (0, 0, 1))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert (Rotation.random(64, torch.Generator().manual_seed(0)).matrix().abs() - 1 / 8).abs().max() < 1e-12


# ---- the step on tiny models ----------------------------------------------------------------------
@pytest.mark.parametrize("name,tied", [("tiny-llama", True), ("tiny-llama", False), ("tiny-qwen2", True)])
def test_rotation_leaves_the_float_model_unchanged(name, tied):
    model = tiny(name, tied)
    before = logits(model)
    emb = model.get_input_embeddings().weight.detach().clone()
    rotate(model)
    assert (logits(model) - before).abs().max() < 1e-4
    assert not torch.allclose(model.get_input_embeddings().weight, emb, atol=1e-2)  # the basis really changed
    downs = [m for n, m in model.named_modules() if n.endswith("mlp.down_proj")]
    assert len(downs) == 2 and all(isinstance(m, RotatedInput) for m in downs)
    head, final = model.get_output_embeddings(), model.model.norm
    assert (head.weight is model.get_input_embeddings().weight) == tied
    assert isinstance(final, RotatedNorm) == tied  # tied: the final norm runs unrotated; untied: folded into the head
    folded = [m.weight for n, m in model.named_modules() if n.endswith("layernorm")]
    assert folded and all(torch.equal(w, torch.ones_like(w)) for w in folded)


@pytest.mark.parametrize("residual,down_proj", [(True, False), (False, True)])
def test_each_part_alone_also_keeps_the_function(residual, down_proj):
    model = tiny()
    before = logits(model)
    rotate(model, residual=residual, down_proj=down_proj)
    assert (logits(model) - before).abs().max() < 1e-4
    assert isinstance(model.model.layers[0].mlp.down_proj, RotatedInput) == down_proj
    assert isinstance(model.model.norm, RotatedNorm) == residual


def test_rotation_then_rtn_w3_beats_rtn_alone_with_outlier_channels():
    reference = logits(tiny(outliers=(3, 17, 40)))
    rtn = get_step("rtn")

    def error(model):
        return (logits(model) - reference).pow(2).mean().item()

    plain = error(rtn.apply(tiny(outliers=(3, 17, 40)), rtn.config(bits=3, group_size=64)))
    for seed in (0, 1, 2):
        rotated = error(rtn.apply(rotate(tiny(outliers=(3, 17, 40)), seed=seed), rtn.config(bits=3, group_size=64)))
        assert rotated < 0.5 * plain, (seed, rotated, plain)


def test_rotate_then_gptq_quantizes_every_layer_including_the_rotated_ones():
    gptq = get_step("gptq")
    model = gptq.apply(rotate(tiny()), gptq.config(bits=4, group_size=32), IDS[:2, :32])
    down = model.model.layers[0].mlp.down_proj
    assert isinstance(down, RotatedInput) and isinstance(down.linear, QuantLinear)
    assert not [n for n, m in model.named_modules() if type(m) is nn.Linear and n != "lm_head"]
    reference = logits(tiny())
    out = logits(model)
    assert 10 * torch.log10(reference.var() / (out - reference).var()) > 15  # dB


@pytest.mark.parametrize("quantize,tied", [(False, True), (True, True), (True, False)])
def test_save_and_load_give_identical_logits(tmp_path, quantize, tied):
    loaded = load_model("tiny-llama")
    model = rotate(tiny(tied=tied))
    if quantize:
        model = get_step("rtn").apply(model, get_step("rtn").config(bits=3, group_size=32))
    save_model(model, loaded.tokenizer, tmp_path, {})
    again = load_model(str(tmp_path)).model
    assert isinstance(again.model.layers[1].mlp.down_proj, RotatedInput)
    assert isinstance(again.model.layers[1].mlp.down_proj.linear, QuantLinear) == quantize
    assert isinstance(again.model.norm, RotatedNorm) == tied
    assert (again.get_output_embeddings().weight is again.get_input_embeddings().weight) == tied
    assert torch.equal(logits(again), logits(model))


# ---- refusals -----------------------------------------------------------------------------------------
def test_layernorm_models_and_already_quantized_models_are_refused():
    cfg = transformers.OPTConfig(vocab_size=257, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                 num_attention_heads=4, word_embed_proj_dim=64, max_position_embeddings=128)
    with pytest.raises(UserError, match="not an RMSNorm"):
        rotate(transformers.AutoModelForCausalLM.from_config(cfg))
    quantized = get_step("rtn").apply(tiny(), get_step("rtn").config(bits=4, group_size=32))
    with pytest.raises(UserError, match="before quantization"):
        rotate(quantized)


@pytest.mark.parametrize("field,value", [("seed", -1), ("residual", False)])
def test_impossible_configs_name_the_field(field, value):
    kwargs = {field: value, **({"down_proj": False} if field == "residual" else {})}
    with pytest.raises(ValueError, match=field):
        RotateConfig(**kwargs)
