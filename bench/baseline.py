"""Baseline benchmark: float32 and the simple compression settings on `smollm2-135m`.

Runs the BENCHMARKS.md protocols (../shared/BENCHMARKS.md) on the builtin model
`smollm2-135m` for five builtin recipes: `baseline` (float32), `rtn-w8`
(round-to-nearest, 8-bit, per output channel), `rtn-w4-g64` and `rtn-w3-g64`
(symmetric RTN, groups of 64) and `magnitude-50` (50% unstructured magnitude
pruning). Steps change a model in place, so each setting gets its own load
of the cached model (under a second), and nothing else stays resident.

- Perplexity: `wiki.test.raw` read whole, tokenized once, cut into
  non-overlapping windows of `--seqlen` (2048) tokens; the first `--windows`
  (32) windows are scored, PPL = exp(mean next-token NLL). float32, batch 1.
- Speed: decode is batch 1, a 128-token prompt, 128 greedy new tokens, one
  warm-up then the median of `--runs` (5) runs; prefill is one 2048-token
  window, tokens/s, median of `--runs`. Threads: `--threads` (1, as the
  BENCHMARKS.md figures), set with `torch.set_num_threads` and, when unset,
  `OMP_NUM_THREADS`.
- Memory: peak resident set of the process during the speed runs; only the
  setting's own model is resident.
- Size: bytes of weights as stored (packed), bits per parameter, overall and
  over the linear layers other than the output head.

Timings are medians of N runs on this machine only, and noisy (shared 2-core
hosts): compare settings through the ratios to float32 measured in the same run
(Δ% perplexity, decode speedup), never against figures from another run. MB
is 10^6 bytes. `--quick` is a smoke run (4 windows of 512 tokens, 2 runs,
32 new tokens, 512-token prefill), not the protocol.

Prints a table, writes the rows as JSON to `--out`, and ends stdout with one
JSON line holding all rows.

    python bench/baseline.py [--quick] [--recipes rtn-w4-g64 magnitude-50] [--threads 1]
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "wikitext-2-raw"
DEFAULT_OUT = REPO / "bench" / "results" / "baseline.json"
MODEL = "smollm2-135m"
RECIPES = ("baseline", "rtn-w8", "rtn-w4-g64", "rtn-w3-g64", "magnitude-50")
FLOAT = "baseline"
QUICK = {"windows": 4, "seqlen": 512, "runs": 2, "new_tokens": 32, "prefill_tokens": 512}

log = logging.getLogger("bench.baseline")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA),
                   help="WikiText-2 raw directory or any effspec data spec (default: ../shared/data/wikitext-2-raw)")
    p.add_argument("--windows", type=int, default=None, help="evaluation windows (default 32; 4 with --quick)")
    p.add_argument("--seqlen", type=int, default=None, help="tokens per window (default 2048; 512 with --quick)")
    p.add_argument("--runs", type=int, default=None, help="timed runs per speed figure (default 5; 2 with --quick)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as BENCHMARKS.md's figures)")
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), metavar="RECIPE",
                   help=f"subset to run (default: {' '.join(RECIPES)}); '{FLOAT}' is always added, "
                        "since the ratios are to float32 measured in the same run")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 4 windows of 512 tokens, 2 runs, 32 new tokens, 512-token prefill")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON file for the rows (default bench/results/baseline.json)")
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error(f"--threads must be at least 1, got {args.threads}")
    for name in ("windows", "seqlen", "runs"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name} must be at least 1, got {value}")
    unknown = [r for r in args.recipes if r not in RECIPES]
    if unknown:
        p.error(f"unknown recipe(s) {', '.join(unknown)}; expected some of {', '.join(RECIPES)}")
    args.recipes = [FLOAT] + [r for r in RECIPES if r in args.recipes and r != FLOAT]
    return args


def measure_config(args: argparse.Namespace):
    from effspec.pipeline import MeasureConfig

    base = QUICK if args.quick else {}
    windows = args.windows if args.windows is not None else base.get("windows", 32)
    seqlen = args.seqlen if args.seqlen is not None else base.get("seqlen", 2048)
    runs = args.runs if args.runs is not None else base.get("runs", 5)
    return MeasureConfig(windows=windows, seqlen=seqlen, prompt_tokens=128, new_tokens=base.get("new_tokens", 128),
                         prefill_tokens=base.get("prefill_tokens", 2048), runs=runs)


def add_ratios(rows: list[dict]) -> None:
    """Δ% perplexity and decode/prefill speedups against the float32 row of the same run."""
    ref = next(r for r in rows if r["recipe"] == FLOAT)
    for r in rows:
        r["perplexity_delta_pct"] = 100.0 * (r["perplexity"] / ref["perplexity"] - 1.0)
        r["decode_speedup"] = r["decode_tokens_per_s"] / ref["decode_tokens_per_s"]
        r["prefill_speedup"] = r["prefill_tokens_per_s"] / ref["prefill_tokens_per_s"]
        r["size_ratio"] = r["stored_bytes"] / ref["stored_bytes"]


def table(rows: list[dict]) -> str:
    header = ("setting", "perplexity", "Δ% vs float", "stored MB", "bits/param", "linear bits/param",
              "decode tok/s", "decode speedup", "prefill tok/s", "peak RSS MB", "apply s")
    lines = [header]
    for r in rows:
        lines.append((
            r["recipe"], f"{r['perplexity']:.3f}", f"{r['perplexity_delta_pct']:+.2f}",
            f"{r['stored_bytes'] / 1e6:.1f}", f"{r['bits_per_param']:.3f}", f"{r['linear_bits_per_param']:.3f}",
            f"{r['decode_tokens_per_s']:.2f}", f"{r['decode_speedup']:.2f}x", f"{r['prefill_tokens_per_s']:.1f}",
            f"{r['peak_rss_bytes'] / 1e6:.0f}", f"{r['apply_seconds']:.2f}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    fmt = lambda line: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))  # noqa: E731
    out = [fmt(lines[0]), "  ".join("-" * w for w in widths)] + [fmt(line) for line in lines[1:]]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    # before torch is imported, so OpenMP's pool matches; a value the user set is kept and reported
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    import torch
    import transformers

    from effspec.data import load_text
    from effspec.errors import UserError
    from effspec.models import fingerprint, load_model
    from effspec.pipeline import Evaluation, environment, run_recipe
    from effspec.recipe import load_recipe

    torch.set_num_threads(args.threads)
    transformers.utils.logging.set_verbosity_error()
    mcfg = measure_config(args)
    omp = os.environ["OMP_NUM_THREADS"]
    note = "" if omp == str(args.threads) else " (set by the caller; differs from --threads)"

    try:
        t0 = time.perf_counter()
        log.info("loading %s", MODEL)
        loaded = load_model(MODEL)
        fp = fingerprint(loaded.model)
        log.info("reading %s", args.data)
        source = load_text(args.data)
        ev = Evaluation(loaded, source, mcfg)
        recipes = [load_recipe(name) for name in args.recipes]
        rows = []
        for recipe in recipes:
            log.info("running %s: %s", recipe.name, recipe.describe_steps() or "float32, no steps")
            t1 = time.perf_counter()
            loaded = loaded or load_model(MODEL)
            row, _ = run_recipe(loaded, recipe, ev, store=None, model_fp=fp)
            loaded = None
            row["wall_seconds"] = time.perf_counter() - t1
            log.info("%s: ppl %.3f, decode %.2f tok/s, %.0f s", recipe.name, row["perplexity"],
                     row["decode_tokens_per_s"], row["wall_seconds"])
            if not math.isfinite(row["perplexity"]):
                log.warning("%s: perplexity is not finite (%s)", recipe.name, row["perplexity"])
            rows.append(row)
            gc.collect()
    except UserError as e:
        print(f"bench/baseline.py: error: {e}", file=sys.stderr)
        return 2
    add_ratios(rows)

    env = environment()
    meta = {
        "benchmark": "baseline", "model": MODEL, "model_fingerprint": fp, "data": str(args.data),
        "quick": args.quick, "measure": {**mcfg.__dict__}, "threads": args.threads, "omp_num_threads": omp,
        "total_seconds": time.perf_counter() - t0, "env": env,
    }
    record = {**meta, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1, default=str) + "\n", encoding="utf-8")

    m = mcfg
    print(f"effspec baseline benchmark: {MODEL} on {args.data}" + ("  [--quick: smoke run, not the protocol]" if args.quick else ""))
    print(f"perplexity: first {m.windows} windows of {m.seqlen} tokens of wiki.test.raw ({ev.windows.numel()} tokens)")
    print(f"speed: decode {m.prompt_tokens}-token prompt + {m.new_tokens} new tokens, prefill {m.prefill_tokens} tokens; "
          f"median of {m.runs} runs after a warm-up, on this machine")
    print(f"threads: torch {torch.get_num_threads()}, OMP_NUM_THREADS={omp}{note}; cpu: {env['cpu']}; "
          f"torch {env['torch']}, transformers {env['transformers']}, effspec {env['effspec']}")
    print()
    print(table(rows))
    print()
    print(f"Δ% and speedup are against float32 ({FLOAT}) in this run; MB = 1e6 bytes; peak RSS is the "
          f"process's during the timed runs, with only that setting's model loaded. Rows: {args.out}")
    print(json.dumps(record, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
