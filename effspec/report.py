"""The spectrum report: one table, two Pareto plots, built from stored result rows only.

A row is the flat dict a measure returns (STYLE rule 10). The report never
re-runs a model, so it can be rebuilt from the results store at any time and
two reports from the same rows are identical apart from matplotlib's rendering.

Outputs in `out_dir`: report.md, report.html, results.csv, ppl_vs_size.png and
ppl_vs_decode.png. Each is written to a temporary name and `os.replace`d, so a
killed run leaves the previous file or the new one, never half of one.
"""

from __future__ import annotations

import csv
import html
import io
import itertools
import json
import logging
import math
import pathlib
from dataclasses import dataclass
from typing import Any, Callable

from effspec.fsutil import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)

# Column order of results.csv: the known row keys first, in this order, then any others sorted.
KNOWN_KEYS = (
    "recipe", "recipe_hash", "recipe_yaml", "model", "model_fingerprint", "data", "steps",
    "perplexity", "eval_windows", "eval_seqlen", "eval_tokens",
    "stored_bytes", "params", "bits_per_param", "linear_stored_bytes", "linear_bits_per_param", "sparsity",
    "decode_tokens_per_s", "prefill_tokens_per_s", "peak_rss_bytes", "apply_seconds",
    "env", "created",
)  # fmt: skip
MB = 1e6  # decimal megabytes, as file sizes and model cards count them
BASELINE = "baseline"
MISSING = "—"


def _finite(v: Any) -> bool:
    """True for a real, finite number (None, NaN, inf and strings are not plottable or comparable)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def pareto_front(points: list[tuple[float, float]], minimize_x: bool = True) -> list[int]:
    """Indices of points on the Pareto frontier, minimizing y (perplexity) and minimizing x (size) or maximizing x (speed) when minimize_x=False. Points with None/NaN are never on it.

    A point is on the frontier when no other point is at least as good on both
    axes and strictly better on one; exact duplicates therefore are both on it.
    Indices come back ordered along the frontier, best x first.
    """
    sign = 1.0 if minimize_x else -1.0
    # deviation: inf is excluded too, since a diverged run (ppl=inf) "winning" on size says nothing useful
    valid = [i for i, (x, y) in enumerate(points) if _finite(x) and _finite(y)]
    valid.sort(key=lambda i: (sign * points[i][0], points[i][1]))
    front: list[int] = []
    best_y = math.inf  # lowest y among points with strictly better x
    for _, same_x in itertools.groupby(valid, key=lambda i: sign * points[i][0]):
        group = list(same_x)  # sorted by y, so only the group's lowest y can survive
        y_min = points[group[0]][1]
        if y_min < best_y:
            front += [i for i in group if points[i][1] == y_min]
            best_y = y_min
    return front


def _fmt(v: Any, digits: int, scale: float = 1.0) -> str:
    """A number with fixed decimals; None/NaN/non-numbers as a dash so gaps are visible, not zero."""
    if not isinstance(v, (int, float)) or isinstance(v, bool) or math.isnan(v):
        return MISSING
    return f"{v / scale:.{digits}f}"


@dataclass(frozen=True)
class _Column:
    header: str
    value: Callable[[dict], Any]  # raw value, used for sorting in the HTML page
    text: Callable[[Any], str]


def _columns() -> list[_Column]:
    return [
        _Column("recipe", lambda r: r.get("recipe"), lambda v: str(v) if v is not None else MISSING),
        _Column("perplexity", lambda r: r.get("perplexity"), lambda v: _fmt(v, 2)),
        _Column("Δ% vs baseline", lambda r: r["_delta"], lambda v: MISSING if v is None else f"{v:+.2f}%"),
        _Column("stored MB", lambda r: r.get("stored_bytes"), lambda v: _fmt(v, 1, MB)),
        _Column("bits/param", lambda r: r.get("bits_per_param"), lambda v: _fmt(v, 2)),
        _Column("decode tok/s", lambda r: r.get("decode_tokens_per_s"), lambda v: _fmt(v, 1)),
        _Column("prefill tok/s", lambda r: r.get("prefill_tokens_per_s"), lambda v: _fmt(v, 1)),
        _Column("peak RSS MB", lambda r: r.get("peak_rss_bytes"), lambda v: _fmt(v, 1, MB)),
        _Column("apply s", lambda r: r.get("apply_seconds"), lambda v: _fmt(v, 1)),
        _Column("frontier (size / speed)", lambda r: r["_front"], str),
    ]


def _annotate(rows: list[dict]) -> list[dict]:
    """Copies of rows sorted by perplexity, with Δ% vs baseline and frontier marks added."""
    mb = [(r.get("stored_bytes"), r.get("perplexity")) for r in rows]
    speed = [(r.get("decode_tokens_per_s"), r.get("perplexity")) for r in rows]
    on_size, on_speed = set(pareto_front(mb)), set(pareto_front(speed, minimize_x=False))
    base = next((r.get("perplexity") for r in rows if r.get("recipe") == BASELINE), None)
    out = []
    for i, r in enumerate(rows):
        ppl = r.get("perplexity")
        delta = 100.0 * (ppl - base) / base if _finite(ppl) and _finite(base) and base else None
        front = f"{'✓' if i in on_size else '·'} / {'✓' if i in on_speed else '·'}"
        out.append({**r, "_delta": delta, "_front": front})
    out.sort(key=lambda r: (0, r["perplexity"]) if _finite(r.get("perplexity")) else (1, 0.0))
    return out


def _distinct(rows: list[dict], key: str) -> str:
    """The value every row shares for `key`, or all distinct values joined when they differ."""
    values = list(dict.fromkeys(str(r[key]) for r in rows if r.get(key) is not None))
    return ", ".join(values) if values else MISSING


def _protocol(rows: list[dict]) -> str:
    """Model, data and eval protocol; perplexities are only comparable when these agree."""
    windows, seqlen = _distinct(rows, "eval_windows"), _distinct(rows, "eval_seqlen")
    if "," in windows or "," in seqlen:
        log.warning("rows use different eval protocols (windows %s, seqlen %s): perplexities not comparable",
                    windows, seqlen)  # fmt: skip
    return f"{_distinct(rows, 'model')} on {_distinct(rows, 'data')}, eval {windows} windows × {seqlen} tokens"


def _label_above(xy: list[tuple[float, float]]) -> list[bool]:
    """Whether each point's label goes above it: above when it sits higher than its nearest neighbour.

    Close pairs (the common clutter: w4 variants a few MB apart) then get one
    label above and one below instead of two overlapping ones.
    """
    xs, ys = [x for x, _ in xy], [math.log(y) for _, y in xy]
    sx, sy = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    above = []
    for i in range(len(xy)):
        dist = [(((xs[j] - xs[i]) / sx) ** 2 + ((ys[j] - ys[i]) / sy) ** 2, j) for j in range(len(xy)) if j != i]
        above.append(not dist or ys[i] >= ys[min(dist)[1]])
    return above


def _plot(rows: list[dict], x_key: str, minimize_x: bool, title: str) -> bytes:
    """PNG of perplexity (log y) against one x metric, frontier highlighted and joined by a step line.

    Uses a bare Figure on an Agg canvas rather than pyplot: no global backend
    switch and no figure registry, so it is safe inside notebooks and threads.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogFormatter

    scale, xlabel = (MB, "stored size (MB)") if minimize_x else (1.0, "decode speed (tokens/s, batch 1)")
    pts = [((r.get(x_key) / scale) if _finite(r.get(x_key)) else None, r.get("perplexity")) for r in rows]
    front = pareto_front(pts, minimize_x)
    shown = [i for i, (x, y) in enumerate(pts) if _finite(x) and _finite(y) and y > 0]
    fig = Figure(figsize=(8, 5.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_xlabel(xlabel)
    ax.set_ylabel("perplexity (log scale, lower is better)")
    ax.set_title(title, fontsize=10)
    if not shown:
        ax.text(0.5, 0.5, "not measured", transform=ax.transAxes, ha="center", va="center", color="grey")
    else:
        ax.set_yscale("log")
        # plain numbers (20, 30) rather than 2×10¹: perplexities usually span less than a decade
        ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
        rest = [i for i in shown if i not in front]
        ax.scatter([pts[i][0] for i in rest], [pts[i][1] for i in rest], c="tab:blue", s=25, label="recipe")
        line = sorted((pts[i] for i in front), key=lambda p: p[0])
        ax.step([p[0] for p in line], [p[1] for p in line], where="post" if minimize_x else "pre",
                c="tab:red", lw=1, alpha=0.6)  # fmt: skip
        ax.scatter([p[0] for p in line], [p[1] for p in line], c="tab:red", marker="D", s=40, label="Pareto frontier")
        for i, above in zip(shown, _label_above([pts[i] for i in shown])):
            offset = (4, 4) if above else (4, -10)
            ax.annotate(str(rows[i].get("recipe")), pts[i], xytext=offset, textcoords="offset points", fontsize=7)
        ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _csv(rows: list[dict]) -> str:
    """All rows with the union of their keys; nested values (env) as JSON so the file stays flat."""
    present = {k for r in rows for k in r}
    fields = [k for k in KNOWN_KEYS if k in present] + sorted(present - set(KNOWN_KEYS))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        cell = {k: json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v for k, v in r.items()}
        writer.writerow({k: "" if cell.get(k) is None else cell[k] for k in fields})
    return buf.getvalue()


def _frontier_lines(table: list[dict]) -> list[str]:
    """One line per frontier, recipes in frontier order (smallest / fastest first)."""
    mb = [(r.get("stored_bytes"), r.get("perplexity")) for r in table]
    speed = [(r.get("decode_tokens_per_s"), r.get("perplexity")) for r in table]
    lines = []
    for name, idx in (("size", pareto_front(mb)), ("decode speed", pareto_front(speed, minimize_x=False))):
        names = " → ".join(str(table[i].get("recipe")) for i in idx) or "not measured"
        lines.append(f"- **{name}**: {names}")
    return lines


def _markdown(table: list[dict], title: str, images: list[str]) -> str:
    cols = _columns()
    cell = lambda s: s.replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = [f"# {title}", "", _protocol(table), ""]
    lines.append("| " + " | ".join(c.header for c in cols) + " |")
    lines.append("|" + "|".join("---" if n == 0 else "---:" for n in range(len(cols))) + "|")
    for r in table:
        lines.append("| " + " | ".join(cell(c.text(c.value(r))) for c in cols) + " |")
    lines += ["", *(f"![{name}]({name})\n" for name in images), "## Pareto frontier", "", *_frontier_lines(table)]
    return "\n".join(lines) + "\n"


# Click a header to sort by it; cells carry their raw value in data-v, missing values sort last.
_SORT_JS = """
document.querySelectorAll("th").forEach((th, i) => th.addEventListener("click", () => {
  const body = th.closest("table").tBodies[0], asc = th.dataset.asc !== "1";
  th.dataset.asc = asc ? "1" : "0";
  const key = r => { const v = r.cells[i].dataset.v; return v === "" ? null : (isNaN(+v) ? v : +v); };
  [...body.rows].sort((a, b) => { const x = key(a), y = key(b);
    if (x === null) return 1; if (y === null) return -1;
    return (x < y ? -1 : x > y ? 1 : 0) * (asc ? 1 : -1); }).forEach(r => body.appendChild(r));
}));
"""
_CSS = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}th{cursor:pointer;background:#f4f4f4}"
        "td:first-child{text-align:left}img{max-width:48%}pre{background:#f8f8f8;padding:8px}")  # fmt: skip


def _html(table: list[dict], title: str, images: list[str]) -> str:
    e = html.escape
    cols = _columns()
    head = "".join(f"<th>{e(c.header)}</th>" for c in cols)
    body = []
    for r in table:
        cells = []
        for c in cols:
            raw = c.value(r)
            sort = "" if raw is None or (isinstance(raw, float) and math.isnan(raw)) else str(raw)
            cells.append(f'<td data-v="{e(sort)}">{e(c.text(raw))}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    imgs = "\n".join(f'<img src="{e(name)}" alt="{e(name)}">' for name in images)
    yamls = "\n".join(
        f"<details><summary>{e(str(r.get('recipe')))} <code>{e(str(r.get('steps') or ''))}</code></summary>"
        f"<pre>{e(str(r.get('recipe_yaml') or ''))}</pre></details>"
        for r in table
    )
    front = "".join(f"<li>{e(line[2:].replace('**', ''))}</li>" for line in _frontier_lines(table))
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{e(title)}</title><style>{_CSS}</style></head>\n'
        f"<body><h1>{e(title)}</h1><p>{e(_protocol(table))}</p>\n"
        f"<table><thead><tr>{head}</tr></thead><tbody>\n" + "\n".join(body) + "\n</tbody></table>\n"
        f"<p>{imgs}</p>\n<h2>Pareto frontier</h2><ul>{front}</ul>\n<h2>Recipes</h2>\n{yamls}\n"
        f"<script>{_SORT_JS}</script></body></html>\n"
    )


def write_report(rows: list[dict], out_dir: pathlib.Path, title: str = "effspec spectrum") -> list[pathlib.Path]:
    """Writes out_dir/report.md, report.html, results.csv, ppl_vs_size.png, ppl_vs_decode.png; returns the paths."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = _annotate(rows)
    plot_title = f"{title}\n{_protocol(table)}"
    images = {"ppl_vs_size.png": ("stored_bytes", True), "ppl_vs_decode.png": ("decode_tokens_per_s", False)}
    paths = {name: out_dir / name for name in ("report.md", "report.html", "results.csv", *images)}
    # Plots first, so the md/html never link to an image that a killed run did not write.
    for name, (x_key, minimize_x) in images.items():
        atomic_write_bytes(paths[name], _plot(rows, x_key, minimize_x, plot_title))
    atomic_write_text(paths["results.csv"], _csv(rows))
    atomic_write_text(paths["report.md"], _markdown(table, title, list(images)))
    atomic_write_text(paths["report.html"], _html(table, title, list(images)))
    log.info("wrote report for %d rows to %s", len(rows), out_dir)
    return list(paths.values())
