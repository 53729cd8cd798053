"""Contracts for data specs, eval windows and calibration sampling (data.py, BENCHMARKS.md protocol)."""

from __future__ import annotations

import json
import random
import sysconfig
from pathlib import Path

import pytest
import torch

from effspec.data import (
    TextSource,
    calibration_samples,
    calibration_tokens,
    eval_windows,
    load_text,
    tokenize,
)
from effspec.errors import UserError


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFSPEC_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tokenizer():
    from effspec.models import load_model

    return load_model("tiny-llama").tokenizer


# ---- data specs -----------------------------------------------------------------------------------
def test_text_file_is_read_whole(tmp_path: Path) -> None:
    text = "First line.\n\nSecond paragraph, with ünïcode.\n"
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    src = load_text(str(path))
    assert src.eval_text == text
    assert src.calib_text is None
    assert src.spec == str(path)


def test_jsonl_joins_text_fields_with_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    lines = [json.dumps({"text": "alpha\nbeta", "id": 1}), "", json.dumps({"text": "gamma"}), json.dumps({"text": "delta"})]
    path.write_text("\n".join(lines) + "\n")
    src = load_text(str(path))
    assert src.eval_text == "alpha\nbeta\n\ngamma\n\ndelta"
    assert src.calib_text is None


def test_jsonl_bad_json_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n\n" + '{"text": "broken' + "\n" + json.dumps({"text": "x"}) + "\n")
    with pytest.raises(UserError) as e:
        load_text(str(path))
    assert f"{path}:3:" in str(e.value)  # line 2 is blank, the broken record is on line 3
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("record", [{"body": "no text field"}, {"text": 5}, ["text"]])
def test_jsonl_record_without_text_field_names_file_and_line(tmp_path: Path, record) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(UserError) as e:
        load_text(str(path))
    assert f"{path}:2:" in str(e.value)
    assert "'text'" in str(e.value)


def test_wikitext_dir_evaluates_on_test_and_calibrates_on_valid(tmp_path: Path) -> None:
    (tmp_path / "wiki.test.raw").write_text(" = Test = \n scored text \n")
    (tmp_path / "wiki.valid.raw").write_text(" = Valid = \n calibration text \n")
    (tmp_path / "wiki.train.raw").write_text(" = Train = \n never used \n")
    src = load_text(str(tmp_path))
    assert src.eval_text == " = Test = \n scored text \n"
    assert src.calib_text == " = Valid = \n calibration text \n"


def test_wikitext_dir_without_valid_calibrates_past_the_windows(tmp_path: Path) -> None:
    (tmp_path / "wiki.test.raw").write_text("only the test split\n")
    src = load_text(str(tmp_path))
    assert (src.eval_text, src.calib_text) == ("only the test split\n", None)


def test_dir_without_wiki_test_raw_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "wiki.valid.raw").write_text("valid only\n")
    with pytest.raises(UserError, match="wiki.test.raw"):
        load_text(str(tmp_path))


def test_unknown_spec_is_a_user_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.txt"
    with pytest.raises(UserError) as e:
        load_text(str(missing))
    assert str(missing) in str(e.value)
    assert "stdlib-docs" in str(e.value)  # lists the builtins


@pytest.mark.parametrize("name,content", [("empty.txt", ""), ("blank.txt", " \n\n\t\n"), ("empty.jsonl", "\n\n")])
def test_empty_file_is_a_user_error(tmp_path: Path, name: str, content: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(UserError, match="empty"):
        load_text(str(path))


def test_non_utf8_file_is_a_user_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(UserError, match="UTF-8"):
        load_text(str(path))


# ---- stdlib-docs ----------------------------------------------------------------------------------
def _fake_stdlib(root: Path, docs: dict[str, str]) -> None:
    """A miniature stdlib: one module per docstring (each > 40 chars, as the collector requires)."""
    for rel, doc in docs.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(f'"""{doc}"""\n\ndef f():\n    """{doc} (function)"""\n')


@pytest.fixture
def fake_stdlib(tmp_path: Path, monkeypatch) -> Path:
    root = tmp_path / "stdlib"
    monkeypatch.setattr(sysconfig, "get_paths", lambda *a, **k: {"stdlib": str(root)})
    return root


def test_stdlib_docs_split_is_deterministic_and_follows_sorted_files(fake_stdlib: Path, tmp_path: Path, monkeypatch) -> None:
    docs = {f"mod{i}.py": f"Module number {i} has a docstring long enough to be collected." for i in range(5)}
    docs["test/test_skip.py"] = "A test module docstring that must be skipped by the collector."
    docs["site-packages/pkg.py"] = "A third-party docstring that must be skipped by the collector."
    _fake_stdlib(fake_stdlib, docs)
    first = load_text("stdlib-docs")
    # ten docstrings in sorted file order (module, then its function); every fifth held out for calibration
    ordered = [d for i in range(5) for d in (docs[f"mod{i}.py"], docs[f"mod{i}.py"] + " (function)")]
    assert first.eval_text == "\n\n".join(d for j, d in enumerate(ordered) if j % 5 != 4)
    assert first.calib_text == "\n\n".join(d for j, d in enumerate(ordered) if j % 5 == 4)
    assert "skipped" not in first.eval_text + first.calib_text
    # rebuilt from scratch into a fresh cache: the same text
    monkeypatch.setenv("EFFSPEC_CACHE", str(tmp_path / "cache2"))
    assert load_text("stdlib-docs") == first


def test_stdlib_docs_calibration_never_repeats_an_eval_docstring(fake_stdlib: Path) -> None:
    same = "Return the same helpful sentence that two stdlib modules happen to share."
    # sorted order: a (0, 1), b (2, 3), c (4 -> calibration, 5); a and c share their module docstring
    _fake_stdlib(fake_stdlib, {"a.py": same, "b.py": "A different module docstring, long enough to count.", "c.py": same})
    src = load_text("stdlib-docs")
    eval_docs = set(src.eval_text.split("\n\n"))
    assert not [d for d in src.calib_text.split("\n\n") if d in eval_docs]


def test_stdlib_docs_builtin_is_deterministic_and_calibration_held_out() -> None:
    """The one test on the real builtin (a first build walks the whole standard library)."""
    first = load_text("stdlib-docs")
    second = load_text("stdlib-docs")
    assert first == second
    assert first.spec == "stdlib-docs"
    assert len(first.eval_text) > 100_000 and len(first.calib_text) > 20_000
    # the cached docstring list, split by index: every fifth held out for calibration, none in both
    from effspec.fsutil import cache_dir

    (cached,) = (cache_dir() / "data").glob("stdlib-docs-*py*.json")
    docs = json.loads(cached.read_text())
    assert len(docs) > 1000
    assert first.eval_text == "\n\n".join(d for i, d in enumerate(docs) if i % 5 != 4)
    assert first.calib_text == "\n\n".join(d for i, d in enumerate(docs) if i % 5 == 4)


# ---- eval windows ---------------------------------------------------------------------------------
def test_eval_windows_are_the_first_non_overlapping_windows() -> None:
    ids = torch.arange(1000)
    w = eval_windows(ids, 64, 3)
    assert w.shape == (3, 64)
    assert torch.equal(w, ids[: 3 * 64].view(3, 64))
    assert w[1, 0].item() == 64 and w[2, -1].item() == 191


def test_eval_windows_none_takes_every_full_window() -> None:
    ids = torch.arange(1000)
    w = eval_windows(ids, 64, None)
    assert w.shape == (15, 64)  # 1000 // 64, the 40-token tail is dropped
    assert torch.equal(w.flatten(), ids[:960])


@pytest.mark.parametrize("numel,seqlen,n", [(1000, 64, 16), (63, 64, 1), (63, 64, None), (1000, 64, 0), (1000, 1, 2)])
def test_eval_windows_impossible_requests_are_user_errors(numel: int, seqlen: int, n) -> None:
    with pytest.raises(UserError):
        eval_windows(torch.arange(numel), seqlen, n)


# ---- calibration ----------------------------------------------------------------------------------
def test_calibration_samples_follow_the_gptq_sampler() -> None:
    N, n, seqlen, seed = 500, 7, 32, 3
    ids = torch.arange(N) + 1000  # distinct values: each row shows where it was cut
    out = calibration_samples(ids, n, seqlen, seed)
    assert out.shape == (n, seqlen) and out.dtype == ids.dtype
    rng = random.Random(seed)
    offsets = [rng.randint(0, N - seqlen - 1) for _ in range(n)]
    assert torch.equal(out, torch.stack([ids[o : o + seqlen] for o in offsets]))


def test_calibration_samples_deterministic_per_seed_and_different_across_seeds() -> None:
    ids = torch.arange(2000)
    a, b = calibration_samples(ids, 8, 16, seed=0), calibration_samples(ids, 8, 16, seed=0)
    assert torch.equal(a, b)
    assert not torch.equal(a, calibration_samples(ids, 8, 16, seed=1))


def test_calibration_samples_need_more_than_seqlen_tokens() -> None:
    assert torch.equal(calibration_samples(torch.arange(17), 2, 16), torch.arange(16).repeat(2, 1))
    with pytest.raises(UserError):
        calibration_samples(torch.arange(16), 2, 16)


def test_calibration_tokens_without_calib_text_come_after_the_eval_windows(tokenizer) -> None:
    eval_part, rest_part = "a" * 128, "bcdefghij" * 30  # byte tokenizer: one token per character
    src = TextSource("t", eval_part + rest_part)
    ids = tokenize(tokenizer, src.eval_text)
    windows = eval_windows(ids, 64, 2)
    rest = calibration_tokens(tokenizer, src, windows.numel())
    assert torch.equal(rest, ids[128:])
    assert rest.numel() == len(rest_part)
    samples = calibration_samples(rest, 16, 32, seed=0)
    assert not set(samples.flatten().tolist()) & set(windows.flatten().tolist())


def test_calibration_tokens_prefer_the_separate_calib_text(tokenizer) -> None:
    src = TextSource("t", "x" * 300, calib_text="y" * 50)
    calib = calibration_tokens(tokenizer, src, 300)
    assert torch.equal(calib, tokenize(tokenizer, "y" * 50))


def test_calibration_tokens_error_when_nothing_is_left(tokenizer) -> None:
    src = TextSource("t", "z" * 128)
    with pytest.raises(UserError, match="--calib-data"):
        calibration_tokens(tokenizer, src, 128)


def test_evaluation_calibrates_on_unscored_text(tokenizer, tmp_path: Path) -> None:
    """End to end through Evaluation: with no calibration data, no sample overlaps the scored windows."""
    from effspec.models import load_model
    from effspec.pipeline import Evaluation, MeasureConfig
    from effspec.recipe import parse_recipe

    loaded = load_model("tiny-llama")
    src = TextSource("t", "a" * 128 + "bcdefghij" * 30)
    ev = Evaluation(loaded, src, MeasureConfig(windows=2, seqlen=64, prompt_tokens=8, new_tokens=4, prefill_tokens=32, runs=1))
    recipe = parse_recipe("steps: []\ncalibration: {samples: 6, seqlen: 32, seed: 5}\n", "r.yaml")
    calib = ev.calibration(recipe)
    assert calib.shape == (6, 32)
    assert ord("a") not in calib.flatten().tolist()
    assert torch.equal(calib, ev.calibration(recipe))
