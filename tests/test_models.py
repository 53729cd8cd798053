"""Loaders, save/load round trips (packed layers included), and the block-by-block calibration runner."""

import json

import pytest
import torch

from effspec.calibrate import run_blocks
from effspec.errors import UserError
from effspec.fsutil import atomic_dir
from effspec.layers import QuantLinear
from effspec.models import fingerprint, load_model, save_model
from effspec.registry import get_step


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_tiny_models_are_seeded_and_run(name):
    a, b = load_model(name), load_model(name)
    assert fingerprint(a.model) == fingerprint(b.model)
    ids = torch.tensor([a.tokenizer("hello world")["input_ids"]])
    assert a.model(ids).logits.shape == (1, 11, 257)
    assert a.tokenizer.decode(ids[0]) == "hello world"


def test_plain_save_loads_in_effspec_and_transformers(tmp_path):
    import transformers

    loaded = load_model("tiny-qwen2")
    with atomic_dir(tmp_path / "m") as tmp:
        save_model(loaded.model, loaded.tokenizer, tmp, {"recipe": "baseline"})
    ids = torch.tensor([[1, 2, 3, 4]])
    again = load_model(str(tmp_path / "m"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(again.model(ids).logits, loaded.model(ids).logits)
        assert torch.equal(hf(ids).logits, loaded.model(ids).logits)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_packed_model_round_trip_gives_same_logits(tmp_path, name):
    loaded = load_model(name)
    step = get_step("rtn")
    model = step.apply(loaded.model, step.config(bits=3, group_size=32, symmetric=False))
    with atomic_dir(tmp_path / "m") as tmp:
        save_model(model, loaded.tokenizer, tmp, {"recipe": "w3"})
    meta = json.loads((tmp_path / "m" / "effspec.json").read_text())
    assert len(meta["layers"]) == 14 and meta["layers"]["model.layers.0.mlp.down_proj"]["bits"] == 3
    again = load_model(str(tmp_path / "m"))
    assert isinstance(again.model.get_submodule("model.layers.1.self_attn.q_proj"), QuantLinear)
    assert again.model.lm_head.weight is again.model.model.embed_tokens.weight
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.equal(again.model(ids).logits, model(ids).logits)
    stored = (tmp_path / "m" / "model.safetensors").stat().st_size
    assert stored < 0.5 * 4 * sum(p.numel() for p in load_model(name).model.parameters())


def test_load_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="unknown model"):
        load_model("no-such-model")
    with pytest.raises(UserError, match="no such GGUF"):
        load_model(str(tmp_path / "missing.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        load_model(str(tmp_path / "empty"))
    bad = tmp_path / "vit"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "vit"}))
    load_model("tiny-llama").tokenizer.save_pretrained(bad)
    with pytest.raises(UserError, match="unsupported architecture 'vit'"):
        load_model(str(bad))
    noweights = tmp_path / "noweights"
    noweights.mkdir()
    load_model("tiny-llama").model.config.save_pretrained(noweights)
    load_model("tiny-llama").tokenizer.save_pretrained(noweights)
    with pytest.raises(UserError, match="cannot load weights"):
        load_model(str(noweights))


def test_atomic_dir_leaves_nothing_when_interrupted(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError
    assert list(tmp_path.iterdir()) == []


def test_outputs_get_the_modes_of_ordinary_new_files(tmp_path):
    """Temporary files and directories are private (0600/0700); what they become must not stay so."""
    import os

    from effspec.fsutil import atomic_write_text

    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "f").write_text("x")
        atomic_write_text(tmp_path / "report.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "report.json").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_block_runner_feeds_each_block_what_the_model_would(name):
    model = load_model(name).model
    ids = torch.randint(0, 257, (3, 24))
    seen = []
    run_blocks(model, ids, lambda i, block, xs, kwargs: seen.append(torch.cat(xs)))
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    assert len(seen) == 2
    for i in range(2):
        assert torch.allclose(seen[i], hidden[i], atol=1e-5)


def test_block_runner_sees_the_already_changed_blocks():
    """Block 1's inputs come from block 0 as changed by `process`, not from the original block 0."""
    model = load_model("tiny-llama").model
    ids = torch.randint(0, 257, (2, 16))
    step, cfg = get_step("rtn"), get_step("rtn").config(bits=2, group_size=32)
    from effspec.layers import QuantLinear as QL
    from effspec.surgery import linear_layers, replace_module

    seen = []

    def process(i, block, xs, kwargs):
        seen.append(torch.cat(xs))
        for name, lin in linear_layers(block).items():
            replace_module(block, name, QL.from_linear(lin, cfg.grid))

    run_blocks(model, ids, process)
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states  # model is now fully quantized
    assert torch.allclose(seen[1], hidden[1], atol=1e-4)
