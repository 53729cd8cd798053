"""Tuning benchmark: effspec's fine-tuning, adapters and distillation against peft + transformers' Trainer in one run.

`smollm2-135m`, two parts (`--parts memory,recovery`, default both):

memory -- what one optimizer step costs, each setting on the same training
rows (contiguous `--seqlen` rows of wiki.valid.raw, visited in the order
effspec's `StepBatches` gives for `--seed`), the same number of steps, batch,
accumulation, learning-rate schedule, bf16 autocast and gradient checkpointing:

- `finetune`: full fine-tuning, every parameter learns (effspec step `finetune`,
  its own lr, `--full-lr`);
- `lora`, `dora`: LoRA / DoRA r=16, alpha 32, dropout 0.05 on every block
  projection (effspec step `lora`, methods lora and dora);
- `qlora-nf4`, `qlora-rtn-w4g64`: LoRA on the packed 4-bit base (effspec step
  `nf4`, or `rtn` bits 4 group 64, applied first; the base stays packed);
- `prompt`: prompt tuning, 20 virtual tokens (method prompt);
- `peer-lora`: peft + transformers `Trainer`, LoRA with the same hyperparameters
  (the same `LoraConfig` fields, AdamW, max_grad_norm 1, bf16, non-reentrant
  activation checkpointing, the same micro-batch and accumulation) on the same
  rows in the same order (an IterableDataset, so the Trainer does not shuffle),
  loading the same float32 directory effspec caches. `--peer-schedule same`
  (default) gives its Trainer effspec's warm-up + cosine factor
  (`effspec.train.learning_rate_factor`, via `create_scheduler`): transformers'
  own "cosine" warm-up starts at lr 0 where effspec's starts at lr/(warmup+1),
  which alone shifts the loss curves apart; `--peer-schedule own` uses
  `lr_scheduler_type="cosine"` and `warmup_steps` as they are.

`--shape smollm2-360m|smollm2-1.7b` runs the memory part on a model of that
published SmolLM2 shape (SHAPES: width, depth, heads) with transformers' random
initialisation, the real model's vocabulary and tokenizer, on both sides: no
larger real model can be had on this machine, and at 135M parameters the
imported libraries and the embedding outweigh the linear weights QLoRA packs.
Its memory and step times are real; its losses are not a model's.

Each setting runs in its own fresh process (effspec's with the one glibc malloc
arena effspec asks for on import; the peer's with glibc's default, as its users
run it: `malloc_arenas` in the row). After loading (and, for QLoRA,
quantizing) the model the worker runs `gc.collect()` and glibc's `malloc_trim`,
reads its resident set (`RSS loaded`), resets the kernel's peak mark
(/proc/self/clear_refs, `effspec.measure.memory`) and trains: `peak train` is
VmHWM over the training run alone, `+train` its rise over `RSS loaded`, and
`process peak` the largest of the marks before and after the reset (the reset
also resets `getrusage`'s ru_maxrss, which is recorded as read at the end).
Step times come from one rule on both sides: a global
`torch.optim` step post-hook timestamps the end of every optimizer step; a
step's time is the gap to the previous one, and `s/step` is the median of every
step after the first (warm-up) one; `total s` is the wall time of the training
call. Losses are the per-step losses effspec's `TrainLog` records and those of
the Trainer's `log_history` (`logging_steps=1`).

recovery -- how much of the perplexity a compression loses comes back under a
budget of <= 250k training tokens (BUDGET_TOKENS; about half an hour each at 2
threads): `drop-layers-8+distill` removes 8 of the 30 blocks (step
`drop-layers` n 8), then full-parameter distillation from the float model
(step `distill`); `sparsegpt-24+lora-distill` prunes 2:4 with SparseGPT, then
trains LoRA with objective distill (the adapters stay beside the sparse base).
The teacher is a deep copy of the float model taken before compressing.
Calibration of the compression steps: `--calib-samples` x `--calib-seqlen`
tokens of wiki.valid.raw at `random.Random(0)` offsets
(`effspec.data.calibration_samples`); training text: the contiguous rows of
wiki.valid.raw as in the memory part. Perplexity: the first `--windows`
windows of `--eval-seqlen` tokens of wiki.test.raw (`effspec.measure.perplexity`;
the protocol is 32 x 2048, the default 8 x 2048 for time). recovery =
(ppl before - ppl after) / (ppl before - ppl float). The curve (PNG beside
`--out`, `<stem>-recovery.png`) is the training loop's own evaluation
(`eval_every`: perplexity of the `--eval-samples` rows `fit` holds out of the
training text) against training tokens, starting from the compressed model
before training, with the float and compressed models' values on the same rows
as horizontal lines.

Targets (the issue): LoRA peak train memory <= 0.5x full fine-tuning's; QLoRA
<= 0.6x LoRA's; effspec LoRA time per step <= 1.0x the peer's with the same loss
curve (max |loss difference| over the steps <= `--loss-tol`); recovery >= 30%
(drop-layers + distill) and >= 20% (SparseGPT 2:4 + LoRA distill) within the
token budget.

Rows are cached in `--out` keyed by the part's protocol (flags and token ids)
and the setting's definition, not by the code: `--fresh` after code changes.
Prints a table per part and the targets, and ends stdout with one JSON line of
every row. Timings are one run each on a shared, noisy machine: compare ratios
within a run, not seconds across runs.

    python bench/tune.py --steps 3 --batch-size 2 --seqlen 128 --windows 1 --eval-seqlen 256 \\
        --distill-steps 3 --distill-batch 2 --distill-seqlen 128 --calib-samples 4 --calib-seqlen 128 \\
        --eval-every 1 --out bench/results/tune-smoke.json # a smoke run, ~5 min
    python bench/tune.py                                   # the issue's settings (over an hour)
    python bench/tune.py --parts memory --shape smollm2-1.7b --settings lora,qlora-nf4,qlora-rtn-w4g64,peer-lora \
        --steps 3 --batch-size 1 --out bench/results/tune-1.7b.json  # QLoRA where the weights dominate, ~9 min
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import hashlib
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is no package: quantize.py is imported as a sibling

from quantize import DEFAULT_DATA, MODEL, _f, model_dir, run_worker, save  # noqa: E402 -- shared bench machinery

BENCH = Path(__file__).resolve().parent
DEFAULT_OUT = BENCH / "results" / "tune.json"
BUDGET_TOKENS = 250_000  # recovery: training tokens per recipe
TARGET_LORA_VS_FULL = 0.5  # LoRA peak train memory / full fine-tuning's
TARGET_QLORA_VS_LORA = 0.6  # QLoRA peak train memory / LoRA's
TARGET_STEP_TIME = 1.0  # effspec LoRA s/step / the peer's
TARGET_RECOVERY = {"drop-layers-8+distill": 0.30, "sparsegpt-24+lora-distill": 0.20}
BLOCK_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# --shape: the larger SmolLM2 models' published shapes (their config.json), built with random weights over the
# real model's config and tokenizer, so memory can be measured where the weights, not the fixed costs, dominate
SHAPES: dict[str, dict] = {
    MODEL: {},
    "smollm2-360m": {"hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32, "num_attention_heads": 15,
                     "num_key_value_heads": 5},
    "smollm2-1.7b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24, "num_attention_heads": 32,
                     "num_key_value_heads": 32},
}

log = logging.getLogger("bench.tune")

# ---- the settings --------------------------------------------------------------------------------------------------
# name -> (part, side, definition). A definition is what the worker does; it is part of the row's cache key.
SETTINGS: dict[str, tuple[str, str, dict]] = {
    "finetune": ("memory", "effspec", {"train": "finetune"}),
    "lora": ("memory", "effspec", {"train": "adapter", "method": "lora"}),
    "dora": ("memory", "effspec", {"train": "adapter", "method": "dora"}),
    "qlora-nf4": ("memory", "effspec", {"base": ["nf4", {}], "train": "adapter", "method": "lora"}),
    "qlora-rtn-w4g64": ("memory", "effspec", {"base": ["rtn", {"bits": 4, "group_size": 64}], "train": "adapter",
                                              "method": "lora"}),
    "prompt": ("memory", "effspec", {"train": "adapter", "method": "prompt"}),
    "peer-lora": ("memory", "peft", {"train": "peer", "method": "lora"}),
    "drop-layers-8+distill": ("recovery", "effspec", {"compress": ["drop-layers", {"n": 8}], "train": "distill"}),
    "sparsegpt-24+lora-distill": ("recovery", "effspec", {"compress": ["sparsegpt", {"nm": "2:4"}], "train": "adapter",
                                                          "method": "lora"}),
}
PARTS = ("memory", "recovery")


def count(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def non_negative(text: str) -> int:
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {n}")
    return n


def names(choices, what: str):
    """argparse type of a comma-separated subset of `choices`, returned in `choices`' order."""
    def parse(text: str) -> list[str]:
        wanted = {s.strip() for s in text.split(",") if s.strip()}
        if not wanted or wanted - set(choices):
            raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(sorted(wanted - set(choices))) or '(none given)'}; "
                                             f"expected some of {', '.join(choices)}")
        return [c for c in choices if c in wanted]
    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="WikiText-2 raw directory (default ../shared/data/wikitext-2-raw)")
    p.add_argument("--parts", type=names(PARTS, "part(s)"), default=list(PARTS), help="memory,recovery (default both)")
    p.add_argument("--settings", type=names(list(SETTINGS), "setting(s)"), default=list(SETTINGS),
                   help=f"comma-separated subset (default: all of the parts run): {', '.join(SETTINGS)}")
    p.add_argument("--threads", type=count, default=2, help="torch and OMP/MKL threads, every worker (default 2)")
    p.add_argument("--seed", type=non_negative, default=0, help="data order, adapter init and dropout seed (default 0)")
    p.add_argument("--bf16", choices=("auto", "on", "off"), default="auto",
                   help="bf16 autocast on both sides; auto: where the CPU has native bf16 (effspec's rule)")
    m = p.add_argument_group("memory part")
    m.add_argument("--steps", type=count, default=8, help="optimizer steps of every setting (default 8)")
    m.add_argument("--batch-size", type=count, default=4, help="sequences per optimizer step (default 4)")
    m.add_argument("--micro-batch", type=count, default=1, help="sequences per forward/backward (default 1)")
    m.add_argument("--seqlen", type=count, default=512, help="tokens per training sequence (default 512)")
    m.add_argument("--lr", type=float, default=2e-4, help="adapters' and the peer's learning rate (default 2e-4)")
    m.add_argument("--full-lr", type=float, default=5e-5, help="full fine-tuning's learning rate (default 5e-5)")
    m.add_argument("--warmup", type=non_negative, default=2, help="warm-up steps, then cosine (default 2; at most --steps)")
    m.add_argument("--rank", type=count, default=16, help="LoRA/DoRA rank (alpha = 2 x rank; default 16)")
    m.add_argument("--shape", choices=list(SHAPES), default=MODEL,
                   help=f"model of the memory part (default {MODEL}, the real one); the others are random weights in "
                        "a larger published shape (memory and time only: losses are meaningless; full fine-tuning "
                        "of smollm2-1.7b holds 16 bytes a parameter in weights, gradients and AdamW state, 27 GB)")
    m.add_argument("--peer-schedule", choices=("same", "own"), default="same",
                   help="peer lr schedule: effspec's factor (same) or transformers' cosine with warmup_steps (own)")
    m.add_argument("--loss-tol", type=float, default=0.05,
                   help="'same loss curve': max |effspec - peer| per-step loss, nats (default 0.05)")
    r = p.add_argument_group("recovery part")
    r.add_argument("--windows", type=count, default=8, help="eval windows of wiki.test.raw (default 8; protocol 32)")
    r.add_argument("--eval-seqlen", type=count, default=2048, help="tokens per eval window (default 2048)")
    r.add_argument("--calib-samples", type=count, default=32, help="calibration rows for drop-layers/sparsegpt (default 32)")
    r.add_argument("--calib-seqlen", type=count, default=512, help="tokens per calibration row (default 512)")
    r.add_argument("--distill-steps", type=count, default=60, help="optimizer steps of each recovery (default 60)")
    r.add_argument("--distill-batch", type=count, default=8, help="sequences per step (default 8)")
    r.add_argument("--distill-micro", type=count, default=1, help="sequences per forward/backward (default 1)")
    r.add_argument("--distill-seqlen", type=count, default=512, help="tokens per sequence (default 512)")
    r.add_argument("--distill-warmup", type=non_negative, default=6, help="warm-up steps (default 6; at most the steps)")
    r.add_argument("--distill-lr", type=float, default=None, help="distill's lr (default: the step's, 5e-5)")
    r.add_argument("--lora-distill-lr", type=float, default=None, help="LoRA + distill's lr (default: the step's, 2e-4)")
    r.add_argument("--eval-every", type=non_negative, default=5, help="held-out eval every N steps for the curve (0: none)")
    r.add_argument("--eval-samples", type=count, default=4, help="training rows held out for that eval (default 4)")
    p.add_argument("--fresh", action="store_true", help="ignore rows cached in --out (e.g. after a code change)")
    p.add_argument("--retry-errors", action="store_true", help="run again the cached rows that ended in an error")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON rows, also the resume cache (default bench/results/tune.json)")
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)  # internal: one setting in this process
    args = p.parse_args(argv)
    if args.shape != MODEL and "recovery" in args.parts:
        p.error(f"--shape {args.shape} has random weights: use it with --parts memory only")
    if args.batch_size % args.micro_batch or args.distill_batch % args.distill_micro:
        p.error("--batch-size (--distill-batch) must be a multiple of --micro-batch (--distill-micro)")
    return args


# ---- shared inputs ---------------------------------------------------------------------------------------------
def digest(t) -> str:
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()[:16]


def write_tokens(args: argparse.Namespace, path: Path) -> dict:
    """Training ids (wiki.valid.raw whole), calibration rows and eval windows, saved once for every worker."""
    import torch
    from transformers import AutoTokenizer

    from effspec.data import calibration_samples, calibration_tokens, eval_windows, load_text, tokenize

    try:
        directory = model_dir()
    except FileNotFoundError:  # first use on this machine: effspec converts and caches the model
        from effspec.models import load_model

        load_model(MODEL)
        directory = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(directory))  # the tokenizer effspec's load_model uses
    source = load_text(args.data)
    if source.calib_text is None:
        raise ValueError(f"{args.data}: no wiki.valid.raw beside the test text; the training text is the valid split")
    train = calibration_tokens(tokenizer, source, 0)
    tokens = {"train": train, "calib": calibration_samples(train, args.calib_samples, args.calib_seqlen, seed=0),
              "windows": eval_windows(tokenize(tokenizer, source.eval_text), args.eval_seqlen, args.windows)}
    for part, seqlen in (("memory", args.seqlen), ("recovery", args.distill_seqlen)):
        rows = train.numel() // seqlen
        if part in args.parts and rows < 2 + args.eval_samples:  # fit holds eval_samples rows out
            raise ValueError(f"the training text has {rows} rows of {seqlen} tokens: too few")
    torch.save(tokens, path)
    return {"model": MODEL, "data": str(args.data), "train_tokens": train.numel(), "train_digest": digest(train),
            "calib_digest": digest(tokens["calib"]), "windows_digest": digest(tokens["windows"])}


def bf16_flag(args: argparse.Namespace) -> bool:
    from effspec.train import native_bf16

    return native_bf16() if args.bf16 == "auto" else args.bf16 == "on"


def protocols(args: argparse.Namespace, inputs: dict) -> dict[str, dict]:
    """Per part, everything that decides its rows' figures: a row is reused only under the same one."""
    common = {"model": MODEL, "data": inputs["data"], "train_digest": inputs["train_digest"], "threads": args.threads,
              "seed": args.seed, "bf16": bf16_flag(args)}
    memory = {**common, "steps": args.steps, "batch_size": args.batch_size, "micro_batch": args.micro_batch,
              "seqlen": args.seqlen, "lr": args.lr, "full_lr": args.full_lr, "warmup": min(args.warmup, args.steps),
              "rank": args.rank, "peer_schedule": args.peer_schedule,
              **({"shape": args.shape} if args.shape != MODEL else {})}  # no key for the real model: cached rows stay
    recovery = {**common, "calib_digest": inputs["calib_digest"], "calib_samples": args.calib_samples,
                "calib_seqlen": args.calib_seqlen, "windows": args.windows, "eval_seqlen": args.eval_seqlen,
                "windows_digest": inputs["windows_digest"], "steps": args.distill_steps, "batch_size": args.distill_batch,
                "micro_batch": args.distill_micro, "seqlen": args.distill_seqlen,
                "warmup": min(args.distill_warmup, args.distill_steps), "distill_lr": args.distill_lr,
                "lora_distill_lr": args.lora_distill_lr, "eval_every": args.eval_every, "eval_samples": args.eval_samples}
    return {"memory": memory, "recovery": recovery}


def row_key(protocol: dict, name: str) -> str:
    what = {"protocol": protocol, "setting": name, "definition": SETTINGS[name]}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


# ---- worker helpers (in the setting's own process) --------------------------------------------------------------
def rss_bytes(field: str = "VmRSS") -> int:
    """A resident-set figure of /proc/self/status: VmRSS (all), RssAnon or RssFile (file-backed pages, e.g. mmap)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def release_memory() -> None:
    """Collect garbage and hand glibc's free heap pages back, so RSS shows what is alive (a no-op off glibc)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class StepClock:
    """Timestamps of every optimizer step's end, from a global torch.optim hook (the same rule for both sides)."""

    def __enter__(self):
        import torch
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.ends: list[float] = []
        self.threads: list[int] = []
        self.start = time.perf_counter()

        def hook(optimizer, args, kwargs):
            self.ends.append(time.perf_counter())
            self.threads.append(torch.get_num_threads())

        self.handle = register_optimizer_step_post_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()
        self.stop = time.perf_counter()

    def figures(self) -> dict:
        times = [b - a for a, b in zip([self.start] + self.ends[:-1], self.ends)]
        after_first = times[1:]
        return {"step_seconds": times, "seconds_per_step": statistics.median(after_first) if after_first else None,
                "train_seconds": self.stop - self.start, "optimizer_steps": len(self.ends),
                "threads_in_training": sorted(set(self.threads))}


def train_config(cls, spec: dict, **fields):
    """A step config of `cls` with the run's optimization fields (config_from_dict checks every field)."""
    from effspec.config import config_from_dict

    t = spec["train_cfg"]
    data = {"steps": t["steps"], "batch_size": t["batch_size"], "micro_batch": t["micro_batch"], "seqlen": t["seqlen"],
            "warmup": t["warmup"], "bf16": spec["bf16"], "grad_checkpointing": True, "seed": spec["seed"]}
    data.update({k: v for k, v in fields.items() if v is not None})
    return config_from_dict(cls, data)


def count_trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def effspec_train(model, tokenizer, spec: dict, ids, teacher=None) -> tuple:
    """Train as the setting says, through the functions the steps themselves call; (model, TrainLog, config, trainable)."""
    from effspec.registry import get_step
    from effspec.steps.tune.finetune import select_parameters
    from effspec.steps.tune.lora import detach, train_adapter
    from effspec.tuning import fit

    d = spec["definition"]
    if d["train"] in ("finetune", "distill"):
        cfg = train_config(get_step(d["train"]).config, spec, lr=spec["lr"],
                           eval_every=spec["train_cfg"].get("eval_every"), eval_samples=spec["train_cfg"].get("eval_samples"))
        n = select_parameters(model, cfg.targets)
        try:
            tlog = fit(model, cfg, ids, tokenizer, teacher, d["train"])
        finally:
            model.requires_grad_(False)
        return model, tlog, cfg, n
    extra = {"objective": "distill"} if teacher is not None else {}
    cfg = train_config(get_step("lora").config, spec, method=d["method"], lr=spec["lr"], r=spec.get("rank"),
                       alpha=2.0 * spec["rank"] if spec.get("rank") else None,
                       eval_every=spec["train_cfg"].get("eval_every"), eval_samples=spec["train_cfg"].get("eval_samples"),
                       **extra)
    pm, tlog = train_adapter(model, cfg, ids, tokenizer, teacher)
    n = count_trainable(pm)  # the adapter's parameters keep requires_grad after training
    model = detach(pm, cfg) if teacher is not None else pm
    return model, tlog, cfg, n


def random_model(shape: str, seed: int):
    """A float32 model of `shape` (SHAPES) with transformers' random initialisation, and the real model's tokenizer."""
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(model_dir()))
    for k, v in SHAPES[shape].items():
        setattr(config, k, v)
    config.head_dim = config.hidden_size // config.num_attention_heads
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return model, transformers.AutoTokenizer.from_pretrained(str(model_dir()))


def memory_effspec(spec: dict, tokens: dict, out: dict) -> None:
    from effspec.config import config_from_dict
    from effspec.models import load_model
    from effspec.registry import get_step

    t0 = time.perf_counter()
    if spec["shape"] == MODEL:
        loaded = load_model(MODEL)
        model, tokenizer = loaded.model, loaded.tokenizer
    else:
        model, tokenizer = random_model(spec["shape"], spec["seed"])
    out["load_seconds"] = time.perf_counter() - t0
    out["params"] = sum(p.numel() for p in model.parameters())
    out["rss_float_loaded_bytes"] = rss_bytes()
    base = spec["definition"].get("base")
    if base:
        info = get_step(base[0])
        t0 = time.perf_counter()
        model = info.apply(model, config_from_dict(info.config, base[1]), None)
        out["quantize_seconds"] = time.perf_counter() - t0
    out["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    with measured(out):
        with StepClock() as clock:
            _, tlog, cfg, n = effspec_train(model, tokenizer, spec, tokens["train"])
    out.update(clock.figures(), losses=tlog.losses, tokens=tlog.tokens, loop_seconds=tlog.seconds, trainable_params=n,
               lr=cfg.lr, warmup=cfg.warmup, bf16=spec["bf16"])


class measured:
    """Around training: RSS before (after releasing freed memory), the peak mark reset, VmHWM and ru_maxrss after."""

    def __init__(self, out: dict):
        self.out = out

    def __enter__(self):
        from effspec.measure.memory import peak_rss_bytes, reset_peak

        release_memory()
        self.out["rss_loaded_bytes"] = rss_bytes()
        self.out["rss_file_loaded_bytes"] = rss_bytes("RssFile")  # the checkpoint's mmap, where tensors still map it
        self.out["peak_rss_before_train_bytes"] = peak_rss_bytes()  # load (+ quantize) peak
        self.out["peak_reset"] = reset_peak()
        return self

    def __exit__(self, *exc):
        import resource

        from effspec.measure.memory import peak_rss_bytes

        if exc[0] is None:
            o = self.out
            o["peak_train_bytes"] = peak_rss_bytes()
            o["train_increment_bytes"] = o["peak_train_bytes"] - o["rss_loaded_bytes"]
            o["process_peak_bytes"] = max(o["peak_train_bytes"], o["peak_rss_before_train_bytes"])
            o["ru_maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def step_rows(tokens, spec: dict) -> list:
    """The training rows in the order effspec's loop visits them: step after step, micro-batch after micro-batch."""
    from effspec.train_data import StepBatches, lm_examples

    t = spec["train_cfg"]
    batches = StepBatches(lm_examples(tokens, t["seqlen"]), t["batch_size"], t["micro_batch"], spec["seed"])
    return [(ids, labels) for s in range(t["steps"]) for mb in batches(s)
            for ids, labels in zip(mb["input_ids"], mb["labels"])]


def memory_peer(spec: dict, tokens: dict, out: dict) -> None:
    """peft + transformers' Trainer, LoRA with the same hyperparameters on the same rows in the same order."""
    import peft
    import torch
    import transformers
    from torch.utils.data import IterableDataset

    from effspec.train import TrainConfig, learning_rate_factor

    t = spec["train_cfg"]
    t0 = time.perf_counter()
    if spec["shape"] == MODEL:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir()), dtype=torch.float32)
    else:
        model = random_model(spec["shape"], spec["seed"])[0]
    out["load_seconds"] = time.perf_counter() - t0
    out["rss_float_loaded_bytes"] = rss_bytes()
    out["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    rows = step_rows(tokens["train"], spec)

    class Rows(IterableDataset):  # an iterable dataset: the Trainer keeps its order (no sampler, no shuffle)
        def __iter__(self):
            for ids, labels in rows:
                yield {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}

    schedule = TrainConfig(steps=t["steps"], batch_size=t["batch_size"], micro_batch=t["micro_batch"],
                           seqlen=t["seqlen"], lr=spec["lr"], warmup=t["warmup"])

    class SameSchedule(transformers.Trainer):
        def create_scheduler(self, num_training_steps, optimizer=None):
            if self.lr_scheduler is None:
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                    optimizer or self.optimizer, lambda s: learning_rate_factor(s, schedule))
                self._created_lr_scheduler = True
            return self.lr_scheduler

    work = Path(tempfile.mkdtemp(prefix="tune-peer-"))
    try:
        with measured(out):
            with StepClock() as clock:
                torch.manual_seed(spec["seed"])  # as effspec's attach: the adapter's init
                lora = peft.LoraConfig(task_type="CAUSAL_LM", r=spec["rank"], lora_alpha=2 * spec["rank"],
                                       lora_dropout=0.05, target_modules=BLOCK_PROJECTIONS)
                pm = peft.get_peft_model(model, lora)
                n = count_trainable(pm)
                targs = transformers.TrainingArguments(
                    output_dir=str(work), use_cpu=True, max_steps=t["steps"], per_device_train_batch_size=t["micro_batch"],
                    gradient_accumulation_steps=t["batch_size"] // t["micro_batch"], learning_rate=spec["lr"],
                    lr_scheduler_type="cosine", warmup_steps=t["warmup"], weight_decay=0.0, max_grad_norm=1.0,
                    bf16=spec["bf16"], activation_checkpointing=True,
                    activation_checkpointing_kwargs={"use_reentrant": False}, report_to=[], save_strategy="no",
                    logging_steps=1, seed=spec["seed"], disable_tqdm=True, remove_unused_columns=False,
                    dataloader_pin_memory=False)
                cls = SameSchedule if spec["peer_schedule"] == "same" else transformers.Trainer
                trainer = cls(model=pm, args=targs, train_dataset=Rows(),
                              data_collator=transformers.default_data_collator)
                result = trainer.train()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    out.update(clock.figures(), losses=losses, loop_seconds=result.metrics.get("train_runtime"), trainable_params=n,
               tokens=sum(int((labels[1:] != -100).sum()) for _, labels in rows), lr=spec["lr"], warmup=t["warmup"],
               bf16=spec["bf16"], optim=str(targs.optim), schedule=spec["peer_schedule"],
               versions={"peft": peft.__version__, "transformers": transformers.__version__})


def held_out_perplexity(model, ids, spec: dict) -> float | None:
    """What `fit`'s evaluate() computes, on the same held-out rows (the last eval_samples rows of the training text)."""
    import torch

    from effspec.objectives import lm_loss
    from effspec.train_data import collate, lm_examples

    t = spec["train_cfg"]
    if not t["eval_every"]:
        return None
    held = collate(lm_examples(ids, t["seqlen"])[-t["eval_samples"]:], 0)
    with torch.no_grad():
        was = model.training
        model.eval()
        logits = model(input_ids=held["input_ids"], attention_mask=held["attention_mask"]).logits
        model.train(was)
    return float(torch.exp(lm_loss(logits, held["labels"])))


def recovery_effspec(spec: dict, tokens: dict, out: dict) -> None:
    from effspec.config import config_from_dict
    from effspec.measure.memory import peak_rss_bytes
    from effspec.measure.perplexity import perplexity
    from effspec.models import load_model
    from effspec.pipeline import check_finite
    from effspec.registry import get_step

    d = spec["definition"]
    loaded = load_model(MODEL)
    model = loaded.model
    t0 = time.perf_counter()
    out["ppl_float"] = perplexity(model, tokens["windows"]).perplexity
    out["eval_seconds_float"] = time.perf_counter() - t0
    out["held_float"] = held_out_perplexity(model, tokens["train"], spec)
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    info = get_step(d["compress"][0])
    t0 = time.perf_counter()
    model = info.apply(model, config_from_dict(info.config, d["compress"][1]), tokens["calib"])
    check_finite(model, d["compress"][0])
    out["compress_seconds"] = time.perf_counter() - t0
    out["ppl_before"] = perplexity(model, tokens["windows"]).perplexity
    out["held_before"] = held_out_perplexity(model, tokens["train"], spec)
    t0 = time.perf_counter()
    model, tlog, cfg, n = effspec_train(model, loaded.tokenizer, spec, tokens["train"], teacher)
    out["train_seconds"] = time.perf_counter() - t0
    del teacher
    model.eval()
    out["ppl_after"] = perplexity(model, tokens["windows"]).perplexity
    gap = out["ppl_before"] - out["ppl_float"]
    out["recovery"] = (out["ppl_before"] - out["ppl_after"]) / gap if gap > 0 else None
    per_step = tlog.tokens / len(tlog.losses) if tlog.losses else 0
    out.update(losses=tlog.losses, tokens=tlog.tokens, loop_seconds=tlog.seconds, trainable_params=n, lr=cfg.lr,
               warmup=cfg.warmup, objective=cfg.objective, eval_curve=[[0, out["held_before"]]] + [
                   [round(step * per_step), value] for step, value in tlog.evals] if out["held_before"] else [],
               peak_rss_bytes=peak_rss_bytes())


def worker(spec_path: Path) -> int:
    """Subprocess body: one setting; its row, or its error in one line, written to spec["out"]."""
    spec = json.loads(spec_path.read_text())
    t_start = time.perf_counter()
    out: dict = {}
    part, side, _ = SETTINGS[spec["setting"]]
    if side == "peft":  # the peer as its users run it: glibc's own malloc arenas (effspec asks for one on import)
        os.environ["EFFSPEC_MALLOC_ARENAS"] = "0"
    out["malloc_arenas"] = os.environ.get("EFFSPEC_MALLOC_ARENAS", "1")
    try:
        import torch

        torch.set_num_threads(spec["threads"])
        tokens = torch.load(spec["tokens"])
        body = recovery_effspec if part == "recovery" else memory_peer if side == "peft" else memory_effspec
        body(spec, tokens, out)
        from effspec.pipeline import environment

        out.update(worker_seconds=time.perf_counter() - t_start, threads=torch.get_num_threads(),
                   versions={**{k: v for k, v in environment().items() if k in ("effspec", "torch", "transformers")},
                             **out.get("versions", {})})
    except Exception as e:  # noqa: BLE001 -- this setting's error; the other settings go on
        traceback.print_exc()
        out = {"error": " ".join(f"{type(e).__name__}: {e}".split())[:600]}
        Path(spec["out"]).write_text(json.dumps(out))
        return 1
    Path(spec["out"]).write_text(json.dumps(out))
    return 0


# ---- one run: rows, resume cache --------------------------------------------------------------------------------
def load_rows(path: Path) -> list[dict]:
    try:
        rows = json.loads(path.read_text())["rows"]
        return [r for r in rows if isinstance(r, dict) and r.get("key")]
    except (OSError, ValueError, KeyError, TypeError):
        return []


class Run:
    """This run's protocols, the rows they key, and where workers write; every finished row is saved at once."""

    def __init__(self, args: argparse.Namespace, inputs: dict, work: Path):
        from effspec.pipeline import environment

        self.args, self.work = args, work
        self.protocols = protocols(args, inputs)
        self.keys = {name: row_key(self.protocols[SETTINGS[name][0]], name) for name in SETTINGS}
        self.logs = args.out.parent / f"{args.out.stem}-logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        keep = ("ok", "error") if not args.retry_errors else ("ok",)
        self.cache = {} if args.fresh else {r["key"]: r for r in load_rows(args.out) if r.get("status") in keep}
        self.rows: dict[str, dict] = {}
        self.meta = {"benchmark": "tune", "inputs": inputs, "protocol": self.protocols, "env": environment()}

    def all_rows(self) -> list[dict]:
        """Rows of this run and cached rows under the current protocols (other runs' too), in SETTINGS order."""
        known = {**self.cache, **{r["key"]: r for r in load_rows(self.args.out)}, **self.rows}
        return [known[self.keys[name]] for name in SETTINGS if self.keys[name] in known]

    def run(self, name: str) -> None:
        key = self.keys[name]
        if key in self.cache:
            log.info("%s: cached", name)
            self.rows[key] = self.cache[key]
            return
        part, side, definition = SETTINGS[name]
        a = self.args
        pr = self.protocols[part]
        if part == "memory":
            train_cfg = {k: pr[k] for k in ("steps", "batch_size", "micro_batch", "seqlen", "warmup")}
            lr = a.full_lr if definition["train"] == "finetune" else a.lr
            rank = a.rank if definition.get("method") in ("lora", "dora") else None
        else:
            train_cfg = {k: pr[k] for k in ("steps", "batch_size", "micro_batch", "seqlen", "warmup", "eval_every",
                                            "eval_samples")}
            lr = a.distill_lr if definition["train"] == "distill" else a.lora_distill_lr
            rank = None
        spec = {"setting": name, "definition": definition, "tokens": str(self.work / "tokens.pt"), "threads": a.threads,
                "seed": a.seed, "bf16": pr["bf16"], "train_cfg": train_cfg, "lr": lr, "rank": rank,
                "peer_schedule": a.peer_schedule, "shape": a.shape}
        log.info("%s: running (%s part, %s)", name, part, side)
        out = run_worker([sys.executable, str(Path(__file__).resolve()), "--worker"], spec, self.work, name, a.threads,
                         self.logs)
        status = "error" if "error" in out else "ok"
        if status == "ok" and part == "memory":
            log.info("%s: peak train %.0f MB, %.2f s/step, loss %.4f -> %.4f", name, out["peak_train_bytes"] / 1e6,
                     out["seconds_per_step"] or float("nan"), out["losses"][0], out["losses"][-1])
        elif status == "ok":
            log.info("%s: ppl float %.3f, before %.3f, after %.3f", name, out["ppl_float"], out["ppl_before"], out["ppl_after"])
        else:
            log.error("%s: %s", name, out["error"])
        self.rows[key] = {"setting": name, "part": part, "side": side, "key": key, "status": status, **out}
        save(a.out, {**self.meta, "rows": self.all_rows()})


# ---- tables, targets, plot --------------------------------------------------------------------------------------
def align(lines: list[list[str]]) -> str:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    text = ["  ".join(s.ljust(w) if i == 0 else s.rjust(w) for i, (s, w) in enumerate(zip(line, widths))) for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def memory_table(rows: list[dict]) -> str:
    header = ["setting", "side", "trainable M", "RSS loaded MB", "file-backed MB", "peak train MB", "+train MB", "process peak MB",
              "s/step", "total s", "loss first", "loss last"]
    lines = [header]
    for r in rows:
        if r["status"] != "ok":
            lines.append([r["setting"], r["side"]] + ["-"] * (len(header) - 2))
            continue
        mb = 1e-6
        lines.append([r["setting"], r["side"], _f(r.get("trainable_params"), ".2f", 1e-6), _f(r["rss_loaded_bytes"], ".0f", mb),
                      _f(r.get("rss_file_loaded_bytes"), ".0f", mb),
                      _f(r["peak_train_bytes"], ".0f", mb), _f(r["train_increment_bytes"], ".0f", mb),
                      _f(r["process_peak_bytes"], ".0f", mb), _f(r["seconds_per_step"], ".2f"), _f(r["train_seconds"], ".1f"),
                      _f(r["losses"][0], ".4f"), _f(r["losses"][-1], ".4f")])
    return align(lines)


def recovery_table(rows: list[dict]) -> str:
    header = ["recipe", "ppl float", "ppl before", "ppl after", "recovery %", "target %", "train tokens", "compress s",
              "train s", "wall s"]
    lines = [header]
    for r in rows:
        target = _f(TARGET_RECOVERY.get(r["setting"]), ".0f", 100)
        if r["status"] != "ok":
            lines.append([r["setting"]] + ["-"] * 4 + [target] + ["-"] * 4)
            continue
        lines.append([r["setting"], _f(r["ppl_float"], ".3f"), _f(r["ppl_before"], ".3f"), _f(r["ppl_after"], ".3f"),
                      _f(r["recovery"], ".1f", 100), target, f"{r['tokens']:,}", _f(r["compress_seconds"], ".1f"),
                      _f(r["train_seconds"], ".1f"), _f(r.get("process_seconds"), ".1f")])
    return align(lines)


def loss_lines(rows: list[dict], limit: int = 16) -> list[str]:
    out = []
    for r in rows:
        if r["status"] == "ok" and r.get("losses"):
            ls = r["losses"]
            shown = ls if len(ls) <= limit else ls[: limit // 2] + [None] + ls[-limit // 2:]
            out.append(f"  {r['setting']:<26} " + " ".join("..." if x is None else f"{x:.4f}" for x in shown))
    return out


def peer_comparison(by: dict[str, dict]) -> dict | None:
    """effspec LoRA against the peer: step-time ratio and how far apart the loss curves are."""
    e, p = by.get("lora"), by.get("peer-lora")
    if not e or not p:
        return None
    n = min(len(e["losses"]), len(p["losses"]))
    diffs = [abs(a - b) for a, b in zip(e["losses"][:n], p["losses"][:n])]
    ratio = e["seconds_per_step"] / p["seconds_per_step"] if e["seconds_per_step"] and p["seconds_per_step"] else None
    return {"step_time_ratio": ratio, "max_abs_loss_diff": max(diffs) if diffs else None, "steps_compared": n,
            "final_loss_effspec": e["losses"][-1], "final_loss_peer": p["losses"][-1],
            "total_time_ratio": e["train_seconds"] / p["train_seconds"] if p["train_seconds"] else None}


def notes(rows: list[dict]) -> list[str]:
    """Packed-base rows whose resident set is mostly file-backed: the float checkpoint is still mapped."""
    out = []
    for r in rows:
        base = SETTINGS[r["setting"]][2].get("base")
        f, total = r.get("rss_file_loaded_bytes"), r.get("rss_loaded_bytes")
        if base and r["status"] == "ok" and f and total and f > 0.25 * total:
            out.append(f"  {r['setting']}: {f / 1e6:.0f} of its {total / 1e6:.0f} MB RSS loaded (after {base[0]}) are file-backed "
                       f"pages: tensors left in float still map the float checkpoint file, so the pages loading and "
                       f"quantizing touched stay resident and count in every figure of this row")
    return out


def memory_ratio(by: dict[str, dict], a: str, b: str, limit: float, shape: str = MODEL) -> str:
    label = f"{a} peak train memory <= {limit:.2f}x {b}'s" + ("" if shape == MODEL else f" ({shape} shape, random weights)")
    missing = [n for n in (a, b) if n not in by]
    if missing:
        return f"{label}: not run ({', '.join(missing)} missing)"
    x, y = by[a]["peak_train_bytes"], by[b]["peak_train_bytes"]
    xi, yi = by[a]["train_increment_bytes"], by[b]["train_increment_bytes"]
    return (f"{label}: {x / 1e6:.0f} vs {y / 1e6:.0f} MB = {x / y:.2f}x, {'met' if x <= limit * y else 'missed'} "
            f"(rise over RSS loaded {xi / 1e6:.0f} vs {yi / 1e6:.0f} MB = {xi / yi:.2f}x)")


def verdicts(rows: list[dict], args: argparse.Namespace) -> list[str]:
    by = {r["setting"]: r for r in rows if r["status"] == "ok"}
    out = []
    if "memory" in args.parts:
        out.append(memory_ratio(by, "lora", "finetune", TARGET_LORA_VS_FULL, args.shape))
        for q in ("qlora-nf4", "qlora-rtn-w4g64"):
            out.append(memory_ratio(by, q, "lora", TARGET_QLORA_VS_LORA, args.shape))
        c = peer_comparison(by)
        label = f"effspec LoRA s/step <= {TARGET_STEP_TIME:.2f}x peft+Trainer's with the same loss curve (max |dloss| <= {args.loss_tol})"
        if c is None or c["step_time_ratio"] is None:
            out.append(f"{label}: not run (lora or peer-lora missing, or too few steps to time)")
        else:
            e, p = by["lora"], by["peer-lora"]
            ok = c["step_time_ratio"] <= TARGET_STEP_TIME and c["max_abs_loss_diff"] <= args.loss_tol
            out.append(f"{label}: {e['seconds_per_step']:.2f} vs {p['seconds_per_step']:.2f} s = {c['step_time_ratio']:.2f}x; "
                       f"max |dloss| {c['max_abs_loss_diff']:.4f} over {c['steps_compared']} steps, final loss "
                       f"{c['final_loss_effspec']:.4f} vs {c['final_loss_peer']:.4f}: {'met' if ok else 'missed'}")
    if "recovery" in args.parts:
        for name, target in TARGET_RECOVERY.items():
            label = f"{name} recovers >= {target:.0%} of the perplexity gap within {BUDGET_TOKENS:,} training tokens"
            r = by.get(name)
            if r is None:
                out.append(f"{label}: not run")
                continue
            rec = r["recovery"]
            ok = rec is not None and rec >= target and r["tokens"] <= BUDGET_TOKENS
            out.append(f"{label}: ppl {r['ppl_before']:.3f} -> {r['ppl_after']:.3f} (float {r['ppl_float']:.3f}) = "
                       f"{_f(rec, '.1f', 100)}% with {r['tokens']:,} tokens: {'met' if ok else 'missed'}")
    return out


def plot(rows: list[dict], path: Path) -> str:
    """Held-out perplexity against training tokens per recipe, the float and compressed levels as lines."""
    curves = [r for r in rows if r["status"] == "ok" and len(r.get("eval_curve") or []) > 1]
    if not curves:
        return "no recovery curve to plot (eval_every 0, or no recovery row ok)"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"plot skipped: {e}"
    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4.5), squeeze=False)
    for ax, r in zip(axes[0], curves):
        xs, ys = zip(*r["eval_curve"])
        what = "LoRA + distill" if SETTINGS[r["setting"]][2]["train"] == "adapter" else "full-parameter distill"
        ax.plot(xs, ys, marker="o", label=what)
        ax.axhline(r["held_float"], color="green", linestyle="--", label=f"float {r['held_float']:.2f}")
        ax.axhline(r["held_before"], color="red", linestyle=":", label=f"before {r['held_before']:.2f}")
        ax.set_yscale("log")
        ax.set_xlabel("training tokens")
        ax.set_ylabel("held-out perplexity")
        ax.set_title(f"{r['setting']}\ntest ppl {r['ppl_before']:.2f} -> {r['ppl_after']:.2f} (float {r['ppl_float']:.2f})",
                     fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"recovery curve: {path}"


def report(args: argparse.Namespace, run: Run, seconds: float) -> None:
    """Save every row with the comparison, print the tables and the targets, end with the JSON line."""
    rows = [r for r in run.all_rows() if r["part"] in args.parts]  # this run's and cached rows of the same protocol
    mem = [r for r in rows if r["part"] == "memory"]
    rec = [r for r in rows if r["part"] == "recovery"]
    by = {r["setting"]: r for r in rows if r["status"] == "ok"}
    record = {**run.meta, "total_seconds": seconds, "lora_vs_peer": peer_comparison(by), "rows": run.all_rows()}
    env, m = run.meta["env"], run.protocols["memory"]
    peer = by.get("peer-lora", {}).get("versions", {})
    shape = MODEL if args.shape == MODEL else f"{args.shape} shape, random weights (memory and time only)"
    print(f"effspec tuning benchmark: {shape}; training text wiki.valid.raw of {args.data} "
          f"({run.meta['inputs']['train_tokens']:,} tokens, contiguous rows); {args.threads} thread(s); bf16 "
          f"{'on' if m['bf16'] else 'off'}; cpu: {env['cpu']}\n"
          f"effspec {env['effspec']} (torch {env['torch']}, transformers {env['transformers']}); "
          f"peer peft {peer.get('peft', '-')}, transformers {peer.get('transformers', '-')}")
    if mem:
        print(f"\nmemory: {m['steps']} steps x {m['batch_size']} sequences of {m['seqlen']} tokens (micro-batch "
              f"{m['micro_batch']}), cosine after {m['warmup']} warm-up steps, lr {m['lr']} (finetune {m['full_lr']}), "
              f"rank {m['rank']}, activation checkpointing, peer schedule {m['peer_schedule']}\n")
        print(memory_table(mem))
        print("\nloss per step:\n" + "\n".join(loss_lines(mem)))
        c = record["lora_vs_peer"]
        if c:
            print(f"\neffspec LoRA vs peft+Trainer: s/step ratio {_f(c['step_time_ratio'], '.3f')}, total time ratio "
                  f"{_f(c['total_time_ratio'], '.3f')}, max |loss difference| {_f(c['max_abs_loss_diff'], '.4f')}, "
                  f"final loss {c['final_loss_effspec']:.4f} vs {c['final_loss_peer']:.4f}")
    if rec:
        pr = run.protocols["recovery"]
        print(f"\nrecovery: perplexity on the first {args.windows} windows of {args.eval_seqlen} tokens of wiki.test.raw; "
              f"calibration {args.calib_samples} x {args.calib_seqlen}; training {pr['steps']} steps x {pr['batch_size']} x "
              f"{pr['seqlen']} (micro-batch {pr['micro_batch']}, warm-up {pr['warmup']}); teacher: the float model\n")
        print(recovery_table(rec))
        print(plot(rec, args.out.with_name(f"{args.out.stem}-recovery.png")))
    errors = [f"  {r['setting']}: {r['error']}" for r in rows if r["status"] != "ok"]
    if errors:
        print("\nerrors:\n" + "\n".join(errors))
    if lines := notes(mem):
        print("\nnotes:\n" + "\n".join(lines))
    print("\n" + "\n".join(verdicts(rows, args)))
    print(f"\nMB = 1e6 bytes. RSS loaded: after loading (QLoRA: and quantizing) and malloc_trim; peak train: VmHWM of "
          f"the training run alone; process peak: the whole worker's; s/step: median after the first step. "
          f"Rows: {args.out}; worker logs: {run.logs}")
    save(args.out, record)
    print(json.dumps(record, default=str))


# ---- main -----------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    if args.worker is not None:
        return worker(args.worker)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    args.settings = [s for s in args.settings if SETTINGS[s][0] in args.parts]
    if not args.settings:
        print("bench/tune.py: error: no setting of the parts asked for", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="effspec-bench-tune-"))
    try:
        log.info("tokenizing %s", args.data)
        try:
            inputs = write_tokens(args, work / "tokens.pt")
        except Exception as e:  # noqa: BLE001 -- bad data path or too little text: one line, exit 2
            print(f"bench/tune.py: error: {e}", file=sys.stderr)
            return 2
        run = Run(args, inputs, work)
        for name in args.settings:
            run.run(name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(args, run, time.perf_counter() - t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
