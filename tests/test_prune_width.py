"""prune-width: importance against a reference here, matching shapes, and a smaller model that round-trips."""

import pytest
import torch

from effspec.errors import UserError
from effspec.generate import greedy
from effspec.models import load_model
from effspec.registry import get_step
from effspec.steps.prune.prune_width import importance

CALIB = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(0))


def test_importance_is_the_l2_norm_of_down_proj_and_o_proj_inputs():
    model = load_model("tiny-llama").model
    ffn, att = importance(model, CALIB)
    block = model.model.layers[1]
    seen = {}
    h1 = block.mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.setdefault("down", []).append(a[0]))
    h2 = block.self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen.setdefault("o", []).append(a[0]))
    with torch.no_grad():
        for ids in CALIB:
            model(ids[None])
    h1.remove(), h2.remove()
    down = torch.cat([x[0] for x in seen["down"]])
    o = torch.cat([x[0] for x in seen["o"]]).view(-1, 4, 16)
    assert torch.allclose(ffn[1].float(), down.norm(dim=0), rtol=1e-4)
    assert torch.allclose(att[1].float(), o.pow(2).sum((0, 2)).sqrt(), rtol=1e-4)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_pruned_model_has_consistent_smaller_shapes_and_round_trips(name, reloads_same):
    lm = load_model(name)
    model = lm.model
    step = get_step("prune-width")
    before = sum(p.numel() for b in model.model.layers for p in b.parameters())
    model = step.apply(model, step.config(ratio=0.3, heads_per_group=1), CALIB)
    after = sum(p.numel() for b in model.model.layers for p in b.parameters())
    assert after < 0.75 * before
    cfg = model.config
    assert cfg.num_attention_heads == 2 and cfg.head_dim == 16  # 4 heads in 2 groups, one removed from each
    for b in model.model.layers:
        a, m = b.self_attn, b.mlp
        assert a.q_proj.out_features == a.o_proj.in_features == 32
        assert a.k_proj.out_features == a.v_proj.out_features == 32  # key/value heads whole
        assert m.gate_proj.out_features == m.up_proj.out_features == m.down_proj.in_features == cfg.intermediate_size
    back = reloads_same(model, lm.tokenizer, CALIB[:1], atol=1e-5)
    assert torch.equal(greedy(back, CALIB[0], 5, engine="lean").tokens, greedy(back, CALIB[0], 5, engine="transformers").tokens)


def test_removing_the_least_important_channels_hurts_least():
    """The activation criterion orders channels: dropping the lowest changes logits less than the highest."""
    base = load_model("tiny-llama").model
    ffn, _ = importance(base, CALIB)
    with torch.no_grad():
        ref = base(CALIB).logits
        errs = []
        for pick in (torch.argsort(ffn[0])[:16], torch.argsort(ffn[0])[-16:]):
            model = load_model("tiny-llama").model
            model.model.layers[0].mlp.down_proj.weight[:, pick] = 0
            errs.append((model(CALIB).logits - ref).pow(2).mean().item())
    assert errs[0] < errs[1]


def test_bad_width_configs():
    step = get_step("prune-width")
    with pytest.raises(UserError, match="empty groups"):
        step.apply(load_model("tiny-llama").model, step.config(ratio=0.2, heads_per_group=2), CALIB)
    with pytest.raises(ValueError, match="ratio"):
        step.config(ratio=0.95)


def test_kept_ffn_channels_are_rounded_to_the_multiple():
    """20% of smollm2-135m's block parameters is 1,126 of 1,536 channels kept; rounded to 16 it is 1,120, so the rows
    of down_proj are whole cache lines. `channel_multiple: 1` keeps the exact count."""
    from types import SimpleNamespace

    from torch import nn

    from effspec.steps.prune.prune_width import PruneWidthConfig, plan

    def layer(i, o):
        return nn.Linear(i, o, bias=False, device="meta")

    attn = SimpleNamespace(head_dim=64, q_proj=layer(576, 576))
    block = nn.Module()
    block.attn = nn.ModuleList([layer(576, 576), layer(576, 192), layer(576, 192), layer(576, 576)])
    block.mlp = nn.ModuleList([layer(576, 1536), layer(576, 1536), layer(1536, 576)])
    block.self_attn, block.mlp.down_proj = attn, block.mlp[2]
    model = SimpleNamespace(config=SimpleNamespace(num_key_value_heads=3, num_attention_heads=9),
                            model=SimpleNamespace(layers=[block]))
    assert plan(model, PruneWidthConfig(ratio=0.2)) == (3, 1120)
    assert plan(model, PruneWidthConfig(ratio=0.2, channel_multiple=1)) == (3, 1126)
    assert plan(model, PruneWidthConfig(ratio=0.2, channel_multiple=64)) == (3, 1152)
