"""The spectrum report: one table and its Pareto plots, built from stored result rows only.

A row is the flat dict a measure returns (STYLE rule 10). The report never
re-runs a model, so it can be rebuilt from the results store at any time and
two reports from the same rows are identical apart from matplotlib's rendering.

Outputs in `out_dir`: report.md, report.html, results.csv, ppl_vs_size.png,
ppl_vs_decode.png, and acc_vs_size.png when some row has task accuracies. Each
is written to a temporary name and `os.replace`d, so a killed run leaves the
previous file or the new one, never half of one. report.html is one standalone
page (inline CSS and JS, plots as sibling files): it opens from disk, with no
server and no network.
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
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

from effspec.fsutil import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)

TASKS = ("hellaswag", "piqa", "arc_easy", "winogrande", "boolq", "lambada_openai")  # lm-eval task names
# Column order of results.csv: the known row keys first, in this order, then any others sorted.
KNOWN_KEYS = (
    "recipe", "recipe_hash", "recipe_yaml", "model", "model_fingerprint", "data", "steps",
    "perplexity", "eval_windows", "eval_seqlen", "eval_tokens", "word_perplexity", "bits_per_byte",
    "kld_mean", "kld_p99", "top1_agreement",
    "tasks_avg_acc", *(f"{m}_{t}" for t in TASKS for m in ("acc", "acc_norm")), "lambada_openai_perplexity",
    "wikitext_word_perplexity", "wikitext_byte_perplexity", "wikitext_bits_per_byte",
    "stored_bytes", "params", "bits_per_param", "linear_stored_bytes", "linear_bits_per_param", "sparsity",
    "decode_tokens_per_s", "prefill_tokens_per_s", "peak_rss_bytes", "apply_seconds",
    "env", "created",
)  # fmt: skip
MB = 1e6  # decimal megabytes, as file sizes and model cards count them
BASELINE = "baseline"
MISSING = "—"
FIG_INCHES, DPI = (8.0, 5.5), 120  # plots are 960 × 660 px


def _finite(v: Any) -> bool:
    """True for a real, finite number (None, NaN, inf and strings are not plottable or comparable)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def pareto_front(points: Sequence[tuple[Any, Any]], minimize_x: bool = True, maximize_y: bool = False) -> list[int]:
    """Indices of points on the Pareto frontier. Points with None/NaN/inf are never on it.

    x is minimized (size) or, with minimize_x=False, maximized (speed); y is
    minimized (perplexity) or, with maximize_y=True, maximized (accuracy).
    A point is on the frontier when no other point is at least as good on both
    axes and strictly better on one; exact duplicates therefore are both on it.
    Indices come back ordered along the frontier, best x first.
    """
    sx, sy = (1.0 if minimize_x else -1.0), (-1.0 if maximize_y else 1.0)  # signs that turn both into minimizing
    # deviation: inf is excluded too, since a diverged run (ppl=inf) "winning" on size says nothing useful
    valid = [i for i, (x, y) in enumerate(points) if _finite(x) and _finite(y)]
    valid.sort(key=lambda i: (sx * points[i][0], sy * points[i][1]))
    front: list[int] = []
    best_y = math.inf  # lowest signed y among points with strictly better x
    for _, same_x in itertools.groupby(valid, key=lambda i: sx * points[i][0]):
        group = list(same_x)  # sorted by signed y, so only the group's lowest can survive
        y_min = sy * points[group[0]][1]
        if y_min < best_y:
            front += [i for i in group if sy * points[i][1] == y_min]
            best_y = y_min
    return front


def _fmt(v: Any, digits: int, scale: float = 1.0) -> str:
    """A number with fixed decimals; None/NaN/non-numbers as a dash so gaps are visible, not zero."""
    if not isinstance(v, (int, float)) or isinstance(v, bool) or math.isnan(v):
        return MISSING
    return f"{v / scale:.{digits}f}"


def _pct(v: Any) -> str:
    """A fraction in [0, 1] as a percentage with one decimal."""
    return _fmt(v * 100 if _finite(v) else v, 1)


@dataclass(frozen=True)
class _Axes:
    """One Pareto plot and its frontier: y against x, each with the direction in which it is better."""

    name: str  # PNG file name
    label: str  # the frontier's name in the reports
    short: str  # its name in the frontier column
    x_key: str
    x_label: str
    x_div: float
    minimize_x: bool
    y_key: str
    y_label: str
    y_mul: float
    maximize_y: bool
    log_y: bool
    always: bool  # written even when nothing is measured, so a report always has its two core plots


_PPL_SIZE = _Axes(
    name="ppl_vs_size.png", label="size", short="size",
    x_key="stored_bytes", x_label="stored size (MB)", x_div=MB, minimize_x=True,
    y_key="perplexity", y_label="perplexity (log scale, lower is better)", y_mul=1.0, maximize_y=False, log_y=True,
    always=True,
)  # fmt: skip
PLOTS = (
    _PPL_SIZE,
    replace(_PPL_SIZE, name="ppl_vs_decode.png", label="decode speed", short="speed", x_key="decode_tokens_per_s",
            x_label="decode speed (tokens/s, batch 1)", x_div=1.0, minimize_x=False),
    replace(_PPL_SIZE, name="acc_vs_size.png", label="accuracy vs size", short="acc", y_key="tasks_avg_acc",
            y_label="average task accuracy (%, higher is better)", y_mul=100.0, maximize_y=True, log_y=False,
            always=False),
)  # fmt: skip


def _axes(rows: list[dict]) -> list[_Axes]:
    """The plots this report has: the core ones, plus accuracy when some row measured it."""
    return [a for a in PLOTS if a.always or any(_finite(r.get(a.y_key)) for r in rows)]


def _front(rows: list[dict], a: _Axes) -> list[int]:
    return pareto_front([(r.get(a.x_key), r.get(a.y_key)) for r in rows], a.minimize_x, a.maximize_y)


@dataclass(frozen=True)
class _Column:
    header: str
    value: Callable[[dict], Any]  # raw value, used for sorting in the HTML page
    text: Callable[[Any], str]
    help: str = ""  # tooltip in the HTML page
    optional: bool = False  # shown only when some row has a value, so a perplexity-only report keeps its shape


def _key(k: str) -> Callable[[dict], Any]:
    return lambda r: r.get(k)


def _columns(table: list[dict], axes: list[_Axes]) -> list[_Column]:
    f4 = lambda v: _fmt(v, 4)  # noqa: E731
    cols = [
        _Column("recipe", _key("recipe"), lambda v: str(v) if v is not None else MISSING),
        _Column("perplexity", _key("perplexity"), lambda v: _fmt(v, 2), "token-level perplexity, lower is better"),
        _Column("Δ% vs baseline", lambda r: r["_delta"], lambda v: MISSING if v is None else f"{v:+.2f}%",
                "perplexity change against the recipe named baseline"),
        _Column("bits/byte", _key("bits_per_byte"), f4, "bits per byte of the perplexity windows' text, lower is better",
                True),
        _Column("wikitext bits/byte", _key("wikitext_bits_per_byte"), f4,
                "lm-eval's wikitext task: bits per byte over whole articles, lower is better", True),
        _Column("wikitext word ppl", _key("wikitext_word_perplexity"), lambda v: _fmt(v, 2),
                "lm-eval's wikitext task: word perplexity over whole articles", True),
        _Column("KLD mean", _key("kld_mean"), f4, "mean KL divergence to the original model (nats)", True),
        _Column("KLD p99", _key("kld_p99"), f4, "99th percentile of per-token KL divergence (nats)", True),
        _Column("top-1 agree %", _key("top1_agreement"), _pct, "tokens whose argmax matches the original", True),
        _Column("avg acc %", _key("tasks_avg_acc"), _pct, "mean accuracy over the tasks measured", True),
        *(_Column(f"{t} acc %", _key(f"acc_{t}"), _pct, f"lm-eval {t} accuracy", True) for t in TASKS),
        _Column("stored MB", _key("stored_bytes"), lambda v: _fmt(v, 1, MB), "bytes stored, decimal MB"),
        _Column("bits/param", _key("bits_per_param"), lambda v: _fmt(v, 2)),
        _Column("decode tok/s", _key("decode_tokens_per_s"), lambda v: _fmt(v, 1), "batch 1, median of runs"),
        _Column("prefill tok/s", _key("prefill_tokens_per_s"), lambda v: _fmt(v, 1)),
        _Column("peak RSS MB", _key("peak_rss_bytes"), lambda v: _fmt(v, 1, MB)),
        _Column("apply s", _key("apply_seconds"), lambda v: _fmt(v, 1), "seconds to apply the recipe's steps"),
        _Column(f"frontier ({' / '.join(a.short for a in axes)})", lambda r: r["_front"], str,
                "✓ when on that Pareto frontier"),
    ]  # fmt: skip
    return [c for c in cols if not c.optional or any(_finite(c.value(r)) for r in table)]


def _annotate(rows: list[dict], axes: list[_Axes]) -> list[dict]:
    """Copies of rows sorted by perplexity, with Δ% vs baseline and frontier marks added."""
    on = [set(_front(rows, a)) for a in axes]
    base = next((r.get("perplexity") for r in rows if r.get("recipe") == BASELINE), None)
    out = []
    for i, r in enumerate(rows):
        ppl = r.get("perplexity")
        delta = 100.0 * (ppl - base) / base if _finite(ppl) and _finite(base) and base else None
        out.append({**r, "_delta": delta, "_front": " / ".join("✓" if i in s else "·" for s in on)})
    out.sort(key=lambda r: (0, r["perplexity"]) if _finite(r.get("perplexity")) else (1, 0.0))
    return out


def _distinct(rows: list[dict], key: str) -> str:
    """The value every row shares for `key`, or all distinct values joined when they differ."""
    values = list(dict.fromkeys(str(r[key]) for r in rows if r.get(key) is not None))
    return ", ".join(values) if values else MISSING


def _protocol(rows: list[dict]) -> str:
    """Model, data, eval protocol and tasks; metrics are only comparable when these agree."""
    windows, seqlen = _distinct(rows, "eval_windows"), _distinct(rows, "eval_seqlen")
    if "," in windows or "," in seqlen:
        log.warning("rows use different eval protocols (windows %s, seqlen %s): perplexities not comparable",
                    windows, seqlen)  # fmt: skip
    text = f"{_distinct(rows, 'model')} on {_distinct(rows, 'data')}, eval {windows} windows × {seqlen} tokens"
    tasks = [t for t in TASKS if any(_finite(r.get(f"acc_{t}")) for r in rows)]
    averaged = {tuple(t for t in tasks if _finite(r.get(f"acc_{t}"))) for r in rows if _finite(r.get("tasks_avg_acc"))}
    if len(averaged) > 1:
        log.warning("rows average accuracy over different task sets %s: avg acc not comparable", sorted(averaged))
    return text + (f"; tasks {', '.join(tasks)}" if tasks else "")


def _label_above(xy: list[tuple[float, float]], log_y: bool) -> list[bool]:
    """Whether each point's label goes above it: above when it sits higher than its nearest neighbour.

    Close pairs (the common clutter: w4 variants a few MB apart) then get one
    label above and one below instead of two overlapping ones.
    """
    xs, ys = [x for x, _ in xy], [math.log(y) if log_y else y for _, y in xy]
    sx, sy = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    above = []
    for i in range(len(xy)):
        dist = [(((xs[j] - xs[i]) / sx) ** 2 + ((ys[j] - ys[i]) / sy) ** 2, j) for j in range(len(xy)) if j != i]
        above.append(not dist or ys[i] >= ys[min(dist)[1]])
    return above


def _plot(rows: list[dict], a: _Axes, title: str) -> bytes:
    """PNG of one y metric against one x metric, frontier highlighted and joined by a step line.

    Uses a bare Figure on an Agg canvas rather than pyplot: no global backend
    switch and no figure registry, so it is safe inside notebooks and threads.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogFormatter

    raw: list[tuple[Any, Any]] = [(r.get(a.x_key), r.get(a.y_key)) for r in rows]
    plottable = lambda x, y: _finite(x) and _finite(y) and (y > 0 or not a.log_y)  # noqa: E731
    # row index -> plotted point, for the rows that have one
    pts = {i: (x / a.x_div, y * a.y_mul) for i, (x, y) in enumerate(raw) if plottable(x, y)}
    shown = list(pts)
    front = [i for i in pareto_front(raw, a.minimize_x, a.maximize_y) if i in pts]
    fig = Figure(figsize=FIG_INCHES, dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_xlabel(a.x_label)
    ax.set_ylabel(a.y_label)
    ax.set_title(title, fontsize=10)
    if not shown:
        ax.text(0.5, 0.5, "not measured", transform=ax.transAxes, ha="center", va="center", color="grey")
    else:
        if a.log_y:
            ax.set_yscale("log")
            # plain numbers (20, 30) rather than 2×10¹: perplexities usually span less than a decade
            ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
            ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
        rest = [i for i in shown if i not in front]
        if rest:
            ax.scatter([pts[i][0] for i in rest], [pts[i][1] for i in rest], c="tab:blue", s=25, label="recipe")
        line = sorted((pts[i] for i in front), key=lambda p: p[0])
        # the step traces the edge of the dominated region: flat until the next frontier point when
        # smaller x is better, flat from the previous one when larger x is better
        ax.step([p[0] for p in line], [p[1] for p in line], where="post" if a.minimize_x else "pre",
                c="tab:red", lw=1, alpha=0.6)  # fmt: skip
        ax.scatter([p[0] for p in line], [p[1] for p in line], c="tab:red", marker="D", s=40, label="Pareto frontier")
        for i, above in zip(shown, _label_above([pts[i] for i in shown], a.log_y)):
            offset = (4, 4) if above else (4, -10)
            ax.annotate(str(rows[i].get("recipe")), pts[i], xytext=offset, textcoords="offset points", fontsize=7)
        ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)  # explicit: a matplotlibrc savefig.dpi would change the size
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


def _frontier_lines(table: list[dict], axes: list[_Axes]) -> list[tuple[str, str]]:
    """(frontier name, its recipes in frontier order, smallest / fastest first) per plot."""
    return [(a.label, " → ".join(str(table[i].get("recipe")) for i in _front(table, a)) or "not measured")
            for a in axes]  # fmt: skip


def _markdown(table: list[dict], title: str, axes: list[_Axes], protocol: str) -> str:
    cols = _columns(table, axes)
    cell = lambda s: s.replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = [f"# {title}", "", protocol, ""]
    lines.append("| " + " | ".join(c.header for c in cols) + " |")
    lines.append("|" + "|".join("---" if n == 0 else "---:" for n in range(len(cols))) + "|")
    for r in table:
        lines.append("| " + " | ".join(cell(c.text(c.value(r))) for c in cols) + " |")
    lines += ["", *(f"![{a.name}]({a.name})\n" for a in axes), "## Pareto frontier", ""]
    lines += [f"- **{name}**: {names}" for name, names in _frontier_lines(table, axes)]
    return "\n".join(lines) + "\n"


# Header click sorts the recipes (one <tbody> each, so a row's details move with it); missing values sort
# last either way. Row click shows or hides the details row under it.
_JS = """
const table = document.getElementById("spectrum"), heads = [...table.tHead.rows[0].cells];
const key = (body, i) => { const v = body.rows[0].cells[i].dataset.v; return v === "" ? null : isNaN(+v) ? v : +v; };
heads.forEach((th, i) => th.addEventListener("click", () => {
  const asc = th.getAttribute("aria-sort") !== "ascending";
  heads.forEach(h => h.removeAttribute("aria-sort"));
  th.setAttribute("aria-sort", asc ? "ascending" : "descending");
  [...table.tBodies].sort((a, b) => {
    const x = key(a, i), y = key(b, i);
    if (x === null || y === null) return (x === null) - (y === null);
    const c = typeof x === "number" && typeof y === "number" ? x - y
      : String(x).localeCompare(String(y), undefined, {numeric: true});
    return asc ? c : -c;
  }).forEach(body => table.appendChild(body));
}));
const show = (body, open) => {
  body.rows[1].hidden = !open;
  body.querySelector(".toggle").setAttribute("aria-expanded", String(open));
};
for (const body of table.tBodies) body.rows[0].addEventListener("click", () => show(body, body.rows[1].hidden));
const all = document.getElementById("expand-all");
all.addEventListener("click", () => {
  const open = all.textContent === "expand all";
  for (const body of table.tBodies) show(body, open);
  all.textContent = open ? "collapse all" : "expand all";
});
"""
_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:1.5em 2em;color:#222;background:#fff}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.15em;margin:1.6em 0 .5em}h3{font-size:1em;margin:.4em 0}
.meta,.hint{color:#555}.scroll{overflow-x:auto}
table{border-collapse:collapse;font-variant-numeric:tabular-nums}
th,td{border:1px solid #ddd;padding:4px 7px;text-align:right;white-space:nowrap}
th:first-child,td:first-child{text-align:left}
thead th{background:#f1f3f5;white-space:normal;vertical-align:bottom;min-width:5.5em}thead th:last-child{min-width:9em}
th button,.toggle{all:unset;cursor:pointer}th button:focus-visible,.toggle:focus-visible{outline:2px solid #3b82f6}
th[aria-sort=ascending] button::after{content:" ▲"}th[aria-sort=descending] button::after{content:" ▼"}
tbody>tr:first-child{cursor:pointer}tbody>tr:first-child:hover{background:#eef4ff}
.toggle::before{content:"▸ ";color:#888}.toggle[aria-expanded=true]::before{content:"▾ "}
tr.detail>td{background:#fafbfc;text-align:left;white-space:normal}
.panes{display:flex;flex-wrap:wrap;gap:1em;position:sticky;left:8px;max-width:calc(100vw - 6em)}
.panes section{flex:1 1 20em;min-width:0}
pre{background:#fff;border:1px solid #e3e3e3;padding:8px;margin:0;overflow:auto;max-height:28em}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(min(100%,440px),1fr));gap:1em}figure{margin:0}
figure img{width:100%;height:auto;border:1px solid #eee}figcaption{color:#555;font-size:.9em}
"""


def _pretty(d: Any) -> str:
    """A dict as aligned `key  value` lines (nested values as JSON); anything else as text."""
    if d is None or d == {}:
        return MISSING
    if not isinstance(d, dict):
        return str(d)
    width = max(len(str(k)) for k in d)

    def text(v: Any) -> Any:
        return MISSING if v is None else json.dumps(v, default=str) if isinstance(v, (dict, list)) else v

    return "\n".join(f"{k!s:<{width}}  {text(v)}" for k, v in d.items())


def _sort_value(raw: Any) -> str:
    """A cell's data-v: numbers as JS reads them, missing as empty (sorted last)."""
    if raw is None or (isinstance(raw, float) and math.isnan(raw)):
        return ""
    if isinstance(raw, float) and math.isinf(raw):
        return "Infinity" if raw > 0 else "-Infinity"
    return str(raw)


def _html_row(n: int, r: dict, cols: list[_Column]) -> str:
    """One recipe's <tbody>: its table row, then a hidden row with YAML, environment and every stored value."""
    e = html.escape
    cells = [f'<td data-v="{e(_sort_value(c.value(r)))}">{e(c.text(c.value(r)))}</td>' for c in cols]
    cells[0] = (f'<td data-v="{e(_sort_value(r.get("recipe")))}"><button type="button" class="toggle" '
                f'aria-expanded="false" aria-controls="d{n}">{e(cols[0].text(r.get("recipe")))}</button></td>')
    values = {k: v for k, v in r.items() if not k.startswith("_") and k not in ("recipe_yaml", "env") and v is not None}
    panes = (("recipe YAML", r.get("recipe_yaml") or MISSING), ("environment", _pretty(r.get("env"))),
             ("stored values", _pretty(values)))  # fmt: skip
    detail = "".join(f"<section><h3>{name}</h3><pre>{e(str(text))}</pre></section>" for name, text in panes)
    return (f'<tbody><tr>{"".join(cells)}</tr>\n<tr class="detail" id="d{n}" hidden><td colspan="{len(cols)}">'
            f'<div class="panes">{detail}</div></td></tr></tbody>')


def _th(c: _Column) -> str:
    """A header cell: a button that sorts, the help as tooltip; the table starts sorted by perplexity."""
    e = html.escape
    sort = ' aria-sort="ascending"' if c.header == "perplexity" else ""
    tip = f' title="{e(c.help)}"' if c.help else ""
    return f'<th{sort}{tip}><button type="button">{e(c.header)}</button></th>'


def _html(table: list[dict], title: str, axes: list[_Axes], protocol: str) -> str:
    e = html.escape
    cols = _columns(table, axes)
    head = "".join(_th(c) for c in cols)
    size = f'width="{round(FIG_INCHES[0] * DPI)}" height="{round(FIG_INCHES[1] * DPI)}"'
    body = "\n".join(_html_row(n, r, cols) for n, r in enumerate(table))
    figs = "\n".join(
        f'<figure><a href="{e(a.name)}"><img src="{e(a.name)}" alt="{e(a.y_label)} against {e(a.x_label)}" {size}>'
        f"</a><figcaption>{e(a.name)}: Pareto frontier by {e(a.label)}</figcaption></figure>"
        for a in axes
    )
    front = "".join(f"<li><b>{e(name)}</b>: {e(names)}</li>" for name, names in _frontier_lines(table, axes))
    return (
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f'<title>{e(title)}</title>\n<link rel="icon" href="data:,">\n<style>{_CSS}</style>\n'
        "<noscript><style>tr.detail[hidden]{display:table-row}</style></noscript>\n</head>\n<body>\n"
        f'<h1>{e(title)}</h1>\n<p class="meta">{e(protocol)} · {len(table)} recipes</p>\n'
        '<p class="hint">Click a column header to sort; click a recipe to show its YAML, environment and every '
        'stored value. <button type="button" id="expand-all">expand all</button></p>\n'
        f'<div class="scroll"><table id="spectrum">\n<thead><tr>{head}</tr></thead>\n{body}\n</table></div>\n'
        f'<h2>Plots</h2>\n<div class="plots">\n{figs}\n</div>\n<h2>Pareto frontier</h2>\n<ul>{front}</ul>\n'
        f"<script>{_JS}</script>\n</body>\n</html>\n"
    )


def write_report(rows: list[dict], out_dir: pathlib.Path, title: str = "effspec spectrum") -> list[pathlib.Path]:
    """Writes out_dir/report.md, report.html, results.csv and the plots; returns the paths.

    The plots are ppl_vs_size.png and ppl_vs_decode.png, and acc_vs_size.png
    when some row has tasks_avg_acc (a stale one from an earlier report is removed).
    """
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    axes = _axes(rows)
    table = _annotate(rows, axes)
    protocol = _protocol(table)
    plot_title = f"{title}\n{protocol}"
    paths = {name: out_dir / name for name in ("report.md", "report.html", "results.csv", *(a.name for a in axes))}
    # Plots first, so the md/html never link to an image that a killed run did not write.
    for a in axes:
        atomic_write_bytes(paths[a.name], _plot(rows, a, plot_title))
    atomic_write_text(paths["results.csv"], _csv(rows))
    atomic_write_text(paths["report.md"], _markdown(table, title, axes, protocol))
    atomic_write_text(paths["report.html"], _html(table, title, axes, protocol))
    for a in PLOTS:
        if a not in axes:
            (out_dir / a.name).unlink(missing_ok=True)
    log.info("wrote report for %d rows to %s", len(rows), out_dir)
    return list(paths.values())
