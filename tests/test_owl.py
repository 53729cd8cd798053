"""OWL layer-wise sparsity: the allocation rule, the outlier ratios against a plain hooked pass, and both steps."""

import pytest
import torch

from effspec.config import ConfigError
from effspec.models import load_model
from effspec.owl import allocate, block_outlier_ratios, outlier_ratio
from effspec.registry import get_step
from effspec.sparsity import SparseLinear
from effspec.steps.prune.sparsegpt import SparseGPTConfig
from effspec.steps.prune.wanda import WandaConfig
from effspec.surgery import linear_layers

CALIB = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))


def test_outlier_ratio_by_hand():
    a, b = torch.tensor([1.0, 1.0, 1.0, 13.0]), torch.tensor([[2.0, 2.0]])
    assert outlier_ratio([a, b], 2.0) == pytest.approx(1 / 6)  # mean 20 / 6: only 13 > 6.67
    assert outlier_ratio([a, b], 0.5) == pytest.approx(0.5)  # above 1.67: 13, 2 and 2
    assert outlier_ratio([torch.ones(5)], 1.0) == 0.0


def test_allocate_spans_lambda_keeps_the_mean_and_spares_outlier_blocks():
    ratios = [0.01, 0.05, 0.02, 0.03]
    s = allocate(ratios, 0.6, 0.08)
    assert sum(s) / len(s) == pytest.approx(0.6)
    assert max(s) - min(s) == pytest.approx(0.16)
    assert sorted(range(4), key=lambda i: s[i]) == sorted(range(4), key=lambda i: -ratios[i])  # more outliers, less pruned
    assert allocate([0.02] * 3, 0.5, 0.08) == [0.5] * 3  # no spread: uniform


def _reference_ratios(model, m):
    """Each block's outlier ratio from one dense forward of CALIB with hooks on every linear layer."""
    sq, count = {}, {}
    targets = linear_layers(model, ("*",), ("lm_head",))

    def hook(name):
        def add(mod, inputs, out):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            sq[name] = sq.get(name, 0) + (x**2).sum(0)
            count[name] = count.get(name, 0) + x.shape[0]
        return add

    hooks = [model.get_submodule(n).register_forward_hook(hook(n)) for n in targets]
    with torch.no_grad():
        for row in CALIB:
            model(row[None])
    for h in hooks:
        h.remove()
    ratios = {}
    for i in range(model.config.num_hidden_layers):
        block = f"model.layers.{i}."
        scores = [model.get_submodule(n).weight.abs() * (sq[n] / count[n]).sqrt()[None, :]
                  for n in targets if n.startswith(block)]
        flat = torch.cat([s.flatten() for s in scores])
        ratios[block[:-1]] = float((flat > m * flat.mean()).float().mean())
    return ratios


def test_block_outlier_ratios_match_a_plain_hooked_pass():
    model = load_model("tiny-llama").model
    want = _reference_ratios(model, 3.0)
    got = block_outlier_ratios(model, CALIB, linear_layers(model, ("*",), ("lm_head",)), 3.0)
    assert got.keys() == want.keys()
    for b in want:
        assert got[b] == pytest.approx(want[b], abs=2e-3), b  # a score at the threshold may flip in float rounding
    assert len(set(round(v, 6) for v in got.values())) > 1  # the blocks really differ


@pytest.mark.parametrize("step", ["wanda", "sparsegpt"])
def test_owl_prunes_each_block_to_its_allocation(step):
    model = load_model("tiny-llama").model
    ratios = _reference_ratios(load_model("tiny-llama").model, 3.0)
    order = sorted(ratios, key=lambda b: int(b.rsplit(".", 1)[1]))
    want = dict(zip(order, allocate([ratios[b] for b in order], 0.5, 0.1)))
    fields = {"sparsity": 0.5, "allocation": "owl", "owl_m": 3.0, "owl_lambda": 0.1}
    s = get_step(step)
    model = s.apply(model, s.config(**fields), CALIB)
    got = {}
    for name, mod in model.named_modules():
        if isinstance(mod, SparseLinear):
            block = name.rsplit(".", 2)[0]
            kept, total = got.get(block, (0, 0))
            got[block] = (kept + mod.values.numel(), total + mod.in_features * mod.out_features)
    assert set(got) == set(want)
    for b, (kept, total) in got.items():
        assert 1 - kept / total == pytest.approx(want[b], abs=0.01), b
    sparsities = [1 - k / t for k, t in got.values()]
    assert sum(sparsities) / len(sparsities) == pytest.approx(0.5, abs=0.01)
    assert max(sparsities) - min(sparsities) == pytest.approx(0.2, abs=0.01)


@pytest.mark.parametrize("cfg", [WandaConfig, SparseGPTConfig])
def test_bad_owl_configs(cfg):
    with pytest.raises(ConfigError, match="allocation"):
        cfg(allocation="owl", nm="2:4")
    with pytest.raises(ConfigError, match="owl_lambda"):
        cfg(sparsity=0.9, allocation="owl", owl_lambda=0.15)
    with pytest.raises(ConfigError, match="allocation"):
        cfg(allocation="global")
    assert cfg(sparsity=0.7, allocation="owl").owl_lambda == 0.08
