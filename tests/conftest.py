"""Shared test helpers."""

import pytest
import torch


@pytest.fixture
def reloads_same(tmp_path):
    """Save a model with effspec, load it back, and check it gives the same logits on `ids`; returns the reload."""
    from effspec.models import load_model, save_model

    def check(model, tokenizer, ids, atol: float = 0.0):
        with torch.no_grad():
            logits = model(ids).logits
        save_model(model, tokenizer, tmp_path / "m", {"steps": ["test"]})
        back = load_model(str(tmp_path / "m")).model
        with torch.no_grad():
            again = back(ids).logits
        assert torch.equal(again, logits) if atol == 0 else torch.allclose(again, logits, atol=atol)
        return back

    return check
