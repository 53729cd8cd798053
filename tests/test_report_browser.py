"""The HTML report as a person sees it: headless Chromium opens it from disk, with no server and no network.

Checked: the table has one row per recipe, every plot decodes, sorting and the
per-recipe details work, and the page logs no console errors. Chromium is
Debian's `chromium` package; when it is missing the test installs it with
apt-get (as root, needs the network) and skips, never fails, when it cannot.

Console errors are caught twice, with the standard library only: Chromium's
own log (`--enable-logging=stderr` prints every page console message), and a
probe script added to a copy of the page that records errors, failed loads,
image sizes and the results of clicking headers and rows into the DOM, which
`--dump-dom` then returns. test_probe_catches_errors checks both on a broken page.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

from effspec.report import write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
INSTALL_SECONDS = 180
RUN_SECONDS = 45
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--enable-logging=stderr", "--v=0", "--window-size=1400,1900",
         "--hide-scrollbars", "--virtual-time-budget=10000"]  # fmt: skip

# Records errors, then on load what the page shows and how it reacts to clicks, into hidden <pre> elements.
PROBE = """<script>
(() => {
  const errors = [], note = m => errors.push(String(m)), error = console.error.bind(console);
  console.error = (...a) => { note("console.error: " + a.join(" ")); error(...a); };
  addEventListener("error", e => note(e.message ? `${e.message} (${e.filename}:${e.lineno})`
    : `failed to load <${e.target.tagName.toLowerCase()}> ${e.target.src || e.target.href}`), true);
  addEventListener("unhandledrejection", e => note("unhandled rejection: " + e.reason));
  addEventListener("load", () => {
    const out = {};
    try {
      out.images = [...document.images].map(i => [i.getAttribute("src"), i.complete, i.naturalWidth, i.naturalHeight]);
      const table = document.getElementById("spectrum");
      const order = () => [...table.tBodies].map(b => b.rows[0].cells[0].dataset.v);
      const sort = text => {
        const th = [...table.tHead.rows[0].cells].find(c => c.textContent.trim() === text);
        th.querySelector("button").click();
        return [order(), th.getAttribute("aria-sort")];
      };
      out.initial = order();
      out.size = [sort("stored MB"), sort("stored MB")];
      out.acc = [sort("avg acc %"), sort("avg acc %")];
      out.recipe = sort("recipe");
      out.paired = [...table.tBodies].every(b => b.rows[1].textContent.includes("name: " + b.rows[0].cells[0].dataset.v));
      const body = table.tBodies[0], shown = b => b.rows[1].getBoundingClientRect().height > 0;
      out.closed = shown(body);
      body.rows[0].click();
      out.opened = [shown(body), body.querySelector(".toggle").getAttribute("aria-expanded"), body.rows[1].innerText];
      body.rows[0].click();
      out.reclosed = shown(body);
      document.getElementById("expand-all").click();
      out.all_open = [...table.tBodies].every(shown);
    } catch (e) { note("probe: " + e); }
    for (const [id, v] of [["probe", out], ["errors", errors]]) {
      const pre = Object.assign(document.createElement("pre"), {id, hidden: true, textContent: JSON.stringify(v)});
      document.body.appendChild(pre);
    }
  });
})();
</script>"""


def _find() -> str | None:
    for c in (shutil.which("chromium"), "/usr/bin/chromium"):
        if c and os.access(c, os.X_OK):
            return c
    return None


@pytest.fixture(scope="session")
def chromium() -> str:
    """Path of chromium, installed with apt-get when missing; skips the test when that is not possible."""
    found = _find()
    if found:
        return found
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip("chromium is not installed and apt-get is not available to root to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    deadline = time.monotonic() + INSTALL_SECONDS
    # --no-install-recommends: the recommends (mesa drivers, upower, ...) are not needed headless and double the time
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]):
        try:
            p = subprocess.run(cmd, env=env, capture_output=True, text=True,
                               timeout=max(1.0, deadline - time.monotonic()))  # fmt: skip
        except subprocess.TimeoutExpired:
            pytest.skip(f"chromium is not installed: `{' '.join(cmd)}` took over {INSTALL_SECONDS} s")
        if p.returncode:
            pytest.skip(f"chromium is not installed: `{' '.join(cmd)}` failed: {p.stderr.strip()[-300:]}")
    found = _find()
    if not found:
        pytest.skip("apt-get installed chromium but no chromium executable was found")
    return found


def _chromium(chromium: str, work: Path, *args: str) -> tuple[str, str]:
    """(stdout, stderr) of one headless run with a fresh profile; the whole process group is killed on timeout."""
    profile = tempfile.mkdtemp(dir=work, prefix="profile-")
    cmd = [chromium, *FLAGS, f"--user-data-dir={profile}", *args]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True) as p:
        try:
            out, err = p.communicate(timeout=RUN_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
            pytest.fail(f"chromium did not finish within {RUN_SECONDS} s: {' '.join(cmd)}")
    assert p.returncode == 0, err[-2000:]
    return out, err


def _console(stderr: str) -> list[str]:
    """Page console messages and uncaught errors in chromium's log (its own dbus/gpu noise is not the page's)."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


class Dom(HTMLParser):
    """What the tests read from a dumped DOM: recipe rows, details rows, images, and the probe's <pre> texts."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.rows: list[str] = []  # class of each <tr> inside a <tbody>: "" for a recipe, "detail" for its details
        self.imgs: list[str] = []
        self.pre: dict[str, str] = {}
        self._tbody = False
        self._pre: str | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        self._tbody |= tag == "tbody"
        if tag == "tr" and self._tbody:
            self.rows.append(a.get("class") or "")
        elif tag == "img":
            self.imgs.append(a.get("src") or "")
        elif tag == "pre" and a.get("id"):
            self._pre = a["id"]
            self.pre[self._pre] = ""

    def handle_endtag(self, tag: str) -> None:
        self._tbody &= tag != "tbody"
        if tag == "pre":
            self._pre = None

    def handle_data(self, data: str) -> None:
        if self._pre:
            self.pre[self._pre] += data


def _row(recipe: str, ppl: float, mb: float, decode: float | None, acc: float | None) -> dict:
    tasks = {} if acc is None else {
        "tasks_avg_acc": acc, "acc_hellaswag": acc - 0.1, "acc_norm_hellaswag": acc - 0.08, "acc_piqa": acc + 0.1,
        "kld_mean": (0.5 - acc) / 3, "kld_p99": 0.5 - acc, "top1_agreement": acc + 0.4, "bits_per_byte": 0.8 + ppl / 100,
    }  # fmt: skip
    return {
        "recipe": recipe, "recipe_hash": f"h-{recipe}", "recipe_yaml": f"name: {recipe}\nsteps:\n  - rtn: {{bits: 4}}  # <&>\n",
        "model": "smollm2-135m", "data": "wikitext2", "steps": "rtn(bits=4)", "perplexity": ppl,
        "eval_windows": 8, "eval_seqlen": 512, "stored_bytes": int(mb * 1e6), "bits_per_param": mb * 8e6 / 134.5e6,
        "decode_tokens_per_s": decode, "apply_seconds": 1.5, "created": "2025-01-01T00:00:00",
        "env": {"python": "3.11.7", "torch": "2.13.0", "transformers": "4.56.0", "cpu": "AMD EPYC", "threads": 8},
        **tasks,
    }  # fmt: skip


ROWS = [_row("rtn-w4", 24.0, 90.0, 40.0, 0.45), _row("baseline", 20.0, 538.0, 15.0, 0.5),
        _row("rtn-w8", 20.5, 270.0, None, 0.49), _row("wanda-50", 30.0, 540.0, 14.0, None)]  # fmt: skip


def test_report_in_chromium(chromium: str, tmp_path: Path) -> None:
    out = tmp_path / "report"
    paths = write_report(ROWS, out, title="Browser test spectrum")
    page = out / "report.html"
    assert out / "acc_vs_size.png" in paths

    # the page as shipped: table rows, images present on disk, nothing on the console
    dom_text, err = _chromium(chromium, tmp_path, "--dump-dom", page.as_uri())
    dom = Dom(dom_text)
    assert dom.rows.count("") == len(ROWS) and dom.rows.count("detail") == len(ROWS)
    assert dom.imgs == ["ppl_vs_size.png", "ppl_vs_decode.png", "acc_vs_size.png"]
    assert all((out / src).read_bytes().startswith(PNG_MAGIC) for src in dom.imgs)
    assert _console(err) == []

    # a copy with the probe: images decoded, sorting and details work, no errors of any kind
    probe_page = out / "report.probe.html"
    probe_page.write_text(page.read_text().replace('<meta charset="utf-8">', '<meta charset="utf-8">' + PROBE, 1))
    dom_text, err = _chromium(chromium, tmp_path, "--dump-dom", probe_page.as_uri())
    dom = Dom(dom_text)
    assert json.loads(dom.pre["errors"]) == [] and _console(err) == []
    got = json.loads(dom.pre["probe"])
    assert got["images"] == [[src, True, 960, 660] for src in ("ppl_vs_size.png", "ppl_vs_decode.png", "acc_vs_size.png")]
    assert got["initial"] == ["baseline", "rtn-w8", "rtn-w4", "wanda-50"]  # by perplexity
    assert got["size"] == [[["rtn-w4", "rtn-w8", "baseline", "wanda-50"], "ascending"],
                           [["wanda-50", "baseline", "rtn-w8", "rtn-w4"], "descending"]]  # fmt: skip
    assert got["acc"] == [[["rtn-w4", "rtn-w8", "baseline", "wanda-50"], "ascending"],
                          [["baseline", "rtn-w8", "rtn-w4", "wanda-50"], "descending"]]  # missing stays last
    assert got["recipe"] == [["baseline", "rtn-w4", "rtn-w8", "wanda-50"], "ascending"]
    assert got["paired"] is True  # each details row moved with its recipe
    assert got["closed"] is False and got["reclosed"] is False and got["all_open"] is True
    shown, expanded, text = got["opened"]
    assert shown is True and expanded == "true"
    assert "name: baseline" in text and "rtn: {bits: 4}  # <&>" in text  # YAML, unescaped by the browser
    assert "transformers  4.56.0" in text and "cpu           AMD EPYC" in text  # environment, aligned
    assert "acc_norm_hellaswag" in text  # every stored value

    # what a person sees: a screenshot of the page as shipped
    shot = tmp_path / "report.png"
    _chromium(chromium, tmp_path, f"--screenshot={shot}", page.as_uri())
    assert shot.read_bytes().startswith(PNG_MAGIC) and shot.stat().st_size > 50_000  # a blank page is a few KB


def test_probe_catches_errors(chromium: str, tmp_path: Path) -> None:
    """The checks above are only worth something if they see errors: a broken page must trip both."""
    page = tmp_path / "broken.html"
    page.write_text('<!doctype html><html><head><meta charset="utf-8">' + PROBE + "<title>x</title></head><body>"
                    '<img src="missing.png"><script>console.error("boom"); notDefined();</script></body></html>')
    dom_text, err = _chromium(chromium, tmp_path, "--dump-dom", page.as_uri())
    errors = " | ".join(json.loads(Dom(dom_text).pre["errors"]))
    assert "console.error: boom" in errors and "notDefined is not defined" in errors
    assert "failed to load <img>" in errors and "missing.png" in errors
    assert "probe: TypeError" in errors  # no table: the probe's own failure is reported, not swallowed
    console = " | ".join(_console(err))
    assert '"boom"' in console and "Uncaught ReferenceError: notDefined is not defined" in console
