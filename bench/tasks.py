"""Zero-shot task benchmark: effspec's task scorer against lm-evaluation-harness on the same local files.

`smollm2-135m` float32 on hellaswag, piqa, arc_easy, winogrande, boolq and
lambada_openai, plus lm-eval's wikitext task (word perplexity, byte perplexity
and bits per byte over the 62 WikiText-2 test articles, rolling 8,192-token
windows), read from ../shared/data (see its MANIFEST.md), scored twice in one run:

- effspec: `effspec.measure.tasks.evaluate_tasks`, in a subprocess of its own
  (python start, imports, model load and scoring all timed).
- lm-eval (the peer): `lm-eval[hf]==0.4.13` in its own virtual environment
  (`--peer-venv`, default bench/.venv-lmeval, created on first use with
  torch==2.13.0 installed first, the CPU build on this machine's disk), driven
  as `lm_eval --model hf` on the cached HF directory of the same model, float32,
  on custom tasks `local_<task>` (bench/lmeval_tasks/*.yaml). Those YAMLs are
  lm-eval's own task definitions (doc_to_text, doc_to_choice, doc_to_target,
  delimiter, metrics) with the hub dataset swapped for local JSON Lines that this
  script writes from the shared files in the hub datasets' field names (PIQA's
  labels joined in, HellaSwag's 6-line text parsed, ARC and LAMBADA turned back
  from MosaicML's format, BoolQ's boolean answer as a 0/1 label, WikiText's raw
  test file cut into articles by the document-level dataset's rule). lm-eval runs
  the multiple-choice tasks at --batch-size and wikitext in a second call at batch
  size 1; its time is the sum of both.

Both sides get the same thread count (`--threads`: OMP_NUM_THREADS,
MKL_NUM_THREADS, RAYON_NUM_THREADS, and torch's intra-op threads) and score the
same documents: with `--limit N` effspec draws its seeded subset of N per task,
and lm-eval is given exactly those documents (`--samples`, by index; lm-eval's
own `--limit` would take the first N instead). Accuracy is compared per task in
points (target |Δ| <= 0.5), wikitext's word perplexity relatively (target
<= 0.1%: one definition, only float rounding may differ); time is wall clock end to end for each side (target
effspec >= 1.5x faster). Timings are one run each on a shared, noisy machine:
compare the ratio, not the seconds.

Then KL divergence and top-1 agreement to float32 for RTN w8 / w4 g64 / w3 g64
on WikiText-2 (`kld_rows`).

Known gaps between these local files and lm-eval's hub datasets (both sides
see the same local text, so they do not affect the comparison; they can make
absolute numbers differ slightly from published lm-eval figures):
- HellaSwag: the local text keeps activity_label + ": " + ctx, already cleaned by
  its extractor; ctx_a and ctx_b are split back at the last sentence end (so that
  lm-eval's ctx_b.capitalize() applies), which is right for ActivityNet items
  ("... on a roof. he") and WikiHow items (empty ctx_b), not guaranteed for all.
- ARC-Easy: MosaicML's copy of the test split (2376 questions, 4 choices each;
  the 7 it padded with a repeated choice get their 3 back).
- BoolQ: the original dev set; SuperGLUE's passage is "title -- passage", so
  the title is joined in the same way.
`--check-prompts` shows that effspec builds the same (context, continuation,
gold) as lm-eval for every document.

Prints a table, writes the rows as JSON to `--out`, and ends stdout with one
JSON line holding all rows.

    python bench/tasks.py --quick --threads 1      # 100 documents per task, a smoke run
    python bench/tasks.py --threads 2              # full sets (the protocol)

The full sets take over five hours on 2 cores (HellaSwag alone: ~1 h effspec,
~2 h lm-eval), more than one sitting on a machine that must stay idle while it
is timed. So a run can score a subset of the tasks (`--tasks`) or one side
(`--side effspec|lmeval`), and `--combine A.json B.json ...` joins such runs into
the one table, each side's time summed over the runs that scored on it:

    python bench/tasks.py --tasks piqa arc_easy winogrande --skip-kld --out bench/results/t1.json
    python bench/tasks.py --tasks hellaswag --side effspec --skip-kld --out bench/results/t2.json
    python bench/tasks.py --tasks hellaswag --side lmeval --skip-kld --out bench/results/t3.json
    python bench/tasks.py --combine bench/results/t1.json bench/results/t2.json bench/results/t3.json

`FILE:effspec` or `FILE:lmeval` takes one side of a run that scored both, e.g. to
pair lm-eval's side of t1.json with a later effspec run of the same tasks.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
DEFAULT_WIKITEXT = DEFAULT_DATA / "wikitext-2-raw"
DEFAULT_OUT = REPO / "bench" / "results" / "tasks.json"
DEFAULT_PEER_VENV = REPO / "bench" / ".venv-lmeval"
YAML_DIR = Path(__file__).resolve().parent / "lmeval_tasks"
MODEL = "smollm2-135m"
TASKS = ("hellaswag", "piqa", "arc_easy", "winogrande", "boolq", "lambada_openai", "wikitext")
ROLLING = ("wikitext",)
ROLLING_METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")  # loglikelihood_rolling over 8,192-token windows: lm-eval runs it at batch size 1 (memory)
TARGET_ROLLING_REL = 1e-3  # word perplexity: the same definition on both sides, so only float rounding may differ
# torch first: the CPU build on this disk (else pip pulls a multi-GB CUDA build). transformers >= 5 reads the
# cached model's config (rope_parameters) and tokenizer (TokenizersBackend); 4.x would misread the RoPE base.
PEER_INSTALL = (("torch==2.13.0",), ("lm-eval[hf]==0.4.13", "transformers>=5"))
KLD_RECIPES = ("rtn-w8", "rtn-w4-g64", "rtn-w3-g64")
QUICK_LIMIT = 100
QUICK_ROLLING_LIMIT = 4  # wikitext articles in a --quick run (each is thousands of tokens)
QUICK_KLD = {"windows": 4, "seqlen": 512}
TARGET_DELTA_PTS, TARGET_SPEEDUP = 0.5, 1.5
SIDES = ("both", "effspec", "lmeval")

log = logging.getLogger("bench.tasks")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA,
                   help="task files in the shared/data layout (default: ../shared/data)")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), metavar="TASK",
                   help=f"subset to run (default: {' '.join(TASKS)})")
    p.add_argument("--limit", type=int, default=None,
                   help="documents per task: effspec's seeded subset, the same documents given to lm-eval (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --limit subset (default 0)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: --limit {QUICK_LIMIT} ({QUICK_ROLLING_LIMIT} wikitext articles), KLD on {QUICK_KLD['windows']} windows of {QUICK_KLD['seqlen']} tokens")
    p.add_argument("--threads", type=int, default=2, help="threads for each side (default 2)")
    p.add_argument("--batch-size", type=int, default=32, help="lm-eval's --batch_size (default 32)")
    p.add_argument("--peer-venv", type=Path, default=DEFAULT_PEER_VENV,
                   help="lm-eval's virtual environment, created when missing (default bench/.venv-lmeval)")
    p.add_argument("--side", choices=SIDES, default="both",
                   help="score on both sides (default), or one; --combine joins one-side runs made at different times")
    p.add_argument("--skip-peer", action="store_true", help="effspec only (the same as --side effspec)")
    p.add_argument("--combine", nargs="+", default=None, metavar="JSON[:SIDE]",
                   help="score nothing: join earlier runs' JSON files into one table, each side's time summed over the runs; "
                        "FILE:effspec or FILE:lmeval takes only that side of a file")
    p.add_argument("--skip-kld", action="store_true", help="no KL-divergence rows")
    p.add_argument("--check-prompts", action="store_true",
                   help="also compare every document's prompt, continuations and gold with lm-eval's own requests (untimed)")
    p.add_argument("--kld-data", type=Path, default=DEFAULT_WIKITEXT,
                   help="text for KLD (default ../shared/data/wikitext-2-raw)")
    p.add_argument("--kld-windows", type=int, default=None, help="KLD windows (default 32; 4 with --quick)")
    p.add_argument("--kld-seqlen", type=int, default=None, help="KLD window length (default 2048; 512 with --quick)")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temporary directory (converted data, lm-eval output)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON file for the rows (default bench/results/tasks.json)")
    p.add_argument("--effspec-worker", type=Path, default=None, help=argparse.SUPPRESS)  # internal: one side's subprocess
    args = p.parse_args(argv)
    if args.effspec_worker is not None:
        return args
    if args.skip_peer:
        args.side = "effspec"
    unknown = [t for t in args.tasks if t not in TASKS]
    if unknown:
        p.error(f"unknown task(s) {', '.join(unknown)}; expected some of {', '.join(TASKS)}")
    args.tasks = [t for t in TASKS if t in args.tasks]
    if args.quick and args.limit is None:
        args.limit = QUICK_LIMIT
    args.limits = {t: min(args.limit, QUICK_ROLLING_LIMIT) if args.quick and t in ROLLING else args.limit
                   for t in args.tasks}  # documents per task (None: all)
    for name in ("threads", "batch_size", "limit", "kld_windows", "kld_seqlen"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    args.kld_windows = args.kld_windows or (QUICK_KLD["windows"] if args.quick else 32)
    args.kld_seqlen = args.kld_seqlen or (QUICK_KLD["seqlen"] if args.quick else 2048)
    return args


# ---- the local files in the hub datasets' fields, for lm-eval ----------------------------------
def _jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _labels(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()]


def split_hellaswag_ctx(ctx: str) -> tuple[str, str]:
    """(ctx_a, ctx_b) back from the file's ctx_a + " " + ctx_b, for lm-eval's ctx_b.capitalize().

    ActivityNet items: ctx_a is whole sentences and ctx_b the lower-case start of the next one
    ("... on a roof. he"); WikiHow items end a sentence and have an empty ctx_b. So ctx_b is
    what follows the last sentence end, unless the ctx itself ends one.
    """
    if re.search(r"[.!?][\"')]*$", ctx):
        return ctx, ""
    cut = 0
    for m in re.finditer(r"[.!?][\"')]*\s+", ctx):
        cut = m.end()
    return ctx[:cut].rstrip(), ctx[cut:]


def peer_docs(name: str, data: Path) -> list[dict]:
    """Task `name`'s documents from the shared/data layout, with the fields lm-eval's official YAML reads."""
    if name == "hellaswag":
        import bz2

        lines = bz2.decompress((data / "hellaswag" / "hellaswag_val_full.txt.bz2").read_bytes()).decode("utf-8").split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        if len(lines) % 6:
            raise ValueError(f"hellaswag: {len(lines)} lines, not 6 per task")
        docs = []
        for i in range(0, len(lines), 6):
            activity, _, ctx = lines[i].partition(": ")
            ctx_a, ctx_b = split_hellaswag_ctx(ctx)
            docs.append({"activity_label": activity, "ctx_a": ctx_a, "ctx_b": ctx_b, "endings": lines[i + 2:i + 6],
                         "label": int(lines[i + 1])})
        return docs
    if name == "piqa":
        docs = _jsonl(data / "piqa" / "valid.jsonl")
        labels = _labels(data / "piqa" / "valid-labels.lst")
        if len(docs) != len(labels):
            raise ValueError(f"piqa: {len(docs)} documents but {len(labels)} labels")
        return [{"goal": d["goal"], "sol1": d["sol1"], "sol2": d["sol2"], "label": y} for d, y in zip(docs, labels)]
    if name == "arc_easy":
        docs = []
        for d in _jsonl(data / "arc_easy" / "arc_easy.jsonl"):
            q = d["query"]
            if not q.startswith("Question: "):
                raise ValueError(f"arc_easy: query without the 'Question: ' prefix: {q[:60]!r}")
            choices = list(dict.fromkeys(d["choices"]))  # MosaicML padded 3-choice questions with a repeat
            keys = [chr(ord("A") + i) for i in range(len(choices))]
            docs.append({"question": q[len("Question: "):], "choices": {"text": choices, "label": keys},
                         "answerKey": keys[choices.index(d["choices"][d["gold"]])]})
        return docs
    if name == "winogrande":
        return [{k: d[k] for k in ("sentence", "option1", "option2", "answer")}
                for d in _jsonl(data / "winogrande" / "dev.jsonl")]
    if name == "boolq":
        return [{"question": d["question"], "passage": f"{d['title']} -- {d['passage']}", "label": int(bool(d["answer"]))}
                for d in _jsonl(data / "boolq" / "dev.jsonl")]
    if name == "lambada_openai":
        return [{"text": d["context"] + " " + d["continuation"]}
                for d in _jsonl(data / "lambada_openai" / "lambada_openai.jsonl")]
    if name == "wikitext":
        from effspec.measure.wikitext import FILE, documents

        return [{"page": p} for p in documents((data / FILE).read_text(encoding="utf-8"))]
    raise ValueError(f"unknown task {name}")


def write_peer_tasks(names: list[str], data: Path, tmp: Path) -> tuple[Path, dict[str, int]]:
    """Converted documents under tmp/data and the local_* YAMLs (paths filled in) under tmp/tasks."""
    data_dir, task_dir = tmp / "data", tmp / "tasks"
    data_dir.mkdir(parents=True, exist_ok=True)
    task_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(YAML_DIR / "utils.py", task_dir / "utils.py")
    counts = {}
    for name in names:
        docs = peer_docs(name, data)
        counts[name] = len(docs)
        with (data_dir / f"{name}.jsonl").open("w", encoding="utf-8") as f:
            for d in docs:
                f.write(json.dumps(d, ensure_ascii=False) + "\n")
        yaml_text = (YAML_DIR / f"local_{name}.yaml").read_text(encoding="utf-8")
        (task_dir / f"local_{name}.yaml").write_text(yaml_text.replace("@DATA@", str(data_dir)), encoding="utf-8")
    return task_dir, counts


# ---- the documents each side scores -------------------------------------------------------------
def subset_indices(name: str, data: Path, n_docs: int, limit: int | None, seed: int) -> list[int] | None:
    """Indices (in file order) of the documents effspec scores with `limit`; None: all of them.

    effspec's own rule (`effspec.measure.tasks.subset`), after checking that it reads the
    same number of documents as the converted file, so index i is document i on both sides.
    """
    if limit is None or limit >= n_docs:
        return None
    from effspec.measure.tasks import load_task, subset
    from effspec.measure.wikitext import load_pages

    n = len(load_pages(data)) if name in ROLLING else len(load_task(name, data))
    if n != n_docs:
        raise ValueError(f"{name}: effspec reads {n} documents, the converted file has {n_docs}; "
                         "cannot give lm-eval the same subset")
    return subset(n_docs, limit, seed)


# lm-eval's requests for every document, built by lm-eval itself in its venv (no model needed):
# {task: [[[context, continuation], ...], gold], ...} in document order.
DUMP_REQUESTS = """
import json, sys
from lm_eval.tasks import TaskManager, get_task_dict
task_dir, names, out = sys.argv[1], sys.argv[2].split(","), sys.argv[3]
res = {}
for name, task in get_task_dict(names, TaskManager(include_path=task_dir)).items():
    task.build_all_requests(limit=None, rank=0, world_size=1)
    per = {}
    for inst in task.instances:
        per.setdefault(inst.doc_id, []).append(list(inst.arguments))
    docs = list(task.eval_docs)
    gold = [task.doc_to_text(d) if task.multiple_input else task.doc_to_target(d) for d in docs]
    res[name] = [[per[i], gold[i]] for i in sorted(per)]
json.dump(res, open(out, "w"))
"""


def check_prompts(args: argparse.Namespace, venv: Path, task_dir: Path, tmp: Path) -> list[dict]:
    """Compare effspec's (context, continuation, gold) with lm-eval's requests, document by document."""
    out = tmp / "lmeval_requests.json"
    env = thread_env(args.threads)
    env["HF_DATASETS_CACHE"] = str(tmp / "hf_datasets_check")
    proc = subprocess.run([str(venv / "bin" / "python"), "-c", DUMP_REQUESTS, str(task_dir),
                           ",".join(f"local_{t}" for t in args.tasks), str(out)], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise PeerUnavailable(f"building lm-eval's requests: {_last_error(proc.stderr, proc.returncode)}")
    from effspec.measure.tasks import load_task
    from effspec.measure.wikitext import detokenize, load_pages

    requests = json.loads(out.read_text())
    rows = []
    for t in args.tasks:
        theirs = requests[f"local_{t}"]
        if t in ROLLING:  # one request per document: the detokenized page
            ours = [detokenize(p) for p in load_pages(args.data)]
            differ = [i for i, (text, (pairs, _)) in enumerate(zip(ours, theirs)) if pairs != [[text]]]
            rows.append({"kind": "prompts", "task": t, "docs_effspec": len(ours), "docs_lmeval": len(theirs),
                         "differing": len(differ) + abs(len(ours) - len(theirs)), "first_differing": differ[:10]})
            continue
        ours = load_task(t, args.data)
        differ = []
        for i, (ex, (pairs, gold)) in enumerate(zip(ours, theirs)):
            same_gold = t == "lambada_openai" or int(gold) == ex.gold
            if [tuple(p) for p in pairs] != list(zip(ex.contexts, ex.continuations)) or not same_gold:
                differ.append(i)
        rows.append({"kind": "prompts", "task": t, "docs_effspec": len(ours), "docs_lmeval": len(theirs),
                     "differing": len(differ) + abs(len(ours) - len(theirs)), "first_differing": differ[:10]})
    return rows


# ---- effspec's side ------------------------------------------------------------------------------
def thread_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS"):
        env[var] = str(threads)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", EFFSPEC_PROGRESS="0",
               TOKENIZERS_PARALLELISM="false")
    return env


def effspec_worker(spec_path: Path) -> int:
    """Subprocess body: load the model, score the tasks, write the results beside the spec."""
    spec = json.loads(spec_path.read_text())
    t0 = time.perf_counter()
    import torch

    torch.set_num_threads(spec["threads"])
    from effspec.measure.tasks import evaluate_tasks
    from effspec.models import load_model

    loaded = load_model(MODEL)
    t_load = time.perf_counter() - t0
    results = {}
    for name in spec["tasks"]:
        results.update(evaluate_tasks(loaded.model, loaded.tokenizer, [name], Path(spec["data"]), spec["limits"][name],
                                      spec["seed"]))
    tasks = {name: {"n": r.n, "acc": r.acc, "acc_norm": r.acc_norm, "perplexity": r.perplexity, "seconds": r.seconds,
                    **{k: getattr(r, k) for k in ROLLING_METRICS}} for name, r in results.items()}
    out = {"load_seconds": t_load, "threads": torch.get_num_threads(), "tasks": tasks,
           "inner_seconds": time.perf_counter() - t0}
    spec_path.with_suffix(".out.json").write_text(json.dumps(out))
    return 0


def run_effspec(args: argparse.Namespace, tmp: Path) -> dict:
    """Run effspec's side in a subprocess; its results and wall time, or {"error": ...}."""
    spec = tmp / "effspec_spec.json"
    spec.write_text(json.dumps({"tasks": args.tasks, "data": str(args.data), "limits": args.limits,
                                "seed": args.seed, "threads": args.threads}))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--effspec-worker", str(spec)]
    log.info("effspec: scoring %s%s", ", ".join(args.tasks), f" (limit {args.limit})" if args.limit else "")
    proc, wall, cpu = timed_run(cmd, thread_env(args.threads))
    (tmp / "effspec.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        return {"error": _last_error(proc.stderr, proc.returncode), "wall_seconds": wall}
    out = json.loads(spec.with_suffix(".out.json").read_text())
    out.update(wall_seconds=wall, cpu_seconds=cpu)
    return out


def timed_run(cmd: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float, float]:
    """(result, wall seconds, CPU seconds) of a subprocess; CPU time (user + system, all threads) is
    robust to other load on a shared machine, wall time is what a user waits."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return proc, wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _last_error(stderr: str, code: int) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return (lines[-1] if lines else f"exit code {code}")[:300]


# ---- the peer: lm-eval in its own virtual environment -------------------------------------------
class PeerUnavailable(Exception):
    pass


def ensure_peer_venv(venv: Path) -> Path:
    """The venv's lm_eval executable, creating the venv (torch first, then lm-eval) when it is missing."""
    exe = venv / "bin" / "lm_eval"
    stamp = venv / ".bench-installed"
    want = " ".join(p for step in PEER_INSTALL for p in step)
    if exe.is_file() and stamp.is_file() and stamp.read_text().strip() == want:
        return exe
    log.info("creating lm-eval's virtual environment in %s (a few minutes, once)", venv)
    steps = [[sys.executable, "-m", "venv", str(venv)]]
    steps += [[str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *pkgs] for pkgs in PEER_INSTALL]
    for cmd in steps:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise PeerUnavailable(f"{' '.join(cmd[-2:])}: {_last_error(proc.stderr, proc.returncode)}")
    if not exe.is_file():
        raise PeerUnavailable(f"{exe} missing after installing {want}")
    stamp.write_text(want + "\n")
    return exe


def peer_versions(venv: Path, threads: int) -> dict:
    code = ("import json, torch, transformers, importlib.metadata as m; "
            "print(json.dumps({'lm_eval': m.version('lm-eval'), 'torch': torch.__version__, "
            "'transformers': transformers.__version__, 'threads': torch.get_num_threads()}))")
    proc = subprocess.run([str(venv / "bin" / "python"), "-c", code], env=thread_env(threads),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise PeerUnavailable(f"importing lm-eval's dependencies: {_last_error(proc.stderr, proc.returncode)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def model_dir() -> Path:
    """The cached HF directory of smollm2-135m that effspec loads (created on first load)."""
    from effspec.fsutil import cache_dir
    from effspec.models import FORMAT_VERSION, load_model

    path = cache_dir() / "models" / f"{MODEL}-v{FORMAT_VERSION}"
    if not (path / "config.json").is_file():
        load_model(MODEL)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: effspec did not cache {MODEL} there (has FORMAT_VERSION changed?)")
    return path


def run_peer(args: argparse.Namespace, exe: Path, model: Path, task_dir: Path, samples: dict[str, list[int]],
             tmp: Path) -> dict:
    """lm_eval on the local_* tasks; its metrics per task and wall time, or {"error": ...}.

    The multiple-choice tasks run in one lm_eval call at --batch-size; wikitext in a second call at
    batch size 1 (a batch of 8,192-token windows would hold batch x 8,192 x 49,152 float32 logits).
    Wall and CPU time are the sum of both calls.
    """
    groups = [([t for t in args.tasks if t not in ROLLING], args.batch_size), ([t for t in args.tasks if t in ROLLING], 1)]
    tasks: dict = {}
    wall = cpu = 0.0
    for i, (names, batch) in enumerate(g for g in groups if g[0]):
        out_dir = tmp / f"lmeval_out{i}"
        cmd = [str(exe), "run", "--model", "hf", "--model_args", f"pretrained={model},dtype=float32",
               "--device", "cpu", "--batch_size", str(batch), "--include_path", str(task_dir),
               "--tasks", ",".join(f"local_{t}" for t in names), "--output_path", str(out_dir),
               "--seed", str(args.seed)]
        picked = {f"local_{t}": samples[t] for t in names if t in samples}
        if picked:
            cmd += ["--samples", json.dumps(picked)]
        env = thread_env(args.threads)
        env["HF_DATASETS_CACHE"] = str(tmp / "hf_datasets")  # fresh: lm-eval's data preparation is part of its time
        log.info("lm-eval: scoring %s (batch size %d)", ", ".join(names), batch)
        proc, w, c = timed_run(cmd, env)
        wall, cpu = wall + w, cpu + c
        with (tmp / "lmeval.log").open("a") as f:
            f.write(" ".join(cmd) + "\n\n" + proc.stdout + proc.stderr + "\n")
        if proc.returncode != 0:
            return {"error": _last_error(proc.stderr, proc.returncode), "wall_seconds": wall}
        found = sorted(out_dir.rglob("results_*.json"))
        if not found:
            return {"error": f"no results_*.json under {out_dir}", "wall_seconds": wall}
        res = json.loads(found[-1].read_text())
        for t in names:
            m = res["results"].get(f"local_{t}", {})
            n = res.get("n-samples", {}).get(f"local_{t}", {}).get("effective")
            tasks[t] = {"n": n, **{k: m.get(f"{k},none") for k in ("acc", "acc_norm", "perplexity", *ROLLING_METRICS)}}
    return {"tasks": tasks, "wall_seconds": wall, "cpu_seconds": cpu}


# ---- KL divergence of RTN settings (effspec only) -----------------------------------------------
def kld_rows(args: argparse.Namespace) -> list[dict]:
    """KL divergence and top-1 agreement to float32 of `smollm2-135m` under RTN w8 / w4 g64 / w3 g64.

    Scores float32 once on the WikiText-2 test windows (its top-k distributions
    are the reference, cached by effspec), then each recipe on a fresh load, with
    only the "kld" measure (which also yields perplexity). Expected: w8 KLD tiny,
    each lower bit width clearly larger, top-1 agreement falling.
    """
    import torch

    from effspec.data import load_text
    from effspec.models import fingerprint, load_model
    from effspec.pipeline import Evaluation, MeasureConfig, apply_recipe
    from effspec.recipe import load_recipe

    torch.set_num_threads(args.threads)
    mcfg = MeasureConfig(windows=args.kld_windows, seqlen=args.kld_seqlen, kld=True)
    loaded = load_model(MODEL)
    fp = fingerprint(loaded.model)
    ev = Evaluation(loaded, load_text(str(args.kld_data)), mcfg)
    t0 = time.perf_counter()
    reference = ev.build_reference(loaded.model, fp)
    float_row = ev.measure(loaded.model, ("perplexity",))
    log.info("kld: float32 reference in %.0f s, perplexity %.3f", time.perf_counter() - t0, float_row["perplexity"])
    rows = []
    for name in KLD_RECIPES:
        t0 = time.perf_counter()
        model = apply_recipe(load_model(MODEL).model, load_recipe(name), ev)
        m = ev.measure(model, ("kld",), reference, fp)
        rows.append({"kind": "kld", "recipe": name, "kld_mean": m.get("kld_mean"), "kld_p99": m.get("kld_p99"),
                     "top1_agreement": m.get("top1_agreement"), "reference_mass": m.get("reference_mass"),
                     "perplexity": m.get("perplexity"), "float_perplexity": float_row["perplexity"],
                     "windows": args.kld_windows, "seqlen": args.kld_seqlen, "seconds": time.perf_counter() - t0})
        log.info("kld: %s mean %.5f, top-1 %.4f", name, m.get("kld_mean", float("nan")), m.get("top1_agreement", float("nan")))
        del model
    return rows


# ---- report ---------------------------------------------------------------------------------------
def task_rows(names: list[str], ours: dict, peer: dict | None) -> list[dict]:
    rows = []
    for t in names:
        e = ours.get("tasks", {}).get(t, {})
        p = (peer or {}).get("tasks", {}).get(t, {})
        if t in ROLLING:
            row = {"kind": "rolling", "task": t, "n_effspec": e.get("n"), "n_lmeval": p.get("n"),
                   "effspec": {k: e.get(k) for k in (*ROLLING_METRICS, "seconds")},
                   "lmeval": {k: p.get(k) for k in ROLLING_METRICS}}
            a, b = e.get("word_perplexity"), p.get("word_perplexity")
            row["rel_delta_word_perplexity"] = abs(a - b) / b if a is not None and b else None
            row["within_target"] = (row["rel_delta_word_perplexity"] <= TARGET_ROLLING_REL
                                    if row["rel_delta_word_perplexity"] is not None else None)
            rows.append(row)
            continue
        row = {"kind": "task", "task": t, "n_effspec": e.get("n"), "n_lmeval": p.get("n"),
               "effspec": {k: e.get(k) for k in ("acc", "acc_norm", "perplexity", "seconds")},
               "lmeval": {k: p.get(k) for k in ("acc", "acc_norm", "perplexity")}}
        for metric in ("acc", "acc_norm"):
            a, b = e.get(metric), p.get(metric)
            row[f"delta_{metric}_pts"] = abs(a - b) * 100 if a is not None and b is not None else None
        deltas = [row[f"delta_{m}_pts"] for m in ("acc", "acc_norm") if row[f"delta_{m}_pts"] is not None]
        row["within_target"] = max(deltas) <= TARGET_DELTA_PTS if deltas else None
        rows.append(row)
    return rows


def _fmt(x, spec: str = ".2f", scale: float = 1.0) -> str:
    return "-" if x is None else format(x * scale, spec)


def table(rows: list[dict]) -> str:
    header = ("task", "n", "effspec acc", "acc_norm", "lm-eval acc", "acc_norm", "|Δ acc| pts", "|Δ norm| pts",
              "ppl effspec", "ppl lm-eval")
    lines = [header]
    for r in rows:
        n = r["n_effspec"] if r["n_effspec"] == r["n_lmeval"] or r["n_lmeval"] is None else f"{r['n_effspec']}/{r['n_lmeval']}"
        e, p = r["effspec"], r["lmeval"]
        lines.append((r["task"], str(n if n is not None else "-"), _fmt(e["acc"], ".2f", 100), _fmt(e["acc_norm"], ".2f", 100),
                      _fmt(p["acc"], ".2f", 100), _fmt(p["acc_norm"], ".2f", 100), _fmt(r["delta_acc_pts"]),
                      _fmt(r["delta_acc_norm_pts"]), _fmt(e["perplexity"], ".3f"), _fmt(p["perplexity"], ".3f")))
    return _render(lines)


def rolling_table(rows: list[dict]) -> str:
    lines = [("task", "n", "side", "word perplexity", "byte perplexity", "bits/byte")]
    for r in rows:
        for side, name in (("effspec", "effspec"), ("lmeval", "lm-eval")):
            v = r[side]
            n = r["n_effspec"] if side == "effspec" else r["n_lmeval"]
            lines.append((r["task"], str(n if n is not None else "-"), name, _fmt(v["word_perplexity"], ".4f"),
                          _fmt(v["byte_perplexity"], ".5f"), _fmt(v["bits_per_byte"], ".5f")))
    return _render(lines)


def kld_table(rows: list[dict]) -> str:
    lines = [("setting", "KLD mean", "KLD p99", "top-1 agree %", "perplexity", "float ppl", "top-k mass", "s")]
    for r in rows:
        if "error" in r:
            lines.append((r["recipe"], "error: " + r["error"], "", "", "", "", "", ""))
            continue
        lines.append((r["recipe"], _fmt(r["kld_mean"], ".5f"), _fmt(r["kld_p99"], ".4f"), _fmt(r["top1_agreement"], ".2f", 100),
                      _fmt(r["perplexity"], ".3f"), _fmt(r["float_perplexity"], ".3f"), _fmt(r["reference_mass"], ".4f"),
                      _fmt(r["seconds"], ".0f")))
    return _render(lines)


def _render(lines: list[tuple]) -> str:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    fmt = lambda line: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))  # noqa: E731
    return "\n".join([fmt(lines[0]), "  ".join("-" * w for w in widths)] + [fmt(line) for line in lines[1:]])


def combine_source(arg: str) -> tuple[Path, tuple[str, ...]]:
    """`FILE` (both sides it scored) or `FILE:effspec` / `FILE:lmeval` (that side only)."""
    head, _, side = arg.rpartition(":")
    if head and side in ("effspec", "lmeval"):
        return Path(head), (side,)
    return Path(arg), ("effspec", "lmeval")


def combine(args: list[str]) -> dict:
    """One record from runs of this script made at different times, e.g. `--side effspec` in one
    session and `--side lmeval` in another, or one task per run.

    Each task takes its effspec result from the one file that scored it on effspec's side, and its
    lm-eval result likewise; a side scored twice for a task is an error (say which run counts by
    leaving the other out). Each side's time is the sum of its runs' end-to-end times, so every run
    still pays its own process start and model load. The runs must share model, limit, seed,
    threads and lm-eval batch size.
    """
    records, sides_of = [], {}
    for arg in args:
        path, sides = combine_source(arg)
        sides_of[path] = sides
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: cannot read it ({e})") from None
        if rec.get("benchmark") != "tasks" or not any(r.get("kind") == "timing" for r in rec.get("rows", [])):
            raise ValueError(f"{path}: not a result file of bench/tasks.py")
        records.append((path, rec))
    paths = [path for path, _ in records]
    if len({path.resolve() for path in paths}) != len(paths):
        raise ValueError("a file is named twice; name it once, with or without a side")
    shared = ("model", "limit", "seed", "threads", "lmeval_batch_size")
    first = records[0][1]
    for path, rec in records[1:]:
        differ = [k for k in shared if rec.get(k) != first.get(k)]
        if differ:
            raise ValueError(f"{path} and {records[0][0]} differ in {', '.join(differ)}; only like runs combine")
    sources: dict[str, dict[str, tuple[Path, dict]]] = {"effspec": {}, "lmeval": {}}
    timing = {"kind": "timing", "runs": []}
    for path, rec in records:
        t = next(r for r in rec["rows"] if r["kind"] == "timing")
        contributes = set()
        for r in rec["rows"]:
            if r["kind"] not in ("task", "rolling"):
                continue
            for side in sides_of[path]:
                if r[f"n_{side}"] is None:
                    continue
                if r["task"] in sources[side]:
                    raise ValueError(f"{r['task']} was scored on {side}'s side in both {sources[side][r['task']][0]} "
                                     f"and {path}; leave one of them out")
                sources[side][r["task"]] = (path, r)
                contributes.add(side)
        if not contributes:
            raise ValueError(f"{path} scored nothing on {' or '.join(sides_of[path])}'s side")
        for side in contributes:
            for k in ("wall_seconds", "cpu_seconds"):
                timing[f"{side}_{k}"] = timing.get(f"{side}_{k}", 0.0) + (t.get(f"{side}_{k}") or 0.0)
        # a side left out of this file (FILE:SIDE) shows no time here, as it adds none to the sums
        timing["runs"].append({"file": path.name, "tasks": rec.get("tasks"), "sides": sorted(contributes),
                               **{f"{side}_wall_seconds": t.get(f"{side}_wall_seconds") if side in contributes else None
                                  for side in ("effspec", "lmeval")},
                               "load_average": t.get("load_average")})
    names = [t for t in TASKS if t in sources["effspec"] or t in sources["lmeval"]]
    ours = {"tasks": {t: {"n": r["n_effspec"], **r["effspec"]} for t, (_, r) in sources["effspec"].items()}}
    peer = {"tasks": {t: {"n": r["n_lmeval"], **r["lmeval"]} for t, (_, r) in sources["lmeval"].items()}}
    rows = task_rows(names, ours, peer)
    ok = all(f"{side}_wall_seconds" in timing for side in ("effspec", "lmeval"))
    ok = ok and set(sources["effspec"]) == set(sources["lmeval"])  # a ratio only over the same tasks
    for side in ("effspec", "lmeval"):
        for k in ("wall_seconds", "cpu_seconds"):
            timing.setdefault(f"{side}_{k}", None)
    timing.update(effspec_threads=first.get("threads"), lmeval_threads=first.get("threads"),
                  load_average=max((r["load_average"] or [0.0]) for r in timing["runs"]))
    timing["speedup"] = timing["lmeval_wall_seconds"] / timing["effspec_wall_seconds"] if ok else None
    timing["cpu_speedup"] = timing["lmeval_cpu_seconds"] / timing["effspec_cpu_seconds"] if ok else None
    rows.append(timing)
    for _, rec in records:
        rows += [r for r in rec["rows"] if r["kind"] in ("kld", "prompts", "error")]
    meta = {k: first.get(k) for k in ("benchmark", "model", "data", "limit", "seed", "quick", "threads", "lmeval_batch_size")}
    meta.update(tasks=names, combined=[str(p) for p in paths], lmeval_env=next((r["lmeval_env"] for _, r in records if "lmeval_env" in r), {}),
                env=first.get("env", {}), kld_data=first.get("kld_data"),
                total_seconds=sum(r.get("total_seconds") or 0.0 for _, r in records))
    return {**meta, "rows": rows}


def report(record: dict) -> str:
    """The printed tables of one record (a run, or runs combined)."""
    rows = record["rows"]
    trows = [r for r in rows if r["kind"] == "task"]
    rolling = [r for r in rows if r["kind"] == "rolling"]
    t = next(r for r in rows if r["kind"] == "timing")
    lm, env = record.get("lmeval_env", {}), record.get("env", {})
    out = [f"effspec task benchmark: {record['model']} float32, zero-shot, on {record['data']}"
           + (f"  [--limit {record['limit']}: seeded subset (seed {record['seed']}), the same documents on both sides]"
              if record["limit"] else "  [full sets]")]
    out.append(f"threads {record['threads']} each side (effspec torch {t['effspec_threads']}, lm-eval torch {t['lmeval_threads']}); "
               f"lm-eval {lm.get('lm_eval', '-')} (transformers {lm.get('transformers', '-')}, batch size {record['lmeval_batch_size']}); "
               f"effspec {env.get('effspec', '-')} (transformers {env.get('transformers', '-')}); cpu: {env.get('cpu', '-')}")
    for r in rows:
        if r["kind"] == "error":
            out.append(f"{r['side']}: {r['error']}")
    if record.get("combined"):
        out.append(f"combined from {len(t['runs'])} runs; each side's time is the sum over the runs that scored on it:")
        for run in t["runs"]:
            out.append(f"  {run['file']}: {', '.join(run['tasks'])} on {' and '.join(run['sides'])}: effspec "
                       f"{_fmt(run['effspec_wall_seconds'], '.1f')} s, lm-eval {_fmt(run['lmeval_wall_seconds'], '.1f')} s, "
                       f"load average at the end {_fmt((run['load_average'] or [None])[0])}")
    out.append("")
    if trows:
        out += [table(trows), ""]
    if rolling:
        out.append(rolling_table(rolling))
        for r in rolling:
            rel = r["rel_delta_word_perplexity"]
            out.append(f"{r['task']}: word perplexity differs by {_fmt(rel * 100 if rel is not None else None, '.4f')}% "
                       f"(target <= {TARGET_ROLLING_REL * 100:g}%: the same definition, only float rounding may differ)")
        out.append("")
    out.append(f"wall, end to end (process start, model load, scoring): effspec {_fmt(t['effspec_wall_seconds'], '.1f')} s, "
               f"lm-eval {_fmt(t['lmeval_wall_seconds'], '.1f')} s, effspec speedup {_fmt(t['speedup'], '.2f')}x "
               f"(target >= {TARGET_SPEEDUP}x)")
    out.append(f"CPU time (user + system): effspec {_fmt(t['effspec_cpu_seconds'], '.1f')} s, "
               f"lm-eval {_fmt(t['lmeval_cpu_seconds'], '.1f')} s, ratio {_fmt(t['cpu_speedup'], '.2f')}x; "
               f"load average at the end {t['load_average'][0]:.2f} on {os.cpu_count()} cores")
    deltas = [r for r in trows if r["within_target"] is False]
    if trows and any(r["within_target"] is not None for r in trows):
        out.append(f"accuracy: {'all tasks within' if not deltas else 'outside'} {TARGET_DELTA_PTS} points"
                   + ("" if not deltas else ": " + ", ".join(r["task"] for r in deltas)))
    prompts = [r for r in rows if r["kind"] == "prompts"]
    if prompts:
        out.append("prompts (every document's contexts, continuations and gold against lm-eval's own requests): " + "; ".join(
            f"{r['task']}: error {r['error']}" if "error" in r else
            f"{r['task']} {r['differing']}/{max(r['docs_effspec'], r['docs_lmeval'])} differ"
            + (f" (first: {r['first_differing'][:3]})" if r["differing"] else "") for r in prompts))
    kld = [r for r in rows if r["kind"] == "kld"]
    if kld:
        w = next((r for r in kld if "windows" in r), {})
        out += ["", f"KL divergence to float32 on {record.get('kld_data') or 'WikiText-2'} "
                    f"({w.get('windows', '-')} windows of {w.get('seqlen', '-')} tokens):", kld_table(kld)]
    return "\n".join(out)


def write_record(record: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1, default=str) + "\n", encoding="utf-8")
    print(report(record))
    print(f"\nRows: {out}")
    print(json.dumps(record, default=str))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.effspec_worker is not None:
        return effspec_worker(args.effspec_worker)
    if args.combine:
        try:
            record = combine(args.combine)
        except ValueError as e:
            print(f"bench/tasks.py: error: {e}", file=sys.stderr)
            return 2
        write_record(record, args.out)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))  # this process: subset mapping and KLD
    t_start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="effspec-bench-tasks-"))
    rows: list[dict] = []
    meta: dict = {"benchmark": "tasks", "model": MODEL, "data": str(args.data), "tasks": args.tasks, "limit": args.limit, "limits": args.limits,
                  "seed": args.seed, "quick": args.quick, "threads": args.threads, "lmeval_batch_size": args.batch_size,
                  "side": args.side, "kld_data": str(args.kld_data)}
    ours: dict = {}
    try:
        try:
            task_dir, counts = write_peer_tasks(args.tasks, args.data, tmp)
        except (OSError, ValueError, KeyError) as e:
            print(f"bench/tasks.py: error: cannot read the task files under {args.data}: {e}", file=sys.stderr)
            return 2
        meta["documents"] = counts
        if args.side != "lmeval":
            ours = run_effspec(args, tmp)
            if "error" in ours:
                log.error("effspec failed: %s (log: %s)", ours["error"], tmp / "effspec.log")
                rows.append({"kind": "error", "side": "effspec", "error": ours["error"]})
        peer: dict | None = None
        if args.side != "effspec":
            try:
                exe = ensure_peer_venv(args.peer_venv)
                meta["lmeval_env"] = peer_versions(args.peer_venv, args.threads)
                samples = {}
                for t in args.tasks:
                    idx = subset_indices(t, args.data, counts[t], args.limits[t], args.seed)
                    if idx is not None:
                        samples[t] = idx
                peer = run_peer(args, exe, model_dir(), task_dir, samples, tmp)
            except (PeerUnavailable, OSError, ValueError, ImportError) as e:
                peer = {"error": str(e)}
            if args.check_prompts and "error" not in peer:
                try:
                    rows += check_prompts(args, args.peer_venv, task_dir, tmp)
                except (PeerUnavailable, OSError, ValueError) as e:
                    rows.append({"kind": "prompts", "task": ",".join(args.tasks), "error": str(e)})
            if "error" in peer:
                log.error("lm-eval: %s (log: %s)", peer["error"], tmp / "lmeval.log")
                rows.append({"kind": "error", "side": "lmeval", "error": f"peer unavailable: {peer['error']}"})
        rows += task_rows(args.tasks, ours, peer)  # "task" and "rolling" rows
        timing = {"kind": "timing", "effspec_wall_seconds": ours.get("wall_seconds"),
                  "effspec_cpu_seconds": ours.get("cpu_seconds"), "effspec_load_seconds": ours.get("load_seconds"),
                  "effspec_threads": ours.get("threads"), "lmeval_wall_seconds": (peer or {}).get("wall_seconds"),
                  "lmeval_cpu_seconds": (peer or {}).get("cpu_seconds"),
                  "lmeval_threads": meta.get("lmeval_env", {}).get("threads"), "load_average": os.getloadavg()}
        ok = bool(ours) and "error" not in ours and peer is not None and "error" not in peer
        timing["speedup"] = timing["lmeval_wall_seconds"] / timing["effspec_wall_seconds"] if ok else None
        timing["cpu_speedup"] = timing["lmeval_cpu_seconds"] / timing["effspec_cpu_seconds"] if ok else None
        rows.append(timing)
        if not args.skip_kld:
            try:
                rows += kld_rows(args)
            except Exception as e:  # noqa: BLE001 -- unfinished part (see kld_rows); report, keep the task rows
                log.exception("kld failed")
                rows.append({"kind": "kld", "recipe": ",".join(KLD_RECIPES), "error": f"{type(e).__name__}: {e}"[:300]})
    finally:
        if args.keep_tmp:
            log.info("kept %s", tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    from effspec.pipeline import environment

    meta["env"] = environment()
    meta["total_seconds"] = time.perf_counter() - t_start
    write_record({**meta, "rows": rows}, args.out)
    return 0 if "error" not in ours else 1


if __name__ == "__main__":
    sys.exit(main())
