"""Contracts for the spectrum report: the frontier is the brute-force one, and every output appears complete.

The page in a real browser is tested in test_report_browser.py.
"""

from __future__ import annotations

import csv
import math
import random
from html.parser import HTMLParser

import pytest

from effspec.report import KNOWN_KEYS, TASKS, pareto_front, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def brute_front(points: list[tuple], minimize_x: bool, maximize_y: bool = False) -> set[int]:
    """Definition of the frontier: valid points that no other valid point dominates."""
    sign, ys = (1 if minimize_x else -1), (-1 if maximize_y else 1)
    ok = [i for i, (x, y) in enumerate(points) if x is not None and y is not None and not (math.isnan(x) or math.isnan(y))]

    def dominates(j: int, i: int) -> bool:
        (xj, yj), (xi, yi) = points[j], points[i]
        return sign * xj <= sign * xi and ys * yj <= ys * yi and (sign * xj < sign * xi or ys * yj < ys * yi)

    return {i for i in ok if not any(dominates(j, i) for j in ok if j != i)}


@pytest.mark.parametrize("maximize_y", [False, True])
@pytest.mark.parametrize("minimize_x", [True, False])
@pytest.mark.parametrize("seed", range(40))
def test_pareto_front_matches_brute_force(seed: int, minimize_x: bool, maximize_y: bool) -> None:
    rng = random.Random(seed)
    n = rng.randint(0, 25)
    # small integer grid so ties and exact duplicates happen often
    draw = lambda: rng.choice([None, math.nan]) if rng.random() < 0.15 else float(rng.randint(0, 8))  # noqa: E731
    points = [(draw(), draw()) for _ in range(n)]
    front = pareto_front(points, minimize_x=minimize_x, maximize_y=maximize_y)
    assert len(front) == len(set(front))
    assert set(front) == brute_front(points, minimize_x, maximize_y)
    xs: list = [points[i][0] for i in front]
    assert xs == sorted(xs, reverse=not minimize_x)  # best x first


def test_pareto_front_order_and_missing() -> None:
    points = [(4.0, 1.0), (1.0, 3.0), (None, 0.5), (2.0, 2.0), (3.0, math.nan), (2.5, 2.5)]
    assert pareto_front(points) == [1, 3, 0]  # smallest x first
    assert pareto_front(points, minimize_x=False) == [0]
    assert pareto_front([]) == []
    assert pareto_front([(0.5, math.inf), (1.0, 2.0)]) == [1]  # a diverged run is never "best"
    assert pareto_front(points, maximize_y=True) == [1]  # accuracy: (1, 3) is smallest and most accurate
    assert pareto_front(points, False, True) == [0, 5, 1]  # largest x first


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
    assert header == [k for k in KNOWN_KEYS if k in rows[0]] + ["aaa_extra", "zzz_note"]
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


VOID = {"meta", "link", "img", "br", "hr", "input", "col", "source", "wbr", "area", "base", "embed", "track"}


class Checker(HTMLParser):
    """Stdlib well-formedness check: every non-void element closed in order, ids unique, no remote URLs."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.ids: list[str] = []
        self.urls: list[str] = []
        self.problems: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        self.ids += [a["id"]] if "id" in a else []
        self.urls += [a[k] for k in ("src", "href") if k in a]
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack.pop() != tag:
            self.problems.append(f"unexpected </{tag}>")


def check_page(page: str) -> Checker:
    assert page.startswith("<!doctype html>\n")
    assert '<meta charset="utf-8">' in page.split("</head>")[0]
    c = Checker()
    c.feed(page)
    c.close()
    assert c.problems == [] and c.stack == []
    assert len(c.ids) == len(set(c.ids))
    for url in c.urls:  # standalone: only sibling files and data: URLs
        assert ":" not in url or url.startswith("data:"), url
        assert not url.startswith("//"), url
    return c


def test_html_page(tmp_path, rows) -> None:
    write_report(rows, tmp_path)
    page = (tmp_path / "report.html").read_text()
    c = check_page(page)
    assert '<table id="spectrum">' in page and "</table>" in page
    assert '<img src="ppl_vs_size.png"' in page and '<img src="ppl_vs_decode.png"' in page
    assert "acc_vs_size.png" not in page
    assert page.count("<tbody>") == len(rows)  # one per recipe, so sorting moves its details with it
    assert page.count('<tr class="detail"') == len(rows) and page.count("hidden>") == len(rows)
    assert "steps: []  # &lt;x &amp; y&gt;" in page  # YAML shown, escaped
    assert "<x & y>" not in page
    assert "http://" not in page and "https://" not in page  # standalone
    assert "transformers  4.46" in page and "threads       8" in page  # environment pretty-printed, aligned
    assert "<script src" not in page and "<link rel=\"stylesheet\"" not in page
    assert set(c.urls) == {"data:,", "ppl_vs_size.png", "ppl_vs_decode.png"}


def _tasks(avg: float, **acc: float | None) -> dict:
    """Task and divergence metrics as the lm-eval and KLD measures store them."""
    row: dict = {"tasks_avg_acc": avg, "kld_mean": avg / 10, "kld_p99": avg, "top1_agreement": avg + 0.1,
                 "word_perplexity": 30.0, "bits_per_byte": 0.87654, "lambada_openai_perplexity": 12.5}
    for task, v in acc.items():
        row.update({f"acc_{task}": v, f"acc_norm_{task}": None if v is None else v + 0.01})
    return row


@pytest.fixture
def task_rows(rows) -> list[dict]:
    """baseline, rtn-w8 and rtn-w4 ran hellaswag and piqa; wanda-50 was not measured on tasks."""
    extra = {"baseline": _tasks(0.5, hellaswag=0.4, piqa=0.6), "rtn-w8": _tasks(0.4987, hellaswag=0.4, piqa=0.5974),
             "rtn-w4": _tasks(0.45, hellaswag=None, piqa=0.45)}  # fmt: skip
    return [{**r, **extra.get(r["recipe"], {})} for r in rows]


def _md_table(md: str) -> list[list[str]]:
    return [[c.strip() for c in x.strip("|").split(" | ")] for x in md.splitlines() if x.startswith("| ")]


def test_task_and_kld_columns(tmp_path, task_rows) -> None:
    paths = write_report(task_rows, tmp_path)
    assert [p.name for p in paths][-1] == "acc_vs_size.png" and paths[-1].read_bytes().startswith(PNG_MAGIC)
    md = (tmp_path / "report.md").read_text()
    head, _, *body = _md_table(md)
    assert head == ["recipe", "perplexity", "Δ% vs baseline", "bits/byte", "KLD mean", "KLD p99", "top-1 agree %",
                    "avg acc %", "hellaswag acc %", "piqa acc %", "stored MB", "bits/param", "decode tok/s",
                    "prefill tok/s", "peak RSS MB", "apply s", "frontier (size / speed / acc)"]  # fmt: skip
    row = {r[0]: dict(zip(head, r)) for r in body}
    assert row["rtn-w8"]["avg acc %"] == "49.9" and row["rtn-w8"]["piqa acc %"] == "59.7"
    assert row["rtn-w8"]["KLD mean"] == "0.0499" and row["rtn-w8"]["bits/byte"] == "0.8765"
    assert row["rtn-w8"]["top-1 agree %"] == "59.9"
    assert row["rtn-w4"]["hellaswag acc %"] == "—" and row["wanda-50"]["avg acc %"] == "—"
    # accuracy frontier: rtn-w4 is smallest, rtn-w8 is bigger and better, baseline biggest and best
    assert row["rtn-w4"]["frontier (size / speed / acc)"] == "✓ / ✓ / ✓"
    assert row["wanda-50"]["frontier (size / speed / acc)"] == "· / · / ·"
    assert "- **accuracy vs size**: rtn-w4 → rtn-w8 → baseline" in md
    assert "](acc_vs_size.png)" in md
    page = (tmp_path / "report.html").read_text()
    check_page(page)
    assert '<img src="acc_vs_size.png"' in page and "piqa acc %" in page and "boolq" not in page.split("<tbody>")[0]
    assert "acc_norm_piqa" in page and "lambada_openai_perplexity" in page  # every stored value in the details


def test_perplexity_only_report_keeps_its_shape(tmp_path, rows, task_rows) -> None:
    write_report(task_rows, tmp_path)
    paths = write_report(rows, tmp_path)
    assert [p.name for p in paths] == ["report.md", "report.html", "results.csv", "ppl_vs_size.png", "ppl_vs_decode.png"]
    assert not (tmp_path / "acc_vs_size.png").exists()  # the earlier report's plot does not linger
    md = (tmp_path / "report.md").read_text()
    assert _md_table(md)[0] == ["recipe", "perplexity", "Δ% vs baseline", "stored MB", "bits/param", "decode tok/s",
                                "prefill tok/s", "peak RSS MB", "apply s", "frontier (size / speed)"]  # fmt: skip
    assert "acc" not in md and "KLD" not in md


def test_task_accuracy_plot_with_one_point(tmp_path, rows) -> None:
    one = [{**rows[0], "tasks_avg_acc": 0.0}, rows[1]]  # zero accuracy is a value, and fits a linear axis
    paths = write_report(one, tmp_path)
    assert paths[-1].name == "acc_vs_size.png" and paths[-1].read_bytes().startswith(PNG_MAGIC)
    assert "- **accuracy vs size**: rtn-w4" in (tmp_path / "report.md").read_text()


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
