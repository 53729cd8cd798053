"""drop-layers: block influence against a reference here, and a really smaller model that saves and reloads."""

import pytest
import torch

from effspec import decoder
from effspec.errors import UserError
from effspec.generate import greedy
from effspec.models import load_model
from effspec.registry import get_step
from effspec.steps.prune.drop_layers import block_influence

CALIB = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(0))


def four_blocks(name="tiny-llama"):
    """tiny model with 4 blocks: the builtin's 2 blocks plus copies with rescaled weights (different influence)."""
    import copy

    model = load_model(name).model
    extra = [copy.deepcopy(model.model.layers[i % 2]) for i in range(2)]
    with torch.no_grad():
        for k, block in enumerate(extra):
            for p in block.parameters():
                if p.dim() == 2:
                    p.mul_(0.2 + 2.0 * k)  # block 2 nearly an identity on the residual, block 3 a strong one
    model.model.layers.extend(extra)
    model.config.num_hidden_layers = 4
    if getattr(model.config, "layer_types", None) is not None:
        model.config.layer_types = model.config.layer_types + model.config.layer_types[:2]
    for j, block in enumerate(model.model.layers):
        block.self_attn.layer_idx = j
    return model


def test_block_influence_is_one_minus_mean_cosine():
    model = four_blocks()
    bi = block_influence(model, CALIB)
    with torch.no_grad():  # reference from hidden states: input of block i is hidden_states[i]
        ref = []
        outs = [model(ids[None], output_hidden_states=True).hidden_states for ids in CALIB]
        for i in range(3):  # the last entry is after the final norm, so the last block is left out here
            cos = torch.cat([torch.nn.functional.cosine_similarity(h[i][0], h[i + 1][0], dim=-1) for h in outs])
            ref.append(1 - cos.mean().item())
    assert bi[:3] == pytest.approx(ref, abs=1e-5)
    assert bi[2] < bi[3]  # the damped block changes the stream least


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
@pytest.mark.parametrize("metric", ["bi", "perplexity", "last"])
def test_dropping_leaves_a_smaller_model_that_saves_reloads_and_decodes(name, metric, reloads_same):
    model = four_blocks(name)
    lm = load_model(name)
    step = get_step("drop-layers")
    params = sum(p.numel() for p in model.parameters())
    model = step.apply(model, step.config(n=2, metric=metric), CALIB)
    assert len(model.model.layers) == 2 and model.config.num_hidden_layers == 2
    assert [b.self_attn.layer_idx for b in model.model.layers] == [0, 1]
    assert sum(p.numel() for p in model.parameters()) < params
    back = reloads_same(model, lm.tokenizer, CALIB[:1], atol=1e-5)
    assert len(back.model.layers) == 2
    a = greedy(back, CALIB[0], 5, engine="transformers")  # cache indices must match the new block count
    b = greedy(back, CALIB[0], 5, engine="lean")
    assert decoder.supported(back) and torch.equal(a.tokens, b.tokens)


def test_drop_layers_last_keeps_the_first_blocks_and_their_logits():
    """metric last: what is left is the model's first blocks, computing exactly what those blocks computed."""
    model = four_blocks()
    blocks = model.model.layers
    first_two = list(blocks[:2])
    with torch.inference_mode():
        model.model.layers = blocks[:2]  # the reference: the same model cut by hand
        cut = model(CALIB[:1]).logits
        model.model.layers = blocks
    step = get_step("drop-layers")
    model = step.apply(model, step.config(n=2, metric="last"), None)  # needs no calibration
    assert list(model.model.layers) == first_two
    with torch.inference_mode():
        torch.testing.assert_close(model(CALIB[:1]).logits, cut)


def test_drop_layers_keeps_block_zero_and_refuses_too_many():
    model = four_blocks()
    step = get_step("drop-layers")
    with pytest.raises(UserError, match="at most 2 can go"):
        step.apply(model, step.config(n=3), CALIB)
    first = model.model.layers[0]
    model = step.apply(model, step.config(n=2), CALIB)
    assert model.model.layers[0] is first
