"""Contracts for the results store (store.py) and resuming through pipeline.run_recipe."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import pytest

from effspec import pipeline, registry
from effspec.data import TextSource
from effspec.models import fingerprint, load_model
from effspec.pipeline import Evaluation, MeasureConfig, run_recipe
from effspec.recipe import load_recipe, parse_recipe
from effspec.store import Store, result_key

TINY = MeasureConfig(windows=2, seqlen=64, prompt_tokens=8, new_tokens=4, prefill_tokens=32, runs=1)
# without the speed measure, for the tests that only need rows to exist (speed is most of a run's time)
W8 = parse_recipe("name: w8\nsteps:\n  - rtn: {bits: 8, group_size: 0}\nmeasure: [perplexity, size]\n", "w8.yaml")
SPARSE = parse_recipe("name: sparse\nsteps:\n  - magnitude: {sparsity: 0.5}\nmeasure: [perplexity, size]\n", "sp.yaml")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFSPEC_CACHE", str(tmp_path / "cache"))


def fresh():
    """A new load of tiny-llama (seeded: the same weights, the same fingerprint); steps change a model in place."""
    return load_model("tiny-llama")


@pytest.fixture(scope="module")
def loaded():
    return fresh()


@pytest.fixture(scope="module")
def source() -> TextSource:
    rng = random.Random(0)
    return TextSource("tiny-text", "".join(rng.choice("abcdefghij klmnop\n") for _ in range(1500)))


@pytest.fixture
def ev(loaded, source) -> Evaluation:
    return Evaluation(loaded, source, TINY)


@pytest.fixture
def applies(monkeypatch) -> list[str]:
    """Names of the recipes whose steps were actually applied (not reused from the store)."""
    seen: list[str] = []
    real = pipeline.apply_recipe

    def counting(model, recipe, ev):
        seen.append(recipe.name)
        return real(model, recipe, ev)

    monkeypatch.setattr(pipeline, "apply_recipe", counting)
    return seen


def _same_row(a: dict, b: dict) -> bool:
    skip = {"created"}  # stamped by the store when the row is written
    return {k: v for k, v in a.items() if k not in skip} == {k: v for k, v in b.items() if k not in skip}


# ---- the store itself -----------------------------------------------------------------------------
def test_put_get_rows(tmp_path: Path) -> None:
    store = Store(tmp_path / "deep" / "dir" / "results.db")  # parents are created
    assert store.get("k1") is None
    assert store.rows() == []
    store.put("k1", {"recipe": "a", "model": "m", "perplexity": 12.5, "created": "2024-01-01T00:00:00+00:00"})
    store.put("k2", {"recipe": "b", "model": "m", "perplexity": 9.0, "created": "2024-01-02T00:00:00+00:00"})
    assert store.get("k1") == {"recipe": "a", "model": "m", "perplexity": 12.5, "key": "k1",
                               "created": "2024-01-01T00:00:00+00:00"}
    assert [r["key"] for r in store.rows()] == ["k1", "k2"]
    store.close()


def test_put_stamps_created_and_stores_json_safe_values(tmp_path: Path) -> None:
    store = Store(tmp_path / "results.db")
    store.put("k", {"recipe": "a", "path": tmp_path, "nested": {"x": [1, 2]}})
    row = store.get("k")
    assert row["created"] and row["created"][:2] == "20"
    assert row["path"] == str(tmp_path) and row["nested"] == {"x": [1, 2]}


def test_rows_persist_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "results.db"
    store = Store(path)
    store.put("k", {"recipe": "a", "perplexity": 3.25})
    store.close()
    again = Store(path)
    assert again.get("k")["perplexity"] == 3.25
    assert len(again.rows()) == 1


def test_put_replaces_a_row_with_the_same_key(tmp_path: Path) -> None:
    store = Store(tmp_path / "results.db")
    store.put("k", {"recipe": "a", "perplexity": 1.0})
    store.put("k", {"recipe": "a", "perplexity": 2.0})
    rows = store.rows()
    assert len(rows) == 1 and rows[0]["perplexity"] == 2.0
    assert store.get("k")["perplexity"] == 2.0


def test_result_key_covers_model_recipe_and_measure() -> None:
    base = result_key("fp", "rh", {"seqlen": 64, "windows": 2})
    assert base == result_key("fp", "rh", {"windows": 2, "seqlen": 64})  # key order does not matter
    assert len({base, result_key("fp2", "rh", {"seqlen": 64, "windows": 2}),
                result_key("fp", "rh2", {"seqlen": 64, "windows": 2}),
                result_key("fp", "rh", {"seqlen": 128, "windows": 2})}) == 4


# ---- resume through run_recipe --------------------------------------------------------------------
def test_second_run_reuses_the_stored_row(tmp_path: Path, loaded, ev, applies) -> None:
    store = Store(tmp_path / "results.db")
    recipe = load_recipe("rtn-w4-g64")
    row, reused = run_recipe(fresh(), recipe, ev, store)
    assert reused is False
    assert row["recipe"] == "rtn-w4-g64" and row["perplexity"] > 1 and row["bits_per_param"] < 32
    assert row["model_fingerprint"] == fingerprint(loaded.model)  # keyed by the model before the steps
    for key in ("decode_tokens_per_s", "prefill_tokens_per_s", "peak_rss_bytes", "stored_bytes"):
        assert row[key] > 0, key
    again, reused = run_recipe(fresh(), recipe, ev, store)
    assert reused is True
    assert _same_row(again, row)
    assert applies == ["rtn-w4-g64"]
    assert len(store.rows()) == 1


def test_force_recomputes(tmp_path: Path, loaded, ev, applies) -> None:
    store = Store(tmp_path / "results.db")
    recipe = W8
    first, _ = run_recipe(fresh(), recipe, ev, store)
    row, reused = run_recipe(fresh(), recipe, ev, store, force=True)
    assert reused is False
    assert applies == ["w8", "w8"]
    assert row["key"] == first["key"] and row["perplexity"] == pytest.approx(first["perplexity"])
    assert len(store.rows()) == 1


def test_different_measure_config_is_a_different_key(tmp_path: Path, loaded, source, ev, applies) -> None:
    store = Store(tmp_path / "results.db")
    recipe = W8
    a, _ = run_recipe(fresh(), recipe, ev, store)
    other = Evaluation(loaded, source, MeasureConfig(windows=1, seqlen=64, prompt_tokens=8, new_tokens=4,
                                                     prefill_tokens=32, runs=1))
    b, reused = run_recipe(fresh(), recipe, other, store)
    assert reused is False
    assert a["key"] != b["key"]
    assert (a["eval_windows"], b["eval_windows"]) == (2, 1)
    assert len(store.rows()) == 2


def test_different_measures_list_is_a_different_key(tmp_path: Path, loaded, ev) -> None:
    store = Store(tmp_path / "results.db")
    full, _ = run_recipe(fresh(), parse_recipe("steps: [rtn]\nmeasure: [perplexity, size]\n", "a.yaml"), ev, store)
    only, reused = run_recipe(fresh(), parse_recipe("steps: [rtn]\nmeasure: [size]\n", "b.yaml"), ev, store)
    assert reused is False and full["key"] != only["key"]
    assert "perplexity" in full and "perplexity" not in only


def test_killed_sweep_resumes(tmp_path: Path, loaded, ev, applies) -> None:
    path = tmp_path / "results.db"
    a, b = W8, SPARSE
    first = Store(path)
    row_a, _ = run_recipe(fresh(), a, ev, first)
    del first  # "killed": never closed; the row was committed when measured

    restarted = Store(path)
    results = [run_recipe(fresh(), r, ev, restarted) for r in (a, b)]
    assert [reused for _, reused in results] == [True, False]
    assert _same_row(results[0][0], row_a)
    assert applies == ["w8", "sparse"]
    assert sorted(r["recipe"] for r in Store(path).rows()) == ["sparse", "w8"]


def test_sweep_killed_during_a_recipe_stores_nothing_for_it(tmp_path: Path, loaded, ev, monkeypatch) -> None:
    path = tmp_path / "results.db"
    a, b = W8, SPARSE
    real = pipeline.apply_recipe

    def interrupted(model, recipe, ev):
        if recipe.name == "sparse":
            raise KeyboardInterrupt
        return real(model, recipe, ev)

    monkeypatch.setattr(pipeline, "apply_recipe", interrupted)
    store = Store(path)
    run_recipe(fresh(), a, ev, store)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(fresh(), b, ev, store)
    monkeypatch.setattr(pipeline, "apply_recipe", real)
    restarted = Store(path)
    assert [r["recipe"] for r in restarted.rows()] == ["w8"]
    assert [run_recipe(fresh(), r, ev, restarted)[1] for r in (a, b)] == [True, False]


@dataclass(frozen=True)
class _ProbeConfig:
    scale: float = 1.0


def test_other_calibration_data_is_not_reused(tmp_path: Path, loaded, source, monkeypatch) -> None:
    seen: list = []

    def apply(model, cfg, calib=None):
        seen.append(calib)
        return model

    info = registry.StepInfo("probe-calibrated", "quantize", "inference", _ProbeConfig, apply, True, "test probe")
    monkeypatch.setitem(registry.STEPS, "probe-calibrated", info)
    recipe = parse_recipe("steps: [probe-calibrated]\ncalibration: {samples: 2, seqlen: 16}\nmeasure: [size]\n", "p.yaml")
    store = Store(tmp_path / "results.db")
    ev_a = Evaluation(loaded, source, TINY, TextSource("calib-a", "a" * 200))
    ev_b = Evaluation(loaded, source, TINY, TextSource("calib-b", "b" * 200))
    assert run_recipe(fresh(), recipe, ev_a, store)[1] is False
    _, reused = run_recipe(fresh(), recipe, ev_b, store)
    assert reused is False
    assert len(seen) == 2 and not bool((seen[0] == seen[1]).all())
