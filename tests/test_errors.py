"""Bad input that only shows up mid-run still ends in one line and exit code 2."""

from dataclasses import dataclass

import pytest
import torch

from effspec.cli import main
from effspec.errors import UserError
from effspec.models import load_model
from effspec.registry import STEPS, register


@dataclass(frozen=True)
class PoisonConfig:
    value: float = float("nan")


@pytest.fixture
def poison_step():
    @register("poison-test", family="test", stage="inference", config=PoisonConfig)
    def apply(model, cfg, calib=None):
        next(model.parameters()).data[0, 0] = cfg.value
        return model

    yield "poison-test"
    STEPS.pop("poison-test")


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_nan_or_inf_after_a_step_is_a_one_line_error(tmp_path, capsys, poison_step, value):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"steps:\n  - {poison_step}: {{value: .{value}}}\n")
    text = tmp_path / "t.txt"
    text.write_text("some words to score. " * 200)
    code = main(["run", str(recipe), "--model", "tiny-llama", "--data", str(text), "--out", str(tmp_path / "o"),
                 "--windows", "1", "--seqlen", "64", "--runs", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "left NaN/inf values in model.embed_tokens.weight" in err[0]
    assert not (tmp_path / "o").exists()  # nothing half-written appears


def test_unreachable_hub_id_is_a_clear_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail fast, no network retries
    with pytest.raises(UserError, match="unknown model 'nobody/no-such-model'"):
        load_model("nobody/no-such-model")


def test_input_model_directory_is_never_written(tmp_path):
    from effspec.fsutil import atomic_dir
    from effspec.models import save_model

    loaded = load_model("tiny-llama")
    with atomic_dir(tmp_path / "src") as tmp:
        save_model(loaded.model, loaded.tokenizer, tmp, {})
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "src").iterdir()}
    text = tmp_path / "t.txt"
    text.write_text("some words to score. " * 200)
    assert main(["run", "rtn-w8", "--model", str(tmp_path / "src"), "--data", str(text), "--out", str(tmp_path / "o"),
                 "--windows", "1", "--seqlen", "64", "--runs", "1", "--new-tokens", "4", "--prefill-tokens", "32",
                 "--prompt-tokens", "8"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "src").iterdir()} == before
    with torch.no_grad():
        assert load_model(str(tmp_path / "o")).model(torch.tensor([[1, 2]])).logits.isfinite().all()


def test_a_step_that_finds_nothing_to_compress_is_a_one_line_error(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps:\n  - magnitude: {sparsity: 0.5}\n  - nf4: {}\n")  # nf4 cannot take pruned layers
    text = tmp_path / "t.txt"
    text.write_text("some words to score. " * 200)
    code = main(["run", str(recipe), "--model", "tiny-llama", "--data", str(text), "--out", str(tmp_path / "o"),
                 "--windows", "1", "--seqlen", "64", "--runs", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "nf4: no float linear layer" in err[0] and "compressed (sparse)" in err[0]
    assert not (tmp_path / "o").exists()
    from effspec.registry import get_step

    rtn = get_step("rtn")
    with pytest.raises(UserError, match=r"rtn: no float linear layer matches targets \['\*\.mlp\.gate'\]"):  # a typo
        rtn.apply(load_model("tiny-llama").model, rtn.config(targets=["*.mlp.gate"]))
