"""Magnitude pruning: exact sparsity per layer and N:M pattern per row, against references here."""

import pytest
import torch

from effspec.errors import UserError
from effspec.measure.size import size
from effspec.models import load_model
from effspec.registry import get_step
from effspec.sparsity import nm_mask, unstructured_mask


def test_unstructured_mask_removes_exactly_the_smallest():
    torch.manual_seed(0)
    score = torch.rand(16, 32)
    keep = unstructured_mask(score, 0.25)
    assert int((~keep).sum()) == 128
    assert score[~keep].max() < score[keep].min()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_keeps_the_n_largest_in_every_group(n, m):
    torch.manual_seed(n * m)
    score = torch.rand(8, 32)
    keep = nm_mask(score, n, m)
    groups, kept = score.view(8, -1, m), keep.view(8, -1, m)
    assert (kept.sum(-1) == n).all()
    for r in range(8):
        for g in range(groups.shape[1]):
            top = set(torch.topk(groups[r, g], n).indices.tolist())
            assert set(kept[r, g].nonzero().flatten().tolist()) == top


def test_magnitude_step_reaches_its_sparsity_per_layer():
    step = get_step("magnitude")
    model = step.apply(load_model("tiny-llama").model, step.config(sparsity=0.5))
    s = size(model)
    assert s.sparsity == pytest.approx(0.5, abs=1e-3)
    assert all(v == pytest.approx(0.5, abs=1e-3) for v in s.layer_sparsity.values())
    assert len(s.layer_sparsity) == 14  # 7 linear layers per block, lm_head (tied) left alone
    model = step.apply(load_model("tiny-llama").model, step.config(nm="2:4"))
    for name, module in model.named_modules():
        if name.endswith("proj"):
            assert ((module.weight.view(module.out_features, -1, 4) != 0).sum(-1) <= 2).all()


def test_bad_nm_configs():
    step = get_step("magnitude")
    with pytest.raises(ValueError, match="nm"):
        step.config(nm="4:2")
    with pytest.raises(ValueError, match="nm"):
        step.config(nm="two:four")
    with pytest.raises(UserError, match="not a multiple of 48"):
        step.apply(load_model("tiny-llama").model, step.config(nm="2:48"))
