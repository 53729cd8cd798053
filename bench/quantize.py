"""Quantization benchmark: effspec's quantization steps against llm-compressor (and llama.cpp's decode) in one run.

`smollm2-135m` under the BENCHMARKS.md protocol (../shared/BENCHMARKS.md), for
every setting of `SETTINGS`: float32; RTN, GPTQ, AWQ and AWQ+GPTQ at w4 g64,
w3 g64, w4 per-channel and w2 g64; rotation+GPTQ at w3 g64 and w2 g64;
SmoothQuant W8A8 and plain W8A8; and each GPTQ setting again as `<name>-bf16`,
effspec's calibration forwards under bf16 autocast (`calibration_dtype:
bfloat16`, faster on CPUs with AVX512-BF16; the Hessians stay float32), against
the same llm-compressor row (it runs once). Each setting runs twice, once per side:

- effspec: the setting's steps (a recipe, effspec's registry names and fields)
  applied to the model loaded by `effspec.models.load_model`. A step not
  registered (yet) makes the row "step not available", not a crash.
- llm-compressor 0.14 (the peer): `oneshot` with the matching modifiers, in
  its own venv (`--peer-venv`, default bench/.venv-llmc, created on first use:
  torch==2.13.0 first, the CPU build on this disk, then llmcompressor, which
  pins transformers 5.17), driven through bench/llmc_worker.py on effspec's
  cached float32 directory of the same model.

The two sides get the same grid per setting (bits, group, symmetric: RTN/GPTQ
symmetric as llm-compressor's W4A16 preset and effspec's defaults; AWQ with a
zero point, as the paper and llm-compressor's W4A16_ASYM), lm_head left in
float on both, and otherwise each library's defaults (llm-compressor's AWQ
uses its duo scaling; its rotation is SpinQuant R1+R4 random Hadamard, the same
rotations as effspec's `rotate`).

Protocol, identical for both sides:
- Calibration: `--calib-samples` (16) sequences of `--calib-seqlen` (2048)
  tokens drawn once by effspec's sampler (`effspec.data.calibration_samples`,
  random.Random(0) offsets in wiki.valid.raw), saved to a tokens file that
  both sides read: effspec passes them to its steps, llm-compressor gets them
  as a dataset of input_ids.
- Perplexity: the first `--windows` (32) windows of `--seqlen` (2048) tokens of
  wiki.test.raw (tokenized once, here), batch 1, PPL = exp(mean NLL of every
  predicted token). llm-compressor's side is scored, by the same rule coded in
  its worker, on the model `oneshot` returns; its decode is timed on its saved
  compressed checkpoint loaded back with transformers, and a note flags a
  checkpoint whose first-window perplexity does not match the in-memory model's.
- Decode: batch 1, the first 128 tokens of wiki.test.raw as the prompt, 128
  greedy new tokens, one warm-up then the median of `--runs` (5).
- Prefill: one forward of the first `--prefill-tokens` (2048) tokens of
  wiki.test.raw, no cache, logits of the last position only; median of
  `--runs` after a warm-up (effspec.measure.speed's rule, coded alike in the
  peer's worker). This is where W8A8's integer matmuls pay: compare a W8A8
  row's prefill with the float row's.
- Threads: `--threads` (1) for both: OMP_NUM_THREADS / MKL_NUM_THREADS and
  torch.set_num_threads in every worker; llama.cpp gets the same count.
- Each setting of each side runs in a fresh subprocess: compression wall time
  is the steps (effspec) or `oneshot` (llm-compressor) alone; peak RSS is that
  process's VmHWM right after compressing (model load included); stored bytes
  are the tensors the compressed model keeps (effspec: packed tensors in
  memory, `effspec.measure.size`; llm-compressor: the tensors of its
  compressed safetensors checkpoint).
- llama.cpp: the builtin's Q4_1 GGUF (`effspec.models.smollm2_gguf_path()`)
  through node-llama-cpp's prebuilt llama.cpp binaries (npm, installed into
  `--llamacpp-dir`, default bench/.venv-llamacpp), same prompt ids, threads and
  decode rule; its ratio to effspec's packed w4 decode is printed.

Targets (from the issue): perplexity effspec/llm-compressor <= 1.00 on every
setting both run; compression time ratio <= 0.5; effspec's peak RSS while
compressing <= the float model's bytes + 2 GiB; packed w4 decode >= 2x
float32 decode.

Rows are cached in `--out` per (setting, side), keyed by the protocol and the
setting's definition (not by the code: `--fresh` after code changes), and
written after every row, so an interrupted run resumes. Prints a table and ends
stdout with one JSON line holding every row. Timings are one run each on a
shared, noisy machine: compare the ratios of one run, not seconds across runs.

    python bench/quantize.py --windows 1 --seqlen 256 --calib-samples 2 --calib-seqlen 256 \\
        --settings float,rtn-w4g64,gptq-w4g64             # a smoke run
    python bench/quantize.py                               # the protocol (many hours)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "wikitext-2-raw"
DEFAULT_OUT = BENCH / "results" / "quantize.json"
DEFAULT_PEER_VENV = BENCH / ".venv-llmc"
DEFAULT_LLAMACPP_DIR = BENCH / ".venv-llamacpp"
MODEL = "smollm2-135m"
# torch first: the CPU build on this disk (anything else pulls a multi-GB CUDA build); llmcompressor then keeps it
PEER_INSTALL = (("torch==2.13.0",), ("llmcompressor==0.14.0.1",))
# node-llama-cpp's JS API and its prebuilt linux-x64 llama.cpp (CPU variants, zen4 to haswell); --omit=optional
# skips the CUDA and Vulkan builds, --ignore-scripts its postinstall (which would offer to build from source)
LLAMACPP_INSTALL = ("node-llama-cpp@3.22.1", "@node-llama-cpp/linux-x64@3.22.1")
PROMPT_TOKENS, NEW_TOKENS, PREFILL_TOKENS = 128, 128, 2048  # BENCHMARKS.md speed protocol
TARGET_PPL_RATIO, TARGET_TIME_RATIO, TARGET_RSS_OVER_MODEL, TARGET_W4_SPEEDUP = 1.00, 0.5, 2 * 2**30, 2.0
SIDES = ("effspec", "llmcompressor")

log = logging.getLogger("bench.quantize")


# ---- the settings: effspec's steps and llm-compressor's modifiers for the same quantization ---------
@dataclass(frozen=True)
class Setting:
    name: str
    steps: str  # effspec recipe steps, YAML flow list of {step: {field: value}}
    modifiers: tuple  # llm-compressor: ((class name, kwargs), ...) in order; () = float32, no oneshot
    peer_of: str = ""  # the setting whose llm-compressor row is this one's too (the same modifiers, run once)

    def recipe_yaml(self) -> str:
        return f"name: {self.name}\nsteps: {self.steps}\n"


BF16 = "calibration_dtype: bfloat16"  # effspec's calibration forwards under bf16 autocast (AVX512-BF16 CPUs)


def bf16_variant(setting: Setting, steps: str) -> Setting:
    """`setting` with effspec's calibration in bf16 (`steps` say where); its peer is `setting`'s llm-compressor row."""
    return Setting(f"{setting.name}-bf16", steps, setting.modifiers, peer_of=setting.name)


GRIDS = {"w4g64": (4, 64), "w3g64": (3, 64), "w4ch": (4, 0), "w2g64": (2, 64)}  # name -> (bits, group; 0 = per channel)
W8A8 = {"scheme": "W8A8", "targets": ["Linear"], "ignore": ["lm_head"]}  # int8 per-channel weights, per-token dynamic acts


def weight_only(bits: int, group: int, symmetric: bool) -> dict:
    """llm-compressor's config_groups for integer weights on effspec's grid (group 0 = one scale per output channel)."""
    weights = {"num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": "group" if group else "channel"}
    if group:
        weights["group_size"] = group
    return {"config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}}, "ignore": ["lm_head"]}


def _grid(bits: int, group: int, symmetric: bool) -> str:
    return f"bits: {bits}, group_size: {group}, symmetric: {str(symmetric).lower()}"


def build_settings() -> dict[str, Setting]:
    out = [Setting("float", "[]", ())]
    for g, (bits, group) in GRIDS.items():
        sym, asym = _grid(bits, group, True), _grid(bits, group, False)
        out += [
            Setting(f"rtn-{g}", f"[{{rtn: {{{sym}}}}}]", (("QuantizationModifier", weight_only(bits, group, True)),)),
            gptq := Setting(f"gptq-{g}", f"[{{gptq: {{{sym}}}}}]", (("GPTQModifier", weight_only(bits, group, True)),)),
            bf16_variant(gptq, f"[{{gptq: {{{sym}, {BF16}}}}}]"),
            Setting(f"awq-{g}", f"[{{awq: {{{asym}}}}}]",
                    (("AWQModifier", {}), ("QuantizationModifier", weight_only(bits, group, False)))),
            Setting(f"awqgptq-{g}", f"[{{awq: {{{asym}, quantize: false}}}}, {{gptq: {{{asym}}}}}]",
                    (("AWQModifier", {}), ("GPTQModifier", weight_only(bits, group, False)))),
        ]
    for g in ("w3g64", "w2g64"):
        bits, group = GRIDS[g]
        rotated = Setting(f"rotategptq-{g}", f"[{{rotate: {{seed: 0}}}}, {{gptq: {{{_grid(bits, group, True)}}}}}]",
                          (("SpinQuantModifier", {"rotations": ["R1", "R4"], "transform_type": "random-hadamard"}),
                           ("GPTQModifier", weight_only(bits, group, True))))
        out += [rotated, bf16_variant(rotated, f"[{{rotate: {{seed: 0}}}}, {{gptq: {{{_grid(bits, group, True)}, {BF16}}}}}]")]
    # the model's own grid: smollm2's float weights came from 4-bit group-32 asymmetric blocks (GGML Q4_1), so RTN on
    # that grid must give float32's perplexity back (within 0.5%); anything more means grouping or packing is wrong
    out.append(Setting("rtn-w4g32-asym", f"[{{rtn: {{{_grid(4, 32, False)}}}}}]",
                       (("QuantizationModifier", weight_only(4, 32, False)),)))
    # the w4 g64 layers plus an 8-bit per-channel output head: what llama.cpp's 4-bit files do with the head
    head8 = weight_only(4, 64, True)
    head8["config_groups"]["group_0"]["targets"] = ["re:.*_proj$"]
    head8["config_groups"]["group_1"] = {"targets": ["lm_head"], "weights": {"num_bits": 8, "type": "int",
                                                                              "symmetric": True, "strategy": "channel"}}
    head8["ignore"] = []
    out.append(Setting("rtn-w4g64-head8", f"[{{rtn: {{{_grid(4, 64, True)}}}}}, "
                       f"{{rtn: {{{_grid(8, 0, True)}, targets: [lm_head], ignore: []}}}}]",
                       (("QuantizationModifier", head8),)))
    out += [
        Setting("smoothquant-w8a8", "[{smoothquant: {alpha: 0.5}}]",
                (("SmoothQuantModifier", {"smoothing_strength": 0.5}), ("QuantizationModifier", W8A8))),
        Setting("w8a8", "[{w8a8: {}}]", (("QuantizationModifier", W8A8),)),
    ]
    return {s.name: s for s in out}


SETTINGS = build_settings()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="WikiText-2 raw directory (default ../shared/data/wikitext-2-raw)")
    p.add_argument("--settings", default=",".join(SETTINGS),
                   help=f"comma-separated subset (default: all): {', '.join(SETTINGS)}")
    p.add_argument("--threads", type=int, default=1, help="threads for every side (default 1)")
    p.add_argument("--windows", type=int, default=32, help="evaluation windows (default 32)")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per evaluation window (default 2048)")
    p.add_argument("--calib-samples", type=int, default=16, help="calibration sequences, both sides (default 16)")
    p.add_argument("--calib-seqlen", type=int, default=2048, help="tokens per calibration sequence (default 2048)")
    p.add_argument("--runs", type=int, default=5, help="timed decode runs after a warm-up, median (default 5)")
    p.add_argument("--new-tokens", type=int, default=NEW_TOKENS,
                   help=f"greedy tokens per decode run (default {NEW_TOKENS}, the protocol; fewer for smoke runs)")
    p.add_argument("--prefill-tokens", type=int, default=PREFILL_TOKENS,
                   help=f"tokens of the timed prefill window (default {PREFILL_TOKENS}, the protocol)")
    p.add_argument("--skip-peer", action="store_true", help="effspec only (no llm-compressor)")
    p.add_argument("--skip-llamacpp", action="store_true", help="no llama.cpp decode row")
    p.add_argument("--fresh", action="store_true", help="ignore rows cached in --out (e.g. after a code change)")
    p.add_argument("--retry-errors", action="store_true", help="run again the cached rows that ended in an error")
    p.add_argument("--peer-venv", type=Path, default=DEFAULT_PEER_VENV,
                   help="llm-compressor's venv, created when missing (default bench/.venv-llmc)")
    p.add_argument("--llamacpp-dir", type=Path, default=DEFAULT_LLAMACPP_DIR,
                   help="npm prefix for node-llama-cpp, created when missing (default bench/.venv-llamacpp)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON rows, also the resume cache (default bench/results/quantize.json)")
    p.add_argument("--effspec-worker", type=Path, default=None, help=argparse.SUPPRESS)  # internal: one setting, effspec side
    args = p.parse_args(argv)
    if args.effspec_worker is not None:
        return args
    for name in ("threads", "windows", "seqlen", "calib_samples", "calib_seqlen", "runs", "new_tokens", "prefill_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    wanted = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in SETTINGS]
    if unknown or not wanted:
        p.error(f"unknown setting(s) {', '.join(unknown) or '(none given)'}; expected some of {', '.join(SETTINGS)}")
    args.settings = [s for s in SETTINGS if s in wanted]
    return args


# ---- shared inputs: eval windows, prompt and calibration ids, tokenized once ---------------------
def write_tokens(args: argparse.Namespace, path: Path) -> dict:
    """Tokenize the data once with effspec and save the windows, the prompt, the prefill window and the calibration
    ids for all sides; the protocol fields they define. The prefill window starts where the prompt does."""
    import torch

    from effspec.data import calibration_samples, calibration_tokens, eval_windows, load_text, tokenize
    from effspec.models import load_model

    loaded = load_model(MODEL)  # also creates the cached HF directory the peer loads
    source = load_text(args.data)
    ids = tokenize(loaded.tokenizer, source.eval_text)
    windows = eval_windows(ids, args.seqlen, args.windows)
    calib = calibration_samples(calibration_tokens(loaded.tokenizer, source, windows.numel()),
                                args.calib_samples, args.calib_seqlen, seed=0)
    tokens = {"windows": windows, "prompt": ids[:PROMPT_TOKENS].clone(), "calib": calib}
    digest = hashlib.sha256(b"".join(t.numpy().tobytes() for t in tokens.values())).hexdigest()[:16]
    tokens["prefill"] = ids[: args.prefill_tokens].clone()
    if tokens["prefill"].numel() < args.prefill_tokens:
        raise ValueError(f"{args.data}: the eval text has {tokens['prefill'].numel()} tokens, fewer than "
                         f"--prefill-tokens {args.prefill_tokens}")
    torch.save(tokens, path)
    return {"tokens_digest": digest, "eval_tokens": int(windows.numel()), "calib_tokens": int(calib.numel()),
            "prefill_tokens": args.prefill_tokens,
            "prefill_digest": hashlib.sha256(tokens["prefill"].numpy().tobytes()).hexdigest()[:16]}


def model_dir() -> Path:
    """effspec's cached HF directory of the model (written by its first load), loaded by the peer as is."""
    from effspec.fsutil import cache_dir
    from effspec.models import FORMAT_VERSION

    path = cache_dir() / "models" / f"{MODEL}-v{FORMAT_VERSION}"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: effspec did not cache {MODEL} there (has FORMAT_VERSION changed?)")
    return path


def thread_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", EFFSPEC_PROGRESS="0",
               TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    return env


# ---- effspec's side (this script again, in a subprocess) ---------------------------------------------
def effspec_worker(spec_path: Path) -> int:
    """Subprocess body: load, apply the steps on the shared calibration ids (timed), measure, write JSON."""
    import traceback

    spec = json.loads(spec_path.read_text())
    t_start = time.perf_counter()
    out: dict
    try:
        import torch

        torch.set_num_threads(spec["threads"])
        from effspec.measure.memory import peak_rss_bytes
        from effspec.measure.perplexity import perplexity
        from effspec.measure.size import size
        from effspec.block_cache import block_cache
        from effspec.models import load_model
        from effspec.pipeline import check_finite
        from effspec.recipe import parse_recipe
        from effspec.registry import get_step

        recipe = parse_recipe(spec["recipe"], f"setting {spec['setting']}")
        tokens = torch.load(spec["tokens"])
        model = load_model(MODEL).model
        out = {"model_bytes": size(model).stored_bytes, "load_seconds": time.perf_counter() - t_start}
        t0 = time.perf_counter()
        for name, cfg in recipe.steps:
            info = get_step(name)
            with block_cache():  # as effspec.pipeline.apply_recipe runs every step
                model = info.apply(model, cfg, tokens["calib"] if info.needs_calibration else None)
            check_finite(model, name)
        model.eval()
        out["compress_seconds"] = time.perf_counter() - t0
        out["peak_rss_bytes"] = peak_rss_bytes()  # VmHWM since the process started: load + compression
        s = size(model)
        out.update(stored_bytes=s.stored_bytes, bits_per_param=s.bits_per_param,
                   linear_bits_per_param=s.linear_bits_per_param)
        t0 = time.perf_counter()
        p = perplexity(model, tokens["windows"])
        out.update(perplexity=p.perplexity, eval_tokens=p.eval_tokens, eval_seconds=time.perf_counter() - t0)
        from effspec.measure.speed import speed
        from effspec.pipeline import environment

        sp = speed(model, tokens["prefill"], prompt_tokens=PROMPT_TOKENS, new_tokens=spec["new_tokens"],
                   prefill_tokens=tokens["prefill"].numel(), runs=spec["runs"])
        out.update(decode_tokens_per_s=sp.decode_tokens_per_s, prefill_tokens_per_s=sp.prefill_tokens_per_s,
                   prefill_tokens=sp.prefill_tokens, threads=sp.threads,
                   peak_rss_end_bytes=peak_rss_bytes(), worker_seconds=time.perf_counter() - t_start,
                   versions={k: v for k, v in environment().items() if k in ("effspec", "torch", "transformers")})
        code = 0
    except Exception as e:  # noqa: BLE001 -- reported as this setting's error; other settings go on
        traceback.print_exc()
        out = {"error": " ".join(f"{type(e).__name__}: {e}".split())[:600]}
        code = 1
    spec_path.with_suffix(".out.json").write_text(json.dumps(out))
    return code


# ---- running one side of one setting -------------------------------------------------------------------
def run_worker(cmd: list[str], spec: dict, work: Path, name: str, threads: int, logs: Path) -> dict:
    """Run a worker subprocess on `spec`; its JSON result plus wall time, or {"error": ...} with its last line."""
    spec_path = work / f"{name}.json"
    out_path = spec_path.with_suffix(".out.json")
    spec["out"] = str(out_path)
    spec_path.write_text(json.dumps(spec))
    out_path.unlink(missing_ok=True)
    log_path = logs / f"{name}.log"
    t0 = time.perf_counter()
    with log_path.open("w") as f:
        proc = subprocess.run(cmd + [str(spec_path)], env=thread_env(threads), stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if out_path.is_file():
        out = json.loads(out_path.read_text())
    else:
        out = {"error": error_line(log_path.read_text(errors="replace"), proc.returncode)}
    out["process_seconds"] = wall
    out["log"] = str(log_path)
    return out


def error_line(text: str, code: int) -> str:
    """The last line of a log that names an error (Python's or Node's), else its last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    named = [line for line in lines if "Error" in line or "Exception" in line]
    return ((named or lines or [f"exit code {code}"])[-1])[:600]


def calibrated(name: str) -> bool:
    """Whether the setting's effspec recipe has a step that reads calibration data (False for RTN, W8A8)."""
    from effspec.recipe import parse_recipe
    from effspec.registry import get_step

    steps = parse_recipe(SETTINGS[name].recipe_yaml(), f"setting {name}").steps
    return any(get_step(step).needs_calibration for step, _ in steps)


def effspec_available(setting: Setting) -> str | None:
    """None when every step of the setting is registered with those fields, else why not."""
    from effspec.errors import UserError
    from effspec.recipe import parse_recipe

    try:
        parse_recipe(setting.recipe_yaml(), f"setting {setting.name}")
    except UserError as e:
        return f"step not available: {e}"
    except Exception as e:  # noqa: BLE001 -- e.g. a step module that fails to import
        return f"steps not importable: {type(e).__name__}: {e}"
    return None


class PeerUnavailable(Exception):
    pass


def _install(cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip() and "warn" not in line.lower()]
        raise PeerUnavailable(f"{' '.join(cmd[-2:])}: {(lines[-1] if lines else f'exit code {proc.returncode}')[:300]}")


def ensure_peer_venv(venv: Path) -> Path:
    """The venv's python, creating the venv (torch first, then llm-compressor) when missing."""
    exe = venv / "bin" / "python"
    stamp = venv / ".bench-installed"
    want = " ".join(p for step in PEER_INSTALL for p in step)
    if exe.is_file() and stamp.is_file() and stamp.read_text().strip() == want:
        return exe
    log.info("creating llm-compressor's virtual environment in %s (about 4 minutes, once)", venv)
    t0 = time.perf_counter()
    _install([sys.executable, "-m", "venv", str(venv)])
    for pkgs in PEER_INSTALL:
        _install([str(exe), "-m", "pip", "install", "-q", *pkgs])
    stamp.write_text(want + "\n")
    log.info("llm-compressor installed in %.0f s", time.perf_counter() - t0)
    return exe


# ---- llama.cpp decode through node-llama-cpp's prebuilt binaries ------------------------------------
LLAMACPP_JS = r"""
import {createRequire} from "module";
import {readFileSync, writeFileSync} from "fs";
const spec = JSON.parse(readFileSync(process.argv[2], "utf8"));
const require = createRequire(spec.prefix + "/");
const {getLlama} = await import(require.resolve("node-llama-cpp"));
const llama = await getLlama({gpu: false, build: "never", logLevel: "error", maxThreads: spec.threads});
const model = await llama.loadModel({modelPath: spec.gguf});
const context = await model.createContext({contextSize: 1024, threads: spec.threads, batchSize: 512});
const sequence = context.getSequence();
async function generate() {  // greedy: prefill the prompt ids, then one token at a time
  await sequence.clearHistory();
  const t0 = performance.now();
  let t1 = 0, n = 0;
  for await (const token of sequence.evaluate(spec.prompt, {temperature: 0})) {
    n += 1;
    if (n === 1) t1 = performance.now();
    if (n >= spec.new_tokens) break;
  }
  const t2 = performance.now();
  return {prefill: spec.prompt.length / (t1 - t0) * 1000, decode: (n - 1) / (t2 - t1) * 1000};
}
await generate();  // warm-up
const runs = [];
for (let i = 0; i < spec.runs; i++) runs.push(await generate());
const median = (xs) => { const s = [...xs].sort((a, b) => a - b); const m = s.length >> 1; return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2; };
writeFileSync(spec.out, JSON.stringify({
  decode_tokens_per_s: median(runs.map((r) => r.decode)), prefill_tokens_per_s: median(runs.map((r) => r.prefill)),
  decode_runs: runs.map((r) => r.decode), threads: spec.threads, build: llama.buildType,
  cpu_features: llama.systemInfo, versions: {
    "node-llama-cpp": JSON.parse(readFileSync(spec.prefix + "/node_modules/node-llama-cpp/package.json", "utf8")).version,
    "llama.cpp": llama.llamaCppRelease?.release},
}));
"""


def ensure_llamacpp(prefix: Path) -> Path:
    """The npm prefix holding node-llama-cpp and its prebuilt linux-x64 binaries, installed when missing."""
    stamp = prefix / ".bench-installed"
    want = " ".join(LLAMACPP_INSTALL)
    if stamp.is_file() and stamp.read_text().strip() == want:
        return prefix
    if shutil.which("npm") is None or shutil.which("node") is None:
        raise PeerUnavailable("node and npm are needed for llama.cpp's prebuilt binaries (apt-get install nodejs npm)")
    log.info("installing node-llama-cpp's prebuilt llama.cpp into %s (under a minute, once)", prefix)
    prefix.mkdir(parents=True, exist_ok=True)
    (prefix / "package.json").write_text('{"private": true}\n')
    env = dict(os.environ, NODE_LLAMA_CPP_SKIP_DOWNLOAD="true")
    _install(["npm", "install", "--ignore-scripts", "--omit=optional", "--no-audit", "--no-fund", *LLAMACPP_INSTALL],
             env=env, cwd=prefix)
    stamp.write_text(want + "\n")
    return prefix


def run_llamacpp(args: argparse.Namespace, tokens_path: Path, work: Path, logs: Path) -> dict:
    import torch

    from effspec.models import smollm2_gguf_path

    prefix = ensure_llamacpp(args.llamacpp_dir.resolve())
    script = work / "llamacpp_decode.mjs"
    script.write_text(LLAMACPP_JS)
    prompt = torch.load(tokens_path)["prompt"].tolist()
    spec = {"prefix": str(prefix), "gguf": str(smollm2_gguf_path()), "prompt": prompt, "new_tokens": args.new_tokens,
            "runs": args.runs, "threads": args.threads}
    return run_worker(["node", str(script)], spec, work, "llamacpp", args.threads, logs)


# ---- cache, ratios, table ------------------------------------------------------------------------------
def row_key(protocol: dict, setting: Setting | None, side: str) -> str:
    what = {"protocol": protocol, "side": side,
            "setting": None if setting is None else [setting.name, setting.steps, setting.modifiers]}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def load_cache(path: Path, protocol: dict, errors: bool) -> dict[str, dict]:
    """Finished rows of an earlier run with the same protocol: "ok", and "error" when `errors`; never "unavailable"."""
    try:
        old = json.loads(path.read_text())
        if old.get("protocol") != protocol:
            return {}
        rows = old["rows"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}
    keep = ("ok", "error") if errors else ("ok",)
    return {r["key"]: r for r in rows if r.get("key") and r.get("status") in keep}


def with_cached(rows: list[dict], cache: dict[str, dict]) -> list[dict]:
    """This run's rows plus the cached rows of other settings, in SETTINGS order, effspec before llm-compressor."""
    keys = {r["key"] for r in rows}
    every = rows + [r for k, r in cache.items() if k not in keys]
    order = {name: i for i, name in enumerate(list(SETTINGS) + ["llamacpp-q4_1"])}
    sides = {side: i for i, side in enumerate(SIDES + ("llamacpp",))}
    return sorted(every, key=lambda r: (order.get(r["setting"], len(order)), sides.get(r["side"], len(sides))))


def save(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".json.{os.getpid()}.tmp")  # per process: concurrent runs may share --out
    tmp.write_text(json.dumps(record, indent=1, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _ratio(a, b):
    return a / b if a is not None and b else None


def comparisons(rows: list[dict], settings: dict[str, Setting] | None = None) -> list[dict]:
    """Per setting: both sides' figures side by side and effspec/llm-compressor ratios (a `peer_of` setting
    against the llm-compressor row of the setting it names)."""
    settings = SETTINGS if settings is None else settings
    by = {(r["setting"], r["side"]): r for r in rows}
    out = []
    for name in dict.fromkeys(r["setting"] for r in rows if r["side"] in SIDES):
        peer = settings[name].peer_of if name in settings and settings[name].peer_of else name
        e, p = by.get((name, "effspec"), {}), by.get((peer, "llmcompressor"), {})
        ok_e, ok_p = e.get("status") == "ok", p.get("status") == "ok"
        c = {"setting": name, "effspec": e, "llmcompressor": p}
        for metric in ("perplexity", "compress_seconds", "peak_rss_bytes", "stored_bytes", "decode_tokens_per_s",
                       "prefill_tokens_per_s"):
            c[f"{metric}_ratio"] = _ratio(e.get(metric), p.get(metric)) if ok_e and ok_p else None
        if name == "float":
            c["compress_seconds_ratio"] = None
        out.append(c)
    return out


def _f(x, spec: str = ".2f", scale: float = 1.0) -> str:
    return "-" if x is None else format(x * scale, spec)


def _status(r: dict) -> str:
    if not r:
        return "not run"
    if r.get("status") == "ok":
        return ""
    return (r.get("error") or r.get("status", "")).replace("\n", " ")


def table(comps: list[dict]) -> str:
    header = ("setting", "ppl effspec", "ppl llmc", "ratio", "compress s effspec", "llmc", "ratio",
              "peak RSS MB effspec", "llmc", "stored MB effspec", "llmc", "decode tok/s effspec", "llmc", "ratio",
              "prefill tok/s effspec", "llmc", "ratio")
    lines = [header]
    notes = []
    for c in comps:
        e, p = c["effspec"], c["llmcompressor"]
        lines.append((c["setting"], _f(e.get("perplexity"), ".3f"), _f(p.get("perplexity"), ".3f"), _f(c["perplexity_ratio"], ".3f"),
                      _f(e.get("compress_seconds"), ".1f"), _f(p.get("compress_seconds"), ".1f"),
                      _f(c["compress_seconds_ratio"], ".3f"),
                      _f(e.get("peak_rss_bytes"), ".0f", 1e-6), _f(p.get("peak_rss_bytes"), ".0f", 1e-6),
                      _f(e.get("stored_bytes"), ".1f", 1e-6), _f(p.get("stored_bytes"), ".1f", 1e-6),
                      _f(e.get("decode_tokens_per_s")), _f(p.get("decode_tokens_per_s")), _f(c["decode_tokens_per_s_ratio"]),
                      _f(e.get("prefill_tokens_per_s"), ".1f"), _f(p.get("prefill_tokens_per_s"), ".1f"),
                      _f(c["prefill_tokens_per_s_ratio"])))
        for side, r in (("effspec", e), ("llm-compressor", p)):
            if _status(r):
                notes.append(f"  {c['setting']} [{side}]: {_status(r)}")
        a, b = p.get("first_window_ppl_in_memory"), p.get("first_window_ppl_reloaded")
        if a and b and abs(b / a - 1) > 0.01:
            notes.append(f"  {c['setting']} [llm-compressor]: its saved checkpoint does not reload to the model oneshot "
                         f"returned (first-window perplexity {a:.3f} in memory, {b:.3f} reloaded; the table's perplexity "
                         "is the in-memory model's, its decode the reloaded checkpoint's)")
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    fmt = lambda line: "  ".join(s.ljust(w) if i == 0 else s.rjust(w) for i, (s, w) in enumerate(zip(line, widths)))  # noqa: E731
    text = "\n".join([fmt(lines[0]), "  ".join("-" * w for w in widths)] + [fmt(line) for line in lines[1:]])
    return text + ("\n\nnotes:\n" + "\n".join(notes) if notes else "")


TARGET_OVER_FLOAT = {"w4g64": 0.15, "w3g64": 1.00}  # the best effspec recipe per grid, perplexity over float32
TARGET_OWN_GRID = 0.005  # rtn-w4g32-asym: the grid the float weights came from


def quality_verdicts(by: dict, float_ppl: float) -> list[str]:
    """The issue's perplexity-over-float targets, from effspec's rows (`by`: (setting, side) -> row)."""
    ppl = {s: r["perplexity"] for (s, side), r in by.items() if side == "effspec" and r.get("perplexity")}
    out = []
    for grid, limit in TARGET_OVER_FLOAT.items():
        mine = {s: p for s, p in ppl.items() if s.endswith(f"-{grid}")}
        if mine:
            best = min(mine, key=mine.get)
            over = mine[best] / float_ppl - 1
            out.append(f"best {grid} recipe {best} {mine[best]:.3f}, {over:+.1%} over float32 (target within "
                       f"{limit:.0%}: {'met' if over <= limit else 'missed'})")
    for grid in ("w3g64", "w2g64"):
        rot, plain = ppl.get(f"rotategptq-{grid}"), ppl.get(f"gptq-{grid}")
        if rot and plain:
            out.append(f"rotate+gptq {grid} {rot:.3f} against gptq alone {plain:.3f} (target below: "
                       f"{'met' if rot < plain else 'missed'})")
    if (own := ppl.get("rtn-w4g32-asym")) is not None:
        over = own / float_ppl - 1
        out.append(f"rtn-w4g32-asym (the model's own grid) {own:.3f}, {over:+.2%} over float32 (target within "
                   f"{TARGET_OWN_GRID:.1%}: {'met' if abs(over) <= TARGET_OWN_GRID else 'missed'})")
    return out


def verdicts(comps: list[dict], rows: list[dict]) -> list[str]:
    """The issue's targets, each with the settings that miss it."""
    both = [c for c in comps if c["perplexity_ratio"] is not None and c["setting"] != "float"]
    out = []
    if both:
        miss = [f"{c['setting']} {c['perplexity_ratio']:.3f}" for c in both if c["perplexity_ratio"] > TARGET_PPL_RATIO]
        out.append(f"perplexity effspec/llm-compressor <= {TARGET_PPL_RATIO:.2f}: {len(both) - len(miss)}/{len(both)} settings"
                   + (f"; missed by {', '.join(miss)}" if miss else ""))
        timed = [c for c in both if c["compress_seconds_ratio"] is not None]
        data_free = [c for c in timed if c["setting"] in SETTINGS and not calibrated(c["setting"])]
        timed = [c for c in timed if c not in data_free]
        miss = [f"{c['setting']} {c['compress_seconds_ratio']:.2f}" for c in timed if c["compress_seconds_ratio"] > TARGET_TIME_RATIO]
        out.append(f"compression time effspec/llm-compressor <= {TARGET_TIME_RATIO} (calibrated settings): "
                   f"{len(timed) - len(miss)}/{len(timed)}" + (f"; missed by {', '.join(miss)}" if miss else ""))
        if data_free:  # ~1 s on both sides; effspec's ends with packed codes, llm-compressor packs in save_pretrained
            out.append("data-free settings, compression s effspec / llm-compressor (+ its save, which packs the codes): "
                       + ", ".join(f"{c['setting']} {c['effspec']['compress_seconds']:.2f} / "
                                   f"{c['llmcompressor']['compress_seconds']:.2f}"
                                   + (f" (+{c['llmcompressor']['save_seconds']:.2f})"
                                      if c['llmcompressor'].get('save_seconds') is not None else "")
                                   for c in data_free))
    ours = [c["effspec"] for c in comps if c["effspec"].get("status") == "ok" and c["setting"] != "float"]
    if ours:
        miss = [f"{r['setting']} {(r['peak_rss_bytes'] - r['model_bytes']) / 2**30:.2f} GiB" for r in ours
                if r["peak_rss_bytes"] - r["model_bytes"] > TARGET_RSS_OVER_MODEL]
        worst = max(ours, key=lambda r: r["peak_rss_bytes"] - r["model_bytes"])
        out.append(f"effspec peak RSS while compressing <= float model + 2 GiB: {len(ours) - len(miss)}/{len(ours)} "
                   f"(largest: {worst['setting']}, {(worst['peak_rss_bytes'] - worst['model_bytes']) / 2**30:.2f} GiB over "
                   f"the model's {worst['model_bytes'] / 2**30:.2f} GiB)" + (f"; missed by {', '.join(miss)}" if miss else ""))
    by = {(r["setting"], r["side"]): r for r in rows if r.get("status") == "ok"}
    fl, lc = by.get(("float", "effspec")), by.get(("llamacpp-q4_1", "llamacpp"))
    if fl:
        out += quality_verdicts(by, fl["perplexity"])
    for name in ("rtn-w4g64", "rtn-w4g64-head8"):
        w4 = by.get((name, "effspec"))
        if not w4:
            continue
        parts = [f"packed w4 g64 ({name}) decode {w4['decode_tokens_per_s']:.2f} tok/s"]
        if fl:
            x = w4["decode_tokens_per_s"] / fl["decode_tokens_per_s"]
            parts.append(f"{x:.2f}x effspec float32 ({fl['decode_tokens_per_s']:.2f}; target >= {TARGET_W4_SPEEDUP:.0f}x: "
                         f"{'met' if x >= TARGET_W4_SPEEDUP else 'missed'})")
        if lc:
            parts.append(f"{w4['decode_tokens_per_s'] / lc['decode_tokens_per_s']:.2f}x llama.cpp Q4_1 "
                         f"({lc['decode_tokens_per_s']:.2f} tok/s)")
        out.append(", ".join(parts))
    for name in ("smoothquant-w8a8", "w8a8"):
        w8 = by.get((name, "effspec"))
        if w8 and fl and w8.get("prefill_tokens_per_s") and fl.get("prefill_tokens_per_s"):
            out.append(f"{name} prefill {w8['prefill_tokens_per_s']:.1f} tok/s, "
                       f"{w8['prefill_tokens_per_s'] / fl['prefill_tokens_per_s']:.2f}x effspec float32 "
                       f"({fl['prefill_tokens_per_s']:.1f}); perplexity {w8['perplexity'] / fl['perplexity'] - 1:+.2%} "
                       "against float32 (target within 2%)")
    return out


# ---- main ------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.effspec_worker is not None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
        return effspec_worker(args.effspec_worker)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="effspec-bench-quantize-"))
    logs = args.out.parent / f"{args.out.stem}-logs"
    logs.mkdir(parents=True, exist_ok=True)
    tokens_path = work / "tokens.pt"
    try:
        log.info("tokenizing %s and sampling calibration ids", args.data)
        try:
            info = write_tokens(args, tokens_path)
        except Exception as e:  # noqa: BLE001 -- bad data path or too little text: one line, exit 2
            print(f"bench/quantize.py: error: {e}", file=sys.stderr)
            return 2
        protocol = {"model": MODEL, "data": str(args.data), "windows": args.windows, "seqlen": args.seqlen,
                    "calib_samples": args.calib_samples, "calib_seqlen": args.calib_seqlen, "threads": args.threads,
                    "runs": args.runs, "prompt_tokens": PROMPT_TOKENS, "new_tokens": args.new_tokens, **info}
        cache = {} if args.fresh else load_cache(args.out, protocol, not args.retry_errors)
        from effspec.pipeline import environment

        meta = {"benchmark": "quantize", "protocol": protocol, "env": environment()}
        rows: list[dict] = []

        def record(row: dict) -> None:
            # rows another run (other --settings, same --out and protocol) wrote meanwhile are kept too
            rows.append(row)
            save(args.out, {**meta, "rows": with_cached(rows, {**cache, **load_cache(args.out, protocol, True)})})

        peer_exe: Path | None = None
        peer_error = None
        if not args.skip_peer:
            try:
                peer_exe = ensure_peer_venv(args.peer_venv)
            except PeerUnavailable as e:
                peer_error = f"peer unavailable: {e}"
                log.error("%s", peer_error)
        base = {"tokens": str(tokens_path), "threads": args.threads, "runs": args.runs, "new_tokens": args.new_tokens,
            "prefill": True}
        for name in args.settings:
            setting = SETTINGS[name]
            for side in SIDES:
                if side == "llmcompressor" and (args.skip_peer or setting.peer_of):
                    continue  # a peer_of setting's peer row is the other setting's
                key = row_key(protocol, setting, side)
                if key in cache:
                    log.info("%s [%s]: cached", name, side)
                    record(cache[key])
                    continue
                row = {"setting": name, "side": side, "key": key}
                if side == "effspec":
                    why = effspec_available(setting)
                    if why:
                        log.warning("%s [effspec]: %s", name, why)
                        record({**row, "status": "unavailable", "error": why})
                        continue
                    log.info("%s [effspec]: %s", name, setting.steps)
                    out = run_worker([sys.executable, str(Path(__file__).resolve()), "--effspec-worker"],
                                     {**base, "setting": name, "recipe": setting.recipe_yaml()}, work, f"{name}-effspec",
                                     args.threads, logs)
                else:
                    if peer_exe is None:
                        record({**row, "status": "unavailable", "error": peer_error})
                        continue
                    log.info("%s [llm-compressor]: %s", name, ", ".join(m[0] for m in setting.modifiers) or "float32")
                    spec = {**base, "setting": name, "model_dir": str(model_dir()), "save_dir": str(work / f"{name}-llmc"),
                            "modifiers": [list(m) for m in setting.modifiers]}
                    out = run_worker([str(peer_exe), str(BENCH / "llmc_worker.py")], spec, work, f"{name}-llmc",
                                     args.threads, logs)
                status = "error" if "error" in out else "ok"
                if status == "ok":
                    log.info("%s [%s]: ppl %.3f, compress %.1f s, decode %.2f tok/s", name, side, out["perplexity"],
                             out["compress_seconds"], out["decode_tokens_per_s"])
                else:
                    log.error("%s [%s]: %s (log: %s)", name, side, out["error"], out["log"])
                record({**row, "status": status, **out})
        if not args.skip_llamacpp:
            key = row_key(protocol, None, "llamacpp")
            if key in cache:
                record(cache[key])
            else:
                row = {"setting": "llamacpp-q4_1", "side": "llamacpp", "key": key}
                try:
                    out = run_llamacpp(args, tokens_path, work, logs)
                except (PeerUnavailable, OSError) as e:
                    out = {"error": f"llama.cpp unavailable: {e}"}
                if "error" in out:
                    log.error("llama.cpp: %s", out["error"])
                else:
                    log.info("llama.cpp Q4_1: decode %.2f tok/s", out["decode_tokens_per_s"])
                record({**row, "status": "error" if "error" in out else "ok", **out})
    finally:
        shutil.rmtree(work, ignore_errors=True)

    # settings run earlier (or by a concurrent run) with the same protocol too: the table covers them all
    rows = with_cached(rows, {**cache, **load_cache(args.out, protocol, True)})
    comps = comparisons(rows)
    meta["total_seconds"] = time.perf_counter() - t_start
    record_all = {**meta, "comparisons": [{k: v for k, v in c.items() if k not in SIDES} for c in comps], "rows": rows}
    save(args.out, record_all)

    env = meta["env"]
    peer_versions = next((r["versions"] for r in rows if r["side"] == "llmcompressor" and r.get("versions")), {})
    print(f"effspec quantization benchmark: {MODEL} on {args.data}")
    print(f"perplexity: first {args.windows} windows of {args.seqlen} tokens of wiki.test.raw ({info['eval_tokens']} tokens); "
          f"calibration: {args.calib_samples} x {args.calib_seqlen} tokens of wiki.valid.raw, the same ids on both sides")
    print(f"decode: {PROMPT_TOKENS}-token prompt + {args.new_tokens} greedy tokens, median of {args.runs} after a warm-up; "
          f"threads {args.threads} on every side; cpu: {env['cpu']}")
    print(f"effspec {env['effspec']} (torch {env['torch']}, transformers {env['transformers']}); llm-compressor "
          f"{peer_versions.get('llmcompressor', '-')} (transformers {peer_versions.get('transformers', '-')})")
    print()
    print(table(comps))
    lc = next((r for r in rows if r["side"] == "llamacpp"), None)
    if lc is not None:
        print()
        print("llama.cpp (node-llama-cpp prebuilt, Q4_1 GGUF): " + (
            f"decode {lc['decode_tokens_per_s']:.2f} tok/s, prefill of the prompt {lc['prefill_tokens_per_s']:.1f} tok/s"
            if lc.get("status") == "ok" else lc.get("error", "")))
    print()
    for line in verdicts(comps, rows):
        print(line)
    print(f"\nratios are effspec / llm-compressor in this run; MB = 1e6 bytes; peak RSS is the setting's own process "
          f"(load + compression). Rows: {args.out}; worker logs: {logs}")
    print(json.dumps(record_all, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
