"""KV-cache compression on smollm2-135m: long-context perplexity, bytes held and decode speed; streaming past 8k.

`bench/decode.py --parts kv` runs `cache_rows` (its flags are added to that
script's); the streaming run is this script's own (`--parts streaming`, or the
default `--parts kv,streaming`). Issue 5's targets:

- quantized KV at 4 bits: cache bytes <= 0.3x of float at a 4,096-token
  context with long-context perplexity within 1% of the uncompressed cache;
  at 2 bits <= 0.2x within 5%;
- streaming cache: 16,384 tokens with flat memory and no perplexity blow-up
  past the model's trained context (8,192 positions for smollm2-135m), shown
  by a plot of perplexity against position.

Protocol.
- Text: `--kv-context` tokens (4,096) of WikiText-2 test from its start,
  scored by `effspec.measure.long_context` in chunks of `--kv-chunk` (64)
  tokens through one cache per setting; every prediction after the first chunk
  reads the compressed cache. Perplexity is compared with the same scoring
  through transformers' uncompressed `DynamicCache` ("float"). Chunks of 64
  (not 256) keep the KIVI residual window close to its decode-time fill
  instead of always flushed at chunk ends.
- Bytes: what the cache holds after the last chunk (effspec caches: packed
  codes + float16 scales/minimums + full-precision rows; DynamicCache and the
  peer: every tensor they keep), as a ratio to float's.
- Decode: greedy `effspec.generate` on the transformers engine with the cache
  (`--kv-prompt` 1,024-token prompt, `--kv-new-tokens` 64), tokens/s of the
  steps after the first, median of `--runs`; float = the same loop with a
  DynamicCache (the lean engine has its own static cache and is not the
  comparison here).
- Peer: transformers' own `QuantizedCache` with the optimum-quanto backend
  (4 and 2 bits, its defaults: group 64, residual 128), installed on first use
  with `pip install --target bench/.kv-peer-site optimum-quanto`; skipped with
  a note if that fails.
- Streaming: `--stream-tokens` (16,384) tokens of WikiText-2 test scored in
  chunks of `--kv-chunk` through `streaming:window=1024,sinks=4`, through the
  same window without sinks, and through DynamicCache (all 16k positions);
  perplexity per 1,024-token bin and held bytes after every chunk; a plot is
  written beside `--out` (`streaming.png`). `--stream-generate N` also
  generates N tokens greedily with the streaming cache, sampling held bytes
  and RSS every 1,024 tokens.

    python bench/decode_cache.py --kv-context 1024 --stream-tokens 2048 --settings float,kivi-4   # smoke
    python bench/decode_cache.py                                                                   # the protocol
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
DEFAULT_OUT = BENCH / "results" / "decode_cache.json"
WIKITEXT = BENCH.parent.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
PEER_SITE = BENCH / ".kv-peer-site"
TRAINED_CONTEXT = 8192

SETTINGS = {  # name -> effspec cache spec (None: DynamicCache) or ("quanto", bits) for the transformers peer
    "float": None,
    "kivi-8": "kivi:8",
    "kivi-4": "kivi:4",
    "kivi-2": "kivi:2",
    "kivi-2-g16": "kivi:bits=2,group=16",
    "kivi-2-g8": "kivi:bits=2,group=8",
    "kivi-2-g8-r32": "kivi:bits=2,group=8,residual=32",
    "h2o-50": "h2o:0.5",
    "h2o-20": "h2o:0.2",
    "streaming-1024": "streaming:window=1024",
    "hf-quanto-4": ("quanto", 4),
    "hf-quanto-2": ("quanto", 2),
}
TARGETS = [("kivi-4", 0.3, 1.0)] + [(name, 0.2, 5.0) for name in ("kivi-2", "kivi-2-g16", "kivi-2-g8", "kivi-2-g8-r32")]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kv-context", type=int, default=4096, help="tokens of the long-context perplexity text")
    p.add_argument("--kv-chunk", type=int, default=64, help="tokens scored per forward")
    p.add_argument("--kv-prompt", type=int, default=1024, help="prompt tokens of the decode-speed run")
    p.add_argument("--kv-new-tokens", type=int, default=64)
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"subset of {', '.join(SETTINGS)}")
    p.add_argument("--stream-tokens", type=int, default=16384, help="tokens of the streaming run (0: skip it)")
    p.add_argument("--stream-generate", type=int, default=0, help="also generate this many tokens with streaming")


def wikitext_ids(tokenizer, n: int):
    import torch

    text = WIKITEXT.read_text()
    ids = tokenizer(text[: n * 8])["input_ids"]  # ~4.5 characters a token on WikiText
    if len(ids) < n:
        ids = tokenizer(text)["input_ids"]
    if len(ids) < n:
        raise SystemExit(f"WikiText-2 test has only {len(ids)} tokens, fewer than {n}")
    return torch.tensor(ids[:n])


def ensure_quanto() -> str | None:
    """Make optimum-quanto importable (installed into bench/.kv-peer-site on first use); None or why not."""
    if not PEER_SITE.exists():
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(PEER_SITE), "optimum-quanto"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            return f"pip install optimum-quanto failed: {done.stderr.strip().splitlines()[-1:]}"
    if str(PEER_SITE) not in sys.path:
        sys.path.append(str(PEER_SITE))
    try:
        import optimum.quanto  # noqa: F401
    except Exception as e:  # noqa: BLE001 -- any import failure means no peer row
        return f"optimum-quanto does not import: {e}"
    return None


def tensor_tree_bytes(obj) -> int:
    """Bytes of the plain tensors inside a (possibly quanto subclass) tensor, or a list of them."""
    import torch

    if obj is None:
        return 0
    if isinstance(obj, (list, tuple)):
        return sum(tensor_tree_bytes(o) for o in obj)
    if hasattr(obj, "__tensor_flatten__") and type(obj) is not torch.Tensor:
        names, _ = obj.__tensor_flatten__()
        return sum(tensor_tree_bytes(getattr(obj, n)) for n in names)
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    return 0


def quanto_held_bytes(cache) -> int:
    total = 0
    for layer in cache.layers:
        total += tensor_tree_bytes(getattr(layer, "_quantized_keys", None))
        total += tensor_tree_bytes(getattr(layer, "_quantized_values", None))
        total += tensor_tree_bytes([layer.keys, layer.values]) if layer.keys is not None else 0
    return total


class MeasuredQuantoCache:
    """A factory of transformers' QuantizedCache(quanto) whose instances report `held_bytes`."""

    def __init__(self, model, bits: int):
        self.model, self.bits = model, bits

    def __call__(self):
        from transformers import QuantizedCache

        cache = QuantizedCache(backend="quanto", config=self.model.config, nbits=self.bits)
        cache.held_bytes = lambda: quanto_held_bytes(cache)
        return cache


def factory_for(name: str, model):
    spec = SETTINGS[name]
    if spec is None:
        return None
    if isinstance(spec, tuple):
        return MeasuredQuantoCache(model, spec[1])
    from effspec.kvcache import make_cache

    return lambda: make_cache(spec, model)


def decode_speed(model, prompt, new_tokens: int, factory, runs: int) -> float:
    from transformers import DynamicCache

    from effspec.generate import generate

    speeds = []
    for _ in range(runs + 1):  # the first is a warm-up
        cache = factory() if factory is not None else DynamicCache(config=model.config)
        gen = generate(model, prompt, new_tokens, cache=cache)
        speeds.append(gen.decode_tokens_per_s)
    return statistics.median(speeds[1:])


def cache_rows(args, model, tokenizer) -> list[dict]:
    """One row per setting: long-context perplexity, held bytes and decode speed, with ratios to float."""
    from effspec.measure.long_context import long_context_perplexity

    context, chunk, runs = args.kv_context, args.kv_chunk, args.runs  # `add_arguments`' flags (+ --runs)
    names = [n for n in args.settings.split(",") if n in SETTINGS]
    if "float" not in names:
        names.insert(0, "float")
    ids = wikitext_ids(tokenizer, max(context, args.kv_prompt))
    prompt = ids[: args.kv_prompt]
    rows, peer_note = [], None
    for name in names:
        row = {"part": "kv", "setting": name, "spec": str(SETTINGS[name]), "context": context, "chunk": chunk}
        if isinstance(SETTINGS[name], tuple):
            peer_note = peer_note or ensure_quanto() or ""
            if peer_note:
                rows.append({**row, "error": peer_note})
                continue
        try:
            factory = factory_for(name, model)
            r = long_context_perplexity(model, ids[:context], factory, chunk=chunk)
            row.update(perplexity=r.perplexity, cache_bytes=r.final_cache_bytes, score_seconds=r.seconds)
            row["decode_tokens_per_s"] = decode_speed(model, prompt, args.kv_new_tokens, factory, runs)
        except Exception as e:  # noqa: BLE001 -- one setting failing must not lose the others
            row["error"] = f"{type(e).__name__}: {e}"
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    base = next((r for r in rows if r["setting"] == "float" and "error" not in r), None)
    for r in rows:
        if base and "error" not in r:
            r["ppl_delta_pct"] = 100 * (r["perplexity"] / base["perplexity"] - 1)
            r["bytes_ratio"] = r["cache_bytes"] / base["cache_bytes"]
            r["decode_speedup"] = r["decode_tokens_per_s"] / base["decode_tokens_per_s"]
    return rows


def streaming_rows(args, model, tokenizer, plot_path: Path | None) -> list[dict]:
    """Perplexity by position and held bytes over 16k tokens: streaming, window without sinks, full cache."""
    from effspec.kvcache import make_cache
    from effspec.measure.long_context import long_context_perplexity

    n, chunk = args.stream_tokens, args.kv_chunk
    ids = wikitext_ids(tokenizer, n)
    runs = [("streaming-1024 (4 sinks)", "streaming:window=1024,sinks=4"),
            ("window-1024 (no sinks)", "streaming:window=1024,sinks=0"),
            ("full cache", None)]
    rows = []
    for label, spec in runs:
        trace = []
        factory = (lambda s=spec: make_cache(s, model)) if spec else None
        r = long_context_perplexity(model, ids, factory, chunk=chunk, on_chunk=lambda t, b: trace.append((t, b)))
        bins = r.by_position(1024)
        past = [p for start, p in bins if start > TRAINED_CONTEXT]
        within = [p for start, p in bins if 1024 < start <= TRAINED_CONTEXT]
        rows.append({"part": "streaming", "setting": label, "spec": str(spec), "tokens": n, "chunk": chunk,
                     "perplexity": r.perplexity, "bins": bins, "bytes_trace": trace[:: max(1, len(trace) // 64)],
                     "peak_cache_bytes": r.peak_cache_bytes, "final_cache_bytes": r.final_cache_bytes,
                     "ppl_within_trained": statistics.mean(within) if within else None,
                     "ppl_past_trained": statistics.mean(past) if past else None, "seconds": r.seconds})
        print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("bins", "bytes_trace")}), file=sys.stderr,
              flush=True)
    if plot_path is not None:
        plot(rows, plot_path)
    if args.stream_generate:
        rows.append(streaming_generation(model, tokenizer, args.stream_generate))
    return rows


def streaming_generation(model, tokenizer, n: int) -> dict:
    """Generate n tokens greedily with the streaming cache; held bytes and RSS every 1,024 tokens."""
    from effspec.generate import generate
    from effspec.kvcache import make_cache

    cache = make_cache("streaming:window=1024,sinks=4", model)
    prompt = wikitext_ids(tokenizer, 64)
    trace, count = [], [0]

    def on_token(_token: int) -> None:
        count[0] += 1
        if count[0] % 1024 == 0:
            trace.append((count[0], cache.held_bytes(), rss_mb()))

    t0 = time.perf_counter()
    gen = generate(model, prompt, n, cache=cache, on_token=on_token)
    return {"part": "streaming-generate", "setting": "streaming-1024 (4 sinks)", "new_tokens": gen.tokens.numel(),
            "seconds": time.perf_counter() - t0, "decode_tokens_per_s": gen.decode_tokens_per_s,
            "trace_tokens_bytes_rss_mb": trace}


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    for r in rows:
        xs, ys = zip(*r["bins"])
        top.plot(xs, ys, marker=".", label=r["setting"])
        bx, by = zip(*r["bytes_trace"])
        bottom.plot(bx, [b / 2**20 for b in by], label=r["setting"])
    for ax in (top, bottom):
        ax.axvline(TRAINED_CONTEXT, color="gray", ls="--", lw=1)
    top.set_yscale("log")
    top.set_ylabel("perplexity per 1,024 tokens")
    top.set_title("smollm2-135m on WikiText-2 test, scored in chunks through each cache")
    top.legend()
    bottom.set_ylabel("KV cache held (MiB)")
    bottom.set_xlabel("position (tokens); dashed: trained context 8,192")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _f(x, spec=".2f") -> str:
    return "-" if x is None else format(x, spec)


def table(rows: list[dict]) -> str:
    head = "| setting | spec | ppl | Δ% ppl | cache MiB | bytes vs float | decode tok/s | vs float |"
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['setting']} | {r['spec']} | error: {r['error']} | | | | | |")
            continue
        lines.append(f"| {r['setting']} | {r['spec']} | {r['perplexity']:.3f} | {_f(r.get('ppl_delta_pct'), '+.2f')} | "
                     f"{r['cache_bytes'] / 2**20:.2f} | {_f(r.get('bytes_ratio'), '.3f')} | "
                     f"{r['decode_tokens_per_s']:.2f} | {_f(r.get('decode_speedup'))}x |")
    return "\n".join(lines)


def streaming_table(rows: list[dict]) -> str:
    lines = ["| setting | tokens | ppl | ppl bins 1k-8k | ppl bins past 8k | peak MiB | final MiB |", "|" + "---|" * 7]
    for r in rows:
        if r["part"] != "streaming":
            continue
        lines.append(f"| {r['setting']} | {r['tokens']} | {r['perplexity']:.2f} | {_f(r['ppl_within_trained'])} | "
                     f"{_f(r['ppl_past_trained'])} | {r['peak_cache_bytes'] / 2**20:.1f} | "
                     f"{r['final_cache_bytes'] / 2**20:.1f} |")
    for r in rows:
        if r["part"] == "streaming-generate":
            lines.append(f"\nstreaming generation: {r['new_tokens']} tokens at {r['decode_tokens_per_s']:.2f} tok/s; "
                         f"(tokens, held bytes, RSS MB): {r['trace_tokens_bytes_rss_mb']}")
    return "\n".join(lines)


def verdicts(rows: list[dict]) -> list[str]:
    by = {r["setting"]: r for r in rows}
    out = []
    for name, max_ratio, max_delta in TARGETS:
        r = by.get(name)
        if r is None or "bytes_ratio" not in r:
            continue
        met = r["bytes_ratio"] <= max_ratio and r["ppl_delta_pct"] <= max_delta
        out.append(f"{name}: bytes {r['bytes_ratio']:.3f}x (target <= {max_ratio}x), perplexity "
                   f"{r['ppl_delta_pct']:+.2f}% (target <= {max_delta}%): {'met' if met else 'NOT met'}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(p)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--parts", default="kv,streaming", help="kv, streaming or both")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    from effspec.models import load_model

    loaded = load_model("smollm2-135m")
    parts = set(args.parts.split(","))
    rows = cache_rows(args, loaded.model, loaded.tokenizer) if "kv" in parts else []
    if rows:
        print(table(rows))
        print("\n".join(verdicts(rows)))
    if "streaming" in parts and args.stream_tokens:
        srows = streaming_rows(args, loaded.model, loaded.tokenizer, args.out.with_name("streaming.png"))
        print(streaming_table(srows))
        rows += srows
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows, indent=1))
    tmp.replace(args.out)
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
