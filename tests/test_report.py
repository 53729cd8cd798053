"""Contracts for the spectrum report: the frontier is the brute-force one, and every output appears complete."""

from __future__ import annotations

import csv
import math
import random

import pytest

from effspec.report import KNOWN_KEYS, pareto_front, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def brute_front(points: list[tuple], minimize_x: bool) -> set[int]:
    """Definition of the frontier: valid points that no other valid point dominates."""
    sign = 1 if minimize_x else -1
    ok = [i for i, (x, y) in enumerate(points) if x is not None and y is not None and not (math.isnan(x) or math.isnan(y))]

    def dominates(j: int, i: int) -> bool:
        (xj, yj), (xi, yi) = points[j], points[i]
        return sign * xj <= sign * xi and yj <= yi and (sign * xj < sign * xi or yj < yi)

    return {i for i in ok if not any(dominates(j, i) for j in ok if j != i)}


@pytest.mark.parametrize("minimize_x", [True, False])
@pytest.mark.parametrize("seed", range(40))
def test_pareto_front_matches_brute_force(seed: int, minimize_x: bool) -> None:
    rng = random.Random(seed)
    n = rng.randint(0, 25)
    # small integer grid so ties and exact duplicates happen often
    draw = lambda: rng.choice([None, math.nan]) if rng.random() < 0.15 else float(rng.randint(0, 8))  # noqa: E731
    points = [(draw(), draw()) for _ in range(n)]
    front = pareto_front(points, minimize_x=minimize_x)
    assert len(front) == len(set(front))
    assert set(front) == brute_front(points, minimize_x)


def test_pareto_front_order_and_missing() -> None:
    points = [(4.0, 1.0), (1.0, 3.0), (None, 0.5), (2.0, 2.0), (3.0, math.nan), (2.5, 2.5)]
    assert pareto_front(points) == [1, 3, 0]  # smallest x first
    assert pareto_front(points, minimize_x=False) == [0]
    assert pareto_front([]) == []
    assert pareto_front([(0.5, math.inf), (1.0, 2.0)]) == [1]  # a diverged run is never "best"


def _row(recipe: str, ppl: float | None, mb: float | None, decode: float | None, **extra: object) -> dict:
    return {
        "recipe": recipe, "recipe_hash": f"h-{recipe}", "recipe_yaml": f"name: {recipe}\nsteps: []  # <x & y>\n",
        "model": "smollm2-135m", "model_fingerprint": "fp", "data": "wikitext2", "steps": "" if recipe == "baseline" else "rtn(bits=4, group_size=64)",
        "perplexity": ppl, "eval_windows": 8, "eval_seqlen": 512, "eval_tokens": 4096,
        "stored_bytes": None if mb is None else int(mb * 1e6), "params": 134_515_008,
        "bits_per_param": None if mb is None else mb * 8e6 / 134_515_008, "linear_stored_bytes": None,
        "linear_bits_per_param": None, "sparsity": None,
        "decode_tokens_per_s": decode, "prefill_tokens_per_s": None if decode is None else decode * 10,
        "peak_rss_bytes": 700_000_000, "apply_seconds": 1.25,
        "env": {"python": "3.11", "torch": "2.5", "transformers": "4.46", "cpu": "EPYC", "threads": 8},
        "created": "2025-01-01T00:00:00", **extra,
    }  # fmt: skip


@pytest.fixture
def rows() -> list[dict]:
    return [
        _row("rtn-w4", 24.0, 90.0, 40.0, zzz_note="late key"),
        _row("baseline", 20.0, 538.0, 15.0),
        _row("rtn-w8", 20.5, 270.0, None, aaa_extra=3),
        _row("wanda-50", 30.0, 540.0, 14.0),
    ]


def test_write_report_writes_all_files(tmp_path, rows) -> None:
    out = tmp_path / "rep"
    paths = write_report(rows, out, title="Test spectrum")
    names = ["report.md", "report.html", "results.csv", "ppl_vs_size.png", "ppl_vs_decode.png"]
    assert [p.name for p in paths] == names
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths)
    assert sorted(p.name for p in out.iterdir()) == sorted(names)  # no temp files left behind
    for name in names[3:]:
        assert (out / name).read_bytes().startswith(PNG_MAGIC)


def test_csv_has_union_of_keys(tmp_path, rows) -> None:
    write_report(rows, tmp_path)
    with open(tmp_path / "results.csv", newline="") as f:
        got = list(csv.DictReader(f))
    header = list(got[0].keys())
    assert header == list(KNOWN_KEYS) + ["aaa_extra", "zzz_note"]
    assert [r["recipe"] for r in got] == [r["recipe"] for r in rows]
    assert got[0]["zzz_note"] == "late key" and got[1]["zzz_note"] == ""
    assert '"threads": 8' in got[0]["env"]
    assert got[0]["recipe_yaml"] == rows[0]["recipe_yaml"]  # multi-line text survives quoting


def test_markdown_table(tmp_path, rows) -> None:
    write_report(rows, tmp_path, title="Test spectrum")
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# Test spectrum\n")
    assert "smollm2-135m on wikitext2, eval 8 windows × 512 tokens" in md
    for r in rows:
        assert r["recipe"] in md
    line = next(x for x in md.splitlines() if x.startswith("| rtn-w4 "))
    assert "+20.00%" in line  # (24 - 20) / 20
    assert "| 24.00 |" in line and "| 90.0 |" in line and "| 40.0 |" in line
    line8 = next(x for x in md.splitlines() if x.startswith("| rtn-w8 "))
    assert "+2.50%" in line8 and "—" in line8  # speed not measured
    table = [x.split(" |")[0][2:] for x in md.splitlines() if x.startswith("| ") and "---" not in x][1:]
    assert table == ["baseline", "rtn-w8", "rtn-w4", "wanda-50"]  # sorted by perplexity
    assert "](ppl_vs_size.png)" in md and "](ppl_vs_decode.png)" in md
    assert "- **size**: rtn-w4 → rtn-w8 → baseline" in md
    assert "- **decode speed**: rtn-w4 → baseline" in md


def test_html_page(tmp_path, rows) -> None:
    write_report(rows, tmp_path)
    page = (tmp_path / "report.html").read_text()
    assert "<table>" in page and "</table>" in page
    assert '<img src="ppl_vs_size.png"' in page and '<img src="ppl_vs_decode.png"' in page
    assert page.count("<details>") == len(rows)
    assert "steps: []  # &lt;x &amp; y&gt;" in page  # YAML shown, escaped
    assert "<x & y>" not in page
    assert "http://" not in page and "https://" not in page  # standalone


def test_no_baseline_and_nothing_measured(tmp_path) -> None:
    rows = [_row("a", None, None, None), _row("b", None, None, None, recipe_yaml=None)]
    paths = write_report(rows, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "+" not in md.split("## Pareto frontier")[0].split("\n", 4)[-1]  # no Δ% without a baseline
    assert "not measured" in md
    for p in paths[3:]:
        assert p.read_bytes().startswith(PNG_MAGIC)


def test_rewrite_replaces_previous_report(tmp_path, rows) -> None:
    write_report(rows, tmp_path)
    write_report(rows[:2], tmp_path)
    with open(tmp_path / "results.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 2
