"""Pruning benchmark: effspec's pruning, layer-dropping, width-pruning and low-rank steps against llm-compressor in one run.

`smollm2-135m` under the BENCHMARKS.md protocol (../shared/BENCHMARKS.md), for
every setting of `SETTINGS_TABLE` (issue 4): float32; magnitude, Wanda and
SparseGPT at 50% unstructured, 2:4 and 4:8; SparseGPT 50% jointly with 4-bit
group-64 weights, and with GPTQ w4 g64 as a second step
(`sparsegpt-50+gptq-w4g64`, the pruned layers kept sparse; llm-compressor's
row is the joint one's); drop-layers removing 4 and 8 of the 30 blocks;
prune-width removing 20% and 35% of the parameters; SVD and ASVD keeping 80% and 60% of
the linear parameters, and ASVD with SVD-LLM's whitening (`scaling: whiten`)
at both ratios; and per-layer allocation against uniform at the same
budget: Wanda and SparseGPT at 70% uniform and with OWL's block sparsities,
ASVD 80% and 60% with its sensitivity-based rank search; Wanda and SparseGPT at 50%
and 2:4 again as `<name>-bf16`, effspec's calibration forwards in bf16 (as in
bench/quantize.py), against the same llm-compressor rows. Each setting runs
once per side it has:

- effspec: the setting's steps (a recipe: registry names and fields) applied
  to the model `effspec.models.load_model` loads. A step not registered (yet),
  or a field it does not take, makes the row "unavailable", not a crash.
- llm-compressor 0.14 (the peer), where it has the method: SparseGPTModifier
  and WandaPruningModifier at the same sparsity and N:M structure, for the
  joint setting SparseGPTModifier then GPTQModifier w4 g64 symmetric, and
  float32 as its own reference. Magnitude, drop-layers, prune-width, SVD and
  ASVD have no peer (`NO_PEER`): their llm-compressor columns say "-". It runs
  through bench/llmc_worker.py in bench/quantize.py's venv, created on first
  use, exactly as that benchmark drives it.

Both sides prune the linear layers of the 30 blocks and leave lm_head (tied to
the embeddings) dense: effspec by its steps' `ignore: [lm_head]` default,
llm-compressor by `ignore: ["re:.*lm_head"]`. Not `ignore: ["lm_head"]`: its
sparsity modifiers name each pruned module "<name>." (the layer's own empty
sub-name appended), so the plain name never matches and the head, and with it
the tied embeddings, would be pruned too (checked on 0.14).

Protocol: bench/quantize.py's (see its docstring: one tokens file of eval
windows, prompt and calibration ids read by both sides, the same threads, one
fresh process per setting and side, compression timed alone, peak RSS read
right after compressing, a row cache that lets an interrupted run resume),
with the calibration size of BENCHMARKS.md (32 x 2048), and:
- speed: decode (128-token prompt, greedy) and prefill (one window of
  `--prefill-tokens`, 2048, from the start of wiki.test.raw, one forward
  without a cache), each the median of `--runs` after a warm-up. effspec:
  `effspec.measure.speed`; llm-compressor: its worker on the checkpoint it
  saved and reloaded, decode as for bench/quantize.py and prefill by the same
  rule as effspec's (the worker's `prefill_speed`, asked for with `prefill`).
- stored bytes: effspec, what the model keeps (`effspec.measure.size`; pruned
  weights stay dense float unless a step packs them); llm-compressor, the
  tensors of its saved checkpoint, which compressed-tensors writes dense (it
  no longer has sparse compression): reported as measured.

Targets (issue 4): perplexity effspec/llm-compressor <= 1.00 on every setting
both sides run, compression time ratio <= 0.5; Wanda and SparseGPT at 50% and
at 2:4 each well below magnitude at the same sparsity (read here as perplexity
under 0.8x magnitude's, `TARGET_BELOW_MAGNITUDE`); SparseGPT 2:4 below Wanda
2:4; ASVD below SVD at each ratio (at equal parameter count); prune-width 20%
decoding >= 1.15x effspec float32's tokens/s. A perplexity ratio is one draw
where the result is chaotic: Wanda 2:4 on smollm2 gave 203-232 over six runs
whose column norms differed by a relative 1e-5, and llm-compressor's 213.1
falls inside (effspec/steps/prune/wanda.py).

Rows are cached in `--out` keyed by the protocol and the setting's definition
(not by the code: `--fresh` after code changes) and written after every row.
Prints a table and the targets, and ends stdout with one JSON line of every
row. Timings are one run each on a shared, noisy machine: compare ratios
within a run, not seconds across runs.

    python bench/prune.py --windows 1 --seqlen 256 --calib-samples 2 --calib-seqlen 256 --runs 1 --new-tokens 8 \\
        --settings float,magnitude-50,wanda-50,sparsegpt-24   # a smoke run
    python bench/prune.py                                   # the protocol (many hours; --settings splits it)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is no package: quantize.py is imported as a sibling

from quantize import (  # noqa: E402 -- the shared machinery of the quantization benchmark, reused as is
    MODEL,
    BF16,
    PROMPT_TOKENS,
    TARGET_PPL_RATIO,
    TARGET_TIME_RATIO,
    PeerUnavailable,
    SIDES,
    Setting,
    _f,
    _ratio,
    _status,
    bf16_variant,
    effspec_available,
    ensure_peer_venv,
    load_cache,
    model_dir,
    row_key,
    run_worker,
    save,
    weight_only,
    with_cached,
)
import quantize  # noqa: E402

BENCH = Path(__file__).resolve().parent
DEFAULT_OUT = BENCH / "results" / "prune.json"
TARGET_BELOW_MAGNITUDE = 0.8  # "well below magnitude": Wanda/SparseGPT perplexity under 0.8x magnitude's at that sparsity
TARGET_WIDTH_SPEEDUP = 1.15  # prune-width 20% decode over float32 decode

log = logging.getLogger("bench.prune")


# ---- the settings: effspec's steps and llm-compressor's modifiers for the same pruning --------------------------
NO_PEER = None  # llm-compressor has no such method: no peer row, "-" in its columns (unlike (), its float32 row)
LLMC_TARGETS = {"targets": ["Linear"], "ignore": ["re:.*lm_head"]}  # not ["lm_head"]: see the module docstring


def llmc_prune(modifier: str, mask: str, sparsity: float = 0.5) -> tuple:
    """One llm-compressor sparsity modifier; `mask` "0:0" is unstructured, "N:M" overrides the fraction."""
    return (modifier, {"sparsity": sparsity, "mask_structure": mask, **LLMC_TARGETS})


# name, effspec recipe steps (YAML flow list; registry names and config fields), llm-compressor modifiers in order.
# A step not registered (yet) gives an "unavailable" row until it lands. The names and fields of the steps still being
# written (wanda, sparsegpt, drop-layers, prune-width, svd, asvd) are the planned ones: if they change, change them here.
SETTINGS_TABLE: tuple[tuple[str, str, tuple | None], ...] = (
    ("float", "[]", ()),
    ("magnitude-50", "[{magnitude: {sparsity: 0.5}}]", NO_PEER),
    ("magnitude-24", '[{magnitude: {nm: "2:4"}}]', NO_PEER),
    ("magnitude-48", '[{magnitude: {nm: "4:8"}}]', NO_PEER),
    ("wanda-50", "[{wanda: {sparsity: 0.5}}]", (llmc_prune("WandaPruningModifier", "0:0"),)),
    ("wanda-24", '[{wanda: {nm: "2:4"}}]', (llmc_prune("WandaPruningModifier", "2:4"),)),
    ("wanda-48", '[{wanda: {nm: "4:8"}}]', (llmc_prune("WandaPruningModifier", "4:8"),)),
    ("sparsegpt-50", "[{sparsegpt: {sparsity: 0.5}}]", (llmc_prune("SparseGPTModifier", "0:0"),)),
    ("sparsegpt-24", '[{sparsegpt: {nm: "2:4"}}]', (llmc_prune("SparseGPTModifier", "2:4"),)),
    ("sparsegpt-48", '[{sparsegpt: {nm: "4:8"}}]', (llmc_prune("SparseGPTModifier", "4:8"),)),
    ("sparsegpt-50-w4g64", "[{sparsegpt: {sparsity: 0.5, bits: 4, group_size: 64}}]",
     (llmc_prune("SparseGPTModifier", "0:0"), ("GPTQModifier", weight_only(4, 64, True)))),
    ("drop-layers-4", "[{drop-layers: {n: 4}}]", NO_PEER),
    ("drop-layers-8", "[{drop-layers: {n: 8}}]", NO_PEER),
    ("prune-width-20", "[{prune-width: {ratio: 0.2}}]", NO_PEER),
    ("prune-width-35", "[{prune-width: {ratio: 0.35}}]", NO_PEER),
    ("svd-80", "[{svd: {ratio: 0.8}}]", NO_PEER),
    ("svd-60", "[{svd: {ratio: 0.6}}]", NO_PEER),
    ("asvd-80", "[{asvd: {ratio: 0.8}}]", NO_PEER),
    ("asvd-60", "[{asvd: {ratio: 0.6}}]", NO_PEER),
    ("asvd-80-whiten", "[{asvd: {ratio: 0.8, scaling: whiten}}]", NO_PEER),
    ("asvd-60-whiten", "[{asvd: {ratio: 0.6, scaling: whiten}}]", NO_PEER),
    # per-layer allocation against uniform at the same budget: OWL sparsity (llm-compressor's own OWL profile is
    # not wired here yet: effspec only), ASVD's sensitivity-based rank search
    ("wanda-70", "[{wanda: {sparsity: 0.7}}]", (llmc_prune("WandaPruningModifier", "0:0", 0.7),)),
    ("wanda-70-owl", "[{wanda: {sparsity: 0.7, allocation: owl}}]", NO_PEER),
    ("sparsegpt-70", "[{sparsegpt: {sparsity: 0.7}}]", (llmc_prune("SparseGPTModifier", "0:0", 0.7),)),
    ("sparsegpt-70-owl", "[{sparsegpt: {sparsity: 0.7, allocation: owl}}]", NO_PEER),
    ("asvd-80-search", "[{asvd: {ratio: 0.8, rank_search: sensitivity}}]", NO_PEER),
    ("asvd-60-search", "[{asvd: {ratio: 0.6, rank_search: sensitivity}}]", NO_PEER),
)
# quantize.Setting types modifiers as a tuple: NO_PEER (None) is a marker it never needed
SETTINGS = {name: Setting(name, steps, peer) for name, steps, peer in SETTINGS_TABLE}  # type: ignore[arg-type]
# the calibrated methods again with effspec's calibration forwards in bf16, against the same llm-compressor rows
for _name in ("wanda-50", "wanda-24", "wanda-48", "sparsegpt-50", "sparsegpt-24", "sparsegpt-48"):
    _s = SETTINGS[_name]
    SETTINGS[f"{_name}-bf16"] = bf16_variant(_s, _s.steps.replace("}}]", f", {BF16}}}}}]"))
# SparseGPT then GPTQ as two steps (the pruned layers stay sparse through GPTQ), as llm-compressor chains them: the
# joint setting's llm-compressor row is this one's too
_joint = SETTINGS["sparsegpt-50-w4g64"]
SETTINGS["sparsegpt-50+gptq-w4g64"] = Setting("sparsegpt-50+gptq-w4g64",
                                              "[{sparsegpt: {sparsity: 0.5}}, {gptq: {bits: 4, group_size: 64}}]",
                                              _joint.modifiers, peer_of=_joint.name)


def has_peer(name: str) -> bool:
    """Whether this setting runs llm-compressor itself (a bf16 variant shares its base setting's row)."""
    return name not in SETTINGS or (SETTINGS[name].modifiers is not NO_PEER and not SETTINGS[name].peer_of)


# flag, default, help: the counts of the protocol, each at least 1
COUNTS = (
    ("threads", 1, "threads for both sides, torch and OMP/MKL"),
    ("windows", 32, "evaluation windows"),
    ("seqlen", 2048, "tokens per evaluation window"),
    ("calib-samples", 32, "calibration sequences, the same ids on both sides"),
    ("calib-seqlen", 2048, "tokens per calibration sequence"),
    ("runs", 5, "timed decode and prefill runs after a warm-up, median"),
    ("new-tokens", quantize.NEW_TOKENS, "greedy tokens per decode run (the protocol's; fewer for smoke runs)"),
    ("prefill-tokens", 2048, "tokens of the prefill window"),
)


def count(text: str) -> int:
    """argparse type of the COUNTS flags: a whole number of at least 1."""
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def setting_names(text: str) -> list[str]:
    """argparse type of --settings: known names, run in SETTINGS order whatever order they are given in."""
    wanted = {s.strip() for s in text.split(",") if s.strip()}
    if not wanted or wanted - set(SETTINGS):
        raise argparse.ArgumentTypeError(f"unknown setting(s) {', '.join(sorted(wanted - set(SETTINGS))) or '(none given)'}; "
                                         f"expected some of {', '.join(SETTINGS)}")
    return [s for s in SETTINGS if s in wanted]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(quantize.DEFAULT_DATA), help="WikiText-2 raw directory (default ../shared/data/wikitext-2-raw)")
    p.add_argument("--settings", type=setting_names, default=list(SETTINGS),
                   help=f"comma-separated subset (default: all): {', '.join(SETTINGS)}")
    for flag, default, what in COUNTS:
        p.add_argument(f"--{flag}", type=count, default=default, help=f"{what} (default {default})")
    p.add_argument("--skip-peer", action="store_true", help="effspec only (no llm-compressor)")
    p.add_argument("--skip-effspec", action="store_true",
                   help="llm-compressor only (e.g. its slow rows in a second process beside an effspec run)")
    p.add_argument("--fresh", action="store_true", help="ignore rows cached in --out (e.g. after a code change)")
    p.add_argument("--retry-errors", action="store_true", help="run again the cached rows that ended in an error")
    p.add_argument("--peer-venv", type=Path, default=quantize.DEFAULT_PEER_VENV,
                   help="llm-compressor's venv, created when missing (default bench/.venv-llmc, shared with quantize.py)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON rows, also the resume cache (default bench/results/prune.json)")
    p.add_argument("--effspec-worker", type=Path, default=None, help=argparse.SUPPRESS)  # internal: one setting, effspec side
    args = p.parse_args(argv)
    if args.skip_peer and args.skip_effspec:
        p.error("--skip-peer and --skip-effspec leave nothing to run")
    return args


# ---- shared inputs ---------------------------------------------------------------------------------------------
def write_tokens(args: argparse.Namespace, path: Path) -> dict:
    """bench/quantize.py's tokens file (eval windows, prompt, prefill window, calibration ids); the protocol."""
    info = quantize.write_tokens(args, path)
    return {"model": MODEL, "data": str(args.data), "prompt_tokens": PROMPT_TOKENS,
            **{flag.replace("-", "_"): getattr(args, flag.replace("-", "_")) for flag, _, _ in COUNTS}, **info}


# ---- effspec's side (this script again, in a subprocess) ----------------------------------------------------------
class SharedCalibration:
    """What `effspec.pipeline.apply_recipe` asks of an Evaluation: here, the calibration ids both sides share."""

    def __init__(self, ids):
        self.ids = ids

    def calibration(self, recipe):
        return self.ids


def compress(spec: dict, tokens: dict) -> tuple:
    """Load the float model and apply the setting's steps (timed alone); the model and the row so far."""
    t_start = time.perf_counter()
    from effspec.measure.memory import peak_rss_bytes
    from effspec.measure.size import size
    from effspec.models import load_model
    from effspec.pipeline import apply_recipe
    from effspec.recipe import parse_recipe

    recipe = parse_recipe(spec["recipe"], f"setting {spec['setting']}")
    model = load_model(MODEL).model
    before = size(model)
    out = {"model_bytes": before.stored_bytes, "model_params": before.params, "load_seconds": time.perf_counter() - t_start}
    t0 = time.perf_counter()
    model = apply_recipe(model, recipe, SharedCalibration(tokens["calib"]))  # type: ignore[arg-type]
    out["compress_seconds"] = time.perf_counter() - t0
    out["peak_rss_bytes"] = peak_rss_bytes()  # VmHWM since the process started: load + compression
    return model, out


def measure(model, tokens: dict, spec: dict) -> dict:
    """Size, perplexity, decode and prefill of the compressed model, as the protocol says."""
    from effspec.measure.perplexity import perplexity
    from effspec.measure.size import size
    from effspec.measure.speed import speed
    from effspec.pipeline import environment

    s = size(model)
    out = {"stored_bytes": s.stored_bytes, "params": s.params, "bits_per_param": s.bits_per_param,
           "linear_params": s.linear_params, "sparsity": s.sparsity}
    t0 = time.perf_counter()
    p = perplexity(model, tokens["windows"])
    out.update(perplexity=p.perplexity, eval_tokens=p.eval_tokens, eval_seconds=time.perf_counter() - t0)
    sp = speed(model, tokens["prefill"], prompt_tokens=PROMPT_TOKENS, new_tokens=spec["new_tokens"],
              prefill_tokens=tokens["prefill"].numel(), runs=spec["runs"])
    out.update(decode_tokens_per_s=sp.decode_tokens_per_s, prefill_tokens_per_s=sp.prefill_tokens_per_s,
               prefill_tokens=sp.prefill_tokens, speed_peak_rss_bytes=sp.peak_rss_bytes, threads=sp.threads,
               versions={k: v for k, v in environment().items() if k in ("effspec", "torch", "transformers")})
    return out


def effspec_worker(spec_path: Path) -> int:
    """Subprocess body: one setting on effspec's side; its row, or its error in one line, written to spec["out"]."""
    spec = json.loads(spec_path.read_text())
    t_start = time.perf_counter()
    try:
        import torch

        torch.set_num_threads(spec["threads"])
        tokens = torch.load(spec["tokens"])
        model, out = compress(spec, tokens)
        out.update(measure(model, tokens, spec), worker_seconds=time.perf_counter() - t_start)
    except Exception as e:  # noqa: BLE001 -- this setting's error; the other settings go on
        traceback.print_exc()
        Path(spec["out"]).write_text(json.dumps({"error": " ".join(f"{type(e).__name__}: {e}".split())[:600]}))
        return 1
    Path(spec["out"]).write_text(json.dumps(out))
    return 0


# ---- one run: rows, resume cache, the two sides -------------------------------------------------------------------
def ordered(rows: list[dict], cache: dict[str, dict]) -> list[dict]:
    """This run's rows plus cached rows of other settings (quantize.with_cached), in SETTINGS order, effspec first."""
    rank = {name: i for i, name in enumerate(SETTINGS)}
    return sorted(with_cached(rows, cache), key=lambda r: (rank.get(r["setting"], len(rank)), SIDES.index(r["side"])))


class Run:
    """This run's protocol, its cached and new rows, and where its workers write; every finished row is saved at once."""

    def __init__(self, args: argparse.Namespace, protocol: dict, work: Path):
        from effspec.pipeline import environment

        self.args, self.protocol, self.work = args, protocol, work
        self.logs = args.out.parent / f"{args.out.stem}-logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.cache = {} if args.fresh else load_cache(args.out, protocol, not args.retry_errors)
        self.meta = {"benchmark": "prune", "protocol": protocol, "env": environment()}
        self.rows: list[dict] = []
        self.base = {"tokens": str(work / "tokens.pt"), "threads": args.threads, "runs": args.runs,
                     "new_tokens": args.new_tokens}
        self._peer: Path | str | None = None  # llm-compressor's python, or why it cannot run; found on first need

    def all_rows(self) -> list[dict]:
        # rows another run (other --settings, same --out and protocol) wrote meanwhile are kept too
        return ordered(self.rows, {**self.cache, **load_cache(self.args.out, self.protocol, True)})

    def run(self, setting: Setting, side: str) -> None:
        key = row_key(self.protocol, setting, side)
        if key in self.cache:
            log.info("%s [%s]: cached", setting.name, side)
            row = self.cache[key]
        else:
            out = self.effspec(setting) if side == "effspec" else self.llmcompressor(setting)
            status = out.pop("status", "error" if "error" in out else "ok")
            if status == "ok":
                log.info("%s [%s]: ppl %.3f, compress %.1f s, decode %.2f tok/s, prefill %.1f tok/s", setting.name, side,
                         out["perplexity"], out["compress_seconds"], out["decode_tokens_per_s"],
                         out.get("prefill_tokens_per_s", float("nan")))
            else:
                log.error("%s [%s]: %s", setting.name, side, out["error"])
            row = {"setting": setting.name, "side": side, "key": key, "status": status, **out}
        self.rows.append(row)
        save(self.args.out, {**self.meta, "rows": self.all_rows()})

    def effspec(self, setting: Setting) -> dict:
        why = effspec_available(setting)
        if why:
            return {"status": "unavailable", "error": why}
        log.info("%s [effspec]: %s", setting.name, setting.steps)
        spec = {**self.base, "setting": setting.name, "recipe": setting.recipe_yaml()}
        return run_worker([sys.executable, str(Path(__file__).resolve()), "--effspec-worker"], spec, self.work,
                          f"{setting.name}-effspec", self.args.threads, self.logs)

    def llmcompressor(self, setting: Setting) -> dict:
        if self._peer is None:
            try:
                self._peer = ensure_peer_venv(self.args.peer_venv)
            except PeerUnavailable as e:
                self._peer = f"peer unavailable: {e}"
        if isinstance(self._peer, str):
            return {"status": "unavailable", "error": self._peer}
        log.info("%s [llm-compressor]: %s", setting.name, ", ".join(m[0] for m in setting.modifiers) or "float32")
        spec = {**self.base, "setting": setting.name, "model_dir": str(model_dir()), "prefill": True,
                "save_dir": str(self.work / f"{setting.name}-llmc"), "modifiers": [list(m) for m in setting.modifiers]}
        return run_worker([str(self._peer), str(BENCH / "llmc_worker.py")], spec, self.work, f"{setting.name}-llmc",
                          self.args.threads, self.logs)


# ---- ratios, table, targets -------------------------------------------------------------------------------------
# column, row field, format, scale, whether an effspec/llmc ratio column follows
METRICS = (
    ("ppl", "perplexity", ".3f", 1.0, True),
    ("compress s", "compress_seconds", ".1f", 1.0, True),
    ("peak RSS MB", "peak_rss_bytes", ".0f", 1e-6, False),
    ("stored MB", "stored_bytes", ".1f", 1e-6, False),
    ("decode tok/s", "decode_tokens_per_s", ".2f", 1.0, True),
    ("prefill tok/s", "prefill_tokens_per_s", ".1f", 1.0, True),
)


def comparisons(rows: list[dict]) -> list[dict]:
    """bench/quantize.py's comparisons (both sides and their ratios per setting) plus whether a peer exists."""
    comps = quantize.comparisons(rows, SETTINGS)
    for c in comps:
        c["peer"] = has_peer(c["setting"])
    return comps


def table(comps: list[dict]) -> str:
    header = ["setting", "params M", "sparsity %"]
    for column, _, _, _, ratio in METRICS:
        header += [f"{column} effspec", "llmc"] + (["ratio"] if ratio else [])
    lines = [header]
    for c in comps:
        e, p = c["effspec"], c["llmcompressor"]
        line = [c["setting"], _f(e.get("params"), ".1f", 1e-6), _f(e.get("sparsity"), ".1f", 100)]
        for _, field, spec, scale, ratio in METRICS:
            line += [_f(e.get(field), spec, scale), _f(p.get(field), spec, scale)]
            line += [_f(c.get(f"{field}_ratio"), ".3f")] if ratio else []
        lines.append(line)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(s.ljust(w) if i == 0 else s.rjust(w) for i, (s, w) in enumerate(zip(line, widths))) for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def notes(comps: list[dict]) -> list[str]:
    """Why a row has no figures (a setting without a peer needs no word), and llm-compressor checkpoints that do not
    reload to the model its oneshot returned."""
    out = []
    for c in comps:
        sides = [("effspec", c["effspec"])] + ([("llm-compressor", c["llmcompressor"])] if c["peer"] else [])
        out += [f"  {c['setting']} [{side}]: {_status(r)}" for side, r in sides if _status(r)]
        a, b = c["llmcompressor"].get("first_window_ppl_in_memory"), c["llmcompressor"].get("first_window_ppl_reloaded")
        if a and b and abs(b / a - 1) > 0.01:
            out.append(f"  {c['setting']} [llm-compressor]: first-window perplexity {a:.3f} in memory, {b:.3f} reloaded "
                       "(the table's perplexity is the in-memory model's, its speeds the reloaded checkpoint's)")
    return out


def peer_target(comps: list[dict], metric: str, what: str, limit: float) -> str:
    """effspec/llm-compressor `metric` <= `limit` on every setting both sides ran (float32 aside)."""
    both = [c for c in comps if c[f"{metric}_ratio"] is not None and c["setting"] != "float"]
    label = f"{what} effspec/llm-compressor <= {limit:.2f}"
    if not both:
        return f"{label}: not run (no pruned setting with both sides ok)"
    miss = [f"{c['setting']} {c[f'{metric}_ratio']:.3f}" for c in both if c[f"{metric}_ratio"] > limit]
    return f"{label}: {len(both) - len(miss)}/{len(both)} settings" + (f"; missed by {', '.join(miss)}" if miss else "")


def below(by: dict[str, dict], a: str, b: str, limit: float, field: str = "perplexity") -> str:
    """Target "a's `field` < limit x b's" on effspec's rows, or "not run" naming the rows missing."""
    label = f"{a} {field} < {limit:.2f}x {b}'s"
    missing = [name for name in (a, b) if name not in by]
    if missing:
        return f"{label}: not run ({', '.join(missing)} missing)"
    x = by[a][field] / by[b][field]
    return f"{label}: {by[a][field]:.3f} vs {by[b][field]:.3f} = {x:.3f}x, {'met' if x < limit else 'missed'}"


def verdicts(comps: list[dict]) -> list[str]:
    """The issue's targets, one line each: met or missed with the figures, or not run."""
    by = {c["setting"]: c["effspec"] for c in comps if c["effspec"].get("status") == "ok"}
    out = [peer_target(comps, "perplexity", "perplexity", TARGET_PPL_RATIO),
           peer_target(comps, "compress_seconds", "compression time", TARGET_TIME_RATIO)]
    out += [below(by, f"{method}-{mask}", f"magnitude-{mask}", TARGET_BELOW_MAGNITUDE)
            for method in ("wanda", "sparsegpt") for mask in ("50", "24")]
    out.append(below(by, "sparsegpt-24", "wanda-24", 1.0))
    for ratio in ("80", "60"):
        line = below(by, f"asvd-{ratio}", f"svd-{ratio}", 1.0)
        a, b = by.get(f"asvd-{ratio}", {}).get("params"), by.get(f"svd-{ratio}", {}).get("params")
        if a and b and abs(a / b - 1) > 0.005:
            line += f" (not at equal parameter count: {a / 1e6:.2f}M vs {b / 1e6:.2f}M)"
        out.append(line)
    out += [below(by, f"{m}-70-owl", f"{m}-70", 1.0) for m in ("wanda", "sparsegpt")]
    for ratio in ("80", "60"):  # ASVD with its paper's rank search, and whitened, against uniform SVD and ASVD
        out += [below(by, f"asvd-{ratio}-{variant}", f"{base}-{ratio}", 1.0)
                for variant in ("search", "whiten") for base in ("svd", "asvd")]
    fl, w = by.get("float"), by.get("prune-width-20")
    label = f"prune-width-20 decode >= {TARGET_WIDTH_SPEEDUP:.2f}x float32's"
    if fl and w:
        x = w["decode_tokens_per_s"] / fl["decode_tokens_per_s"]
        out.append(f"{label}: {w['decode_tokens_per_s']:.2f} vs {fl['decode_tokens_per_s']:.2f} tok/s = {x:.2f}x, "
                   f"{'met' if x >= TARGET_WIDTH_SPEEDUP else 'missed'}")
    else:
        out.append(f"{label}: not run ({', '.join(n for n, r in (('float', fl), ('prune-width-20', w)) if not r)} missing)")
    return out


def report(args: argparse.Namespace, run: Run, seconds: float) -> None:
    """Save every row with the comparisons, print the table and the targets, end with the JSON line."""
    rows = run.all_rows()
    comps = comparisons(rows)
    record = {**run.meta, "total_seconds": seconds,
              "comparisons": [{k: v for k, v in c.items() if k not in SIDES} for c in comps], "rows": rows}
    save(args.out, record)
    env, pr = run.meta["env"], run.protocol
    peer: dict = next((r["versions"] for r in rows if r["side"] == "llmcompressor" and r.get("versions")), {})
    print(f"effspec pruning benchmark: {MODEL} on {args.data}\n"
          f"perplexity: first {args.windows} windows of {args.seqlen} tokens of wiki.test.raw ({pr['eval_tokens']} tokens); "
          f"calibration: {args.calib_samples} x {args.calib_seqlen} tokens of wiki.valid.raw, the same ids on both sides\n"
          f"speed: decode {PROMPT_TOKENS}-token prompt + {args.new_tokens} greedy tokens, prefill one "
          f"{args.prefill_tokens}-token window; median of {args.runs} after a warm-up; {args.threads} thread(s) on "
          f"both sides; cpu: {env['cpu']}\n"
          f"effspec {env['effspec']} (torch {env['torch']}, transformers {env['transformers']}); llm-compressor "
          f"{peer.get('llmcompressor', '-')} (transformers {peer.get('transformers', '-')})\n")
    print(table(comps))
    if lines := notes(comps):
        print("\nnotes:\n" + "\n".join(lines))
    print("\n" + "\n".join(verdicts(comps)))
    print(f"\nratios are effspec / llm-compressor in this run; '-' in the llmc columns of magnitude, drop-layers, "
          f"prune-width, svd and asvd: no peer method. MB = 1e6 bytes; sparsity = pruned fraction of effspec's linear "
          f"weights (effspec.measure.size); peak RSS is the setting's own process (load + compression); llm-compressor stores sparse "
          f"weights dense. Rows: {args.out}; worker logs: {run.logs}")
    print(json.dumps(record, default=str))


# ---- main -----------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    if args.effspec_worker is not None:
        return effspec_worker(args.effspec_worker)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="effspec-bench-prune-"))
    try:
        log.info("tokenizing %s and sampling calibration ids", args.data)
        try:
            protocol = write_tokens(args, work / "tokens.pt")
        except Exception as e:  # noqa: BLE001 -- bad data path or too little text: one line, exit 2
            print(f"bench/prune.py: error: {e}", file=sys.stderr)
            return 2
        run = Run(args, protocol, work)
        for name in args.settings:
            sides = SIDES if has_peer(name) and not args.skip_peer else SIDES[:1]
            for side in sides[1:] if args.skip_effspec else sides:
                run.run(SETTINGS[name], side)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(args, run, time.perf_counter() - t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
