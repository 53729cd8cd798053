"""Zero-shot multiple-choice and cloze tasks, scored the way lm-evaluation-harness 0.4.x scores them.

Each task turns a record into one `Example`: a context and a continuation per
choice (the continuation carries lm-eval's target delimiter " "), and the gold
index. What the model sees, per task (lm-eval's task YAMLs; `|` separates choices):

- `hellaswag`: `"{activity_label}: {ctx_a} {ctx_b.capitalize()}"` cleaned by
  lm-eval's `preprocess` (strip, `" [title]"` -> `". "`, drop `[...]`, `"  "` -> `" "`);
  choices `" " + preprocess(ending)`; acc, acc_norm.
- `piqa`: `"Question: {goal}\\nAnswer:"`; `" {sol1}" | " {sol2}"`; acc, acc_norm.
- `arc_easy`: `"Question: {question}\\nAnswer:"`; `" {choice}"` each; acc, acc_norm.
- `winogrande`: partial evaluation: the context is the sentence up to `_` with
  the option filled in, one per option; the shared continuation is
  `" " + sentence after "_" (stripped)`; acc.
- `boolq`: `"{title} -- {passage}\\nQuestion: {question}?\\nAnswer:"` (SuperGLUE's
  passage carries the title); `" no" | " yes"`; acc.
- `lambada_openai`: the text without its last space-separated word; continuation
  `" " + last word`; acc (greedy decoding reproduces the whole continuation) and
  perplexity `exp(-mean loglikelihood)`.

Scoring (lm-eval's `loglikelihood`): trailing whitespace of the context moves to
the continuation; `context_ids = encode(context)`, `continuation_ids =
encode(context + continuation)[len(context_ids):]`, no special tokens; an
empty context is the BOS token (else EOS). A choice's loglikelihood is the sum
of log-softmax over its continuation tokens; acc takes the argmax, acc_norm the
argmax of loglikelihood / len(choice) in characters.

Speed: the choices of one example share a token prefix (the context; for
WinoGrande the sentence up to the blank). It is run once, its KV cache is
repeated for the choices, and only the differing tails run as one batch, with
the LM head applied to the continuation positions only. Right-padding the
tails changes nothing: causal attention never looks ahead.

Data: `load_task` reads the local layouts of shared/data (see its docstring), or
the hub datasets lm-eval uses when HF `datasets` is installed and no directory is given.
"""

from __future__ import annotations

import bz2
import json
import logging
import math
import os
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from effspec.errors import UserError
from effspec.progress import track

log = logging.getLogger(__name__)

TASKS: tuple[str, ...] = ("hellaswag", "piqa", "arc_easy", "winogrande", "boolq", "lambada_openai")
TARGET_DELIMITER = " "  # lm-eval's default target_delimiter, the same for all six tasks
REPORTS_ACC_NORM = frozenset({"hellaswag", "piqa", "arc_easy"})
TASKS_DIR_ENV = "EFFSPEC_TASKS_DIR"

# Local files, relative to the tasks directory (the shared/data layout).
FILES = {
    "hellaswag": "hellaswag/hellaswag_val_full.txt.bz2",
    "piqa": "piqa/valid.jsonl",
    "arc_easy": "arc_easy/arc_easy.jsonl",
    "winogrande": "winogrande/dev.jsonl",
    "boolq": "boolq/dev.jsonl",
    "lambada_openai": "lambada_openai/lambada_openai.jsonl",
}
PIQA_LABELS = "piqa/valid-labels.lst"

# The hub datasets of lm-eval's task YAMLs: (path, name, split).
HUB = {
    "hellaswag": ("Rowan/hellaswag", None, "validation"),
    "piqa": ("baber/piqa", None, "validation"),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy", "test"),
    "winogrande": ("allenai/winogrande", "winogrande_xl", "validation"),
    "boolq": ("aps/super_glue", "boolq", "validation"),
    "lambada_openai": ("EleutherAI/lambada_openai", "default", "test"),
}


@dataclass(frozen=True)
class Example:
    contexts: tuple[str, ...]  # one per choice (winogrande differs per choice); else the same string repeated
    continuations: tuple[str, ...]  # one per choice, delimiter included (e.g. " yes")
    gold: int


@dataclass
class TaskResult:
    task: str
    n: int
    acc: float  # in [0, 1]
    acc_norm: float | None
    perplexity: float | None  # lambada_openai only
    seconds: float


def _choices(context: str, choices: Sequence[str], gold: int) -> Example:
    return Example((context,) * len(choices), tuple(TARGET_DELIMITER + c for c in choices), gold)


# ---- records in lm-eval's (hub) form -> Example --------------------------------------------------
def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag cleaner (order matters: strip first, collapse double spaces once, last)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(doc: dict) -> Example:
    query = hellaswag_preprocess(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())
    return _choices(query, [hellaswag_preprocess(e) for e in doc["endings"]], int(doc["label"]))


def _piqa(doc: dict) -> Example:
    return _choices(f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], int(doc["label"]))


def _arc(doc: dict) -> Example:
    gold = doc["choices"]["label"].index(doc["answerKey"])
    return _choices(f"Question: {doc['question']}\nAnswer:", list(doc["choices"]["text"]), gold)


def _winogrande(doc: dict) -> Example:
    blank = doc["sentence"].index("_")
    contexts = tuple(doc["sentence"][:blank] + option for option in (doc["option1"], doc["option2"]))
    target = TARGET_DELIMITER + doc["sentence"][blank + 1 :].strip()
    return Example(contexts, (target, target), {"1": 0, "2": 1}[doc["answer"]])


def _boolq(doc: dict) -> Example:
    return _choices(f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:", ["no", "yes"], int(doc["label"]))


def _lambada(doc: dict) -> Example:
    words = doc["text"].split(" ")
    return Example((" ".join(words[:-1]),), (TARGET_DELIMITER + words[-1],), 0)


FROM_HUB: dict[str, Callable[[dict], Example]] = {
    "hellaswag": _hellaswag, "piqa": _piqa, "arc_easy": _arc,
    "winogrande": _winogrande, "boolq": _boolq, "lambada_openai": _lambada,
}


# ---- local layouts -------------------------------------------------------------------------------
def _lines(path: Path) -> list[str]:
    if not path.is_file():
        raise UserError(f"{path}: file not found (expected the shared/data layout, e.g. {path.parent.name}/{path.name})")
    try:
        raw = bz2.decompress(path.read_bytes()) if path.suffix == ".bz2" else path.read_bytes()
        return raw.decode("utf-8").splitlines()
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read ({e})") from None


def _jsonl(path: Path, fields: dict[str, type]) -> list[tuple[int, dict]]:
    """(line number, record) for each non-blank line, checking `fields` and their types."""
    out = []
    for i, line in enumerate(_lines(path), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        bad = [k for k, t in fields.items() if not isinstance(record, dict) or not isinstance(record.get(k), t)]
        if bad:
            want = ", ".join(f"{k}: {t.__name__}" for k, t in fields.items())
            raise UserError(f"{path}:{i}: expected an object with {want} (bad or missing: {', '.join(bad)})")
        out.append((i, record))
    return out


def _local_piqa(root: Path) -> list[Example]:
    path, labels_path = root / FILES["piqa"], root / PIQA_LABELS
    records = _jsonl(path, {"goal": str, "sol1": str, "sol2": str})
    labels = [(i, s.strip()) for i, s in enumerate(_lines(labels_path), 1) if s.strip()]
    if len(labels) != len(records):
        raise UserError(f"{labels_path}: {len(labels)} labels for {len(records)} records in {path}; expected one per record")
    out = []
    for (_, doc), (j, label) in zip(records, labels):
        if label not in ("0", "1"):
            raise UserError(f"{labels_path}:{j}: expected 0 or 1, got {label!r}")
        out.append(_piqa({**doc, "label": int(label)}))
    return out


def _local_arc(root: Path) -> list[Example]:
    """MosaicML's ARC-Easy: {"query": "Question: ...", "choices": [...], "gold": int}."""
    path, out = root / FILES["arc_easy"], []
    for i, doc in _jsonl(path, {"query": str, "choices": list, "gold": int}):
        if not doc["query"].startswith("Question: ") or not 0 <= doc["gold"] < len(doc["choices"]):
            raise UserError(f"{path}:{i}: expected a query starting 'Question: ' and 0 <= gold < {len(doc['choices'])}")
        # deviation: MosaicML padded 3-choice questions to 4 by repeating a wrong choice; keep the
        # first of each (lm-eval's choice list). A repeat scores the same, so acc is unchanged either way.
        choices = list(dict.fromkeys(doc["choices"]))
        gold = choices.index(doc["choices"][doc["gold"]])
        labels = [chr(ord("A") + k) for k in range(len(choices))]
        out.append(_arc({"question": doc["query"][len("Question: "):], "choices": {"text": choices, "label": labels},
                         "answerKey": labels[gold]}))
    return out


def _local_winogrande(root: Path) -> list[Example]:
    path, out = root / FILES["winogrande"], []
    for i, doc in _jsonl(path, {"sentence": str, "option1": str, "option2": str, "answer": str}):
        if "_" not in doc["sentence"] or doc["answer"] not in ("1", "2"):
            raise UserError(f"{path}:{i}: expected a sentence with a '_' blank and answer '1' or '2'")
        out.append(_winogrande(doc))
    return out


def _local_boolq(root: Path) -> list[Example]:
    """The original BoolQ dev set; lm-eval's SuperGLUE copy writes the passage as "title -- passage"."""
    path = root / FILES["boolq"]
    records = _jsonl(path, {"question": str, "title": str, "passage": str, "answer": bool})
    return [_boolq({"passage": f"{d['title']} -- {d['passage']}", "question": d["question"], "label": int(d["answer"])})
            for _, d in records]


def _local_lambada(root: Path) -> list[Example]:
    """MosaicML's split {"context", "continuation"}: the text is context + " " + continuation."""
    path = root / FILES["lambada_openai"]
    records = _jsonl(path, {"context": str, "continuation": str})
    return [_lambada({"text": d["context"] + " " + d["continuation"]}) for _, d in records]


_SENTENCE_END = re.compile(r"[.!?][\"')]*\s+")


def _capitalize_ctx_b(ctx: str) -> str:
    """Redo lm-eval's `ctx_b.capitalize()` on a joined `ctx_a + " " + ctx_b`.

    deviation: the text file keeps only the joined ctx, so ctx_b is taken as the words after the
    last sentence end when the ctx does not itself end a sentence (ActivityNet items: ctx_a is whole
    sentences, ctx_b a lower-case fragment); WikiHow items end a sentence and have an empty ctx_b.
    """
    if not ctx or re.search(r"[.!?][\"')]*$", ctx):
        return ctx
    ends = list(_SENTENCE_END.finditer(ctx))
    start = ends[-1].end() if ends else 0
    return ctx[:start] + ctx[start:].capitalize()


def _hellaswag_clean(text: str) -> str:
    # deviation: the file's extractor removed only [header] [step] [substeps] [title]; lm-eval drops
    # every [...] (e.g. "[www.kiddio.org]"), so do that here. A tag that began or ended an ending left
    # a space in lm-eval's text, which the file no longer shows; that cannot be recovered.
    cleaned = re.sub(r"\[.*?\]", "", text)
    return text if cleaned == text else cleaned.replace("  ", " ").strip()


def _local_hellaswag(root: Path) -> list[Example]:
    """llama.cpp's layout: 6 lines per item: "activity_label: ctx", gold (0-3), 4 endings.

    The extractor (klosax/hellaswag_text_data) already applied most of lm-eval's cleaning to each
    field but used `ctx` (ctx_a + " " + ctx_b) where lm-eval capitalizes ctx_b: see the deviations.
    """
    path = root / FILES["hellaswag"]
    lines = _lines(path)
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise UserError(f"{path}: {len(lines)} lines, expected 6 per item (context, label, 4 endings)")
    out = []
    for k in range(0, len(lines), 6):
        query, label, endings = lines[k], lines[k + 1].strip(), lines[k + 2 : k + 6]
        activity, sep, ctx = query.partition(": ")
        if not sep or label not in ("0", "1", "2", "3"):
            raise UserError(f"{path}:{k + 1}: expected 'activity_label: context' then a label 0-3 on line {k + 2}")
        query = _hellaswag_clean(activity + sep + _capitalize_ctx_b(ctx))
        out.append(_choices(query, [_hellaswag_clean(e) for e in endings], int(label)))
    return out


LOCAL: dict[str, Callable[[Path], list[Example]]] = {
    "hellaswag": _local_hellaswag, "piqa": _local_piqa, "arc_easy": _local_arc,
    "winogrande": _local_winogrande, "boolq": _local_boolq, "lambada_openai": _local_lambada,
}


def _from_hub(name: str) -> list[Example]:
    path, config, split = HUB[name]
    hint = f"task {name}: no tasks directory given; pass --tasks-dir DIR (the shared/data layout) or set ${TASKS_DIR_ENV}"
    try:
        import datasets
    except ImportError:
        raise UserError(f"{hint} (HF `datasets` is not installed to fetch {path})") from None
    try:
        rows = datasets.load_dataset(path, config, split=split)
    except Exception as e:  # offline or renamed on the hub: the user's to fix
        raise UserError(f"{hint} ({path} could not be loaded: {str(e).splitlines()[0][:200]})") from e
    return [FROM_HUB[name](dict(row)) for row in rows]


def subset(n: int, limit: int | None, seed: int = 0) -> list[int]:
    """The indices `--limit` keeps: a seeded sample, sorted, the same every time."""
    if limit is None or limit >= n:
        return list(range(n))
    if limit < 1:
        raise UserError(f"--limit: got {limit}, expected a positive number of examples")
    return sorted(random.Random(seed).sample(range(n), limit))


def load_task(name: str, tasks_dir: Path | None = None, limit: int | None = None, seed: int = 0) -> list[Example]:
    """The examples of task `name` from `tasks_dir` (else $EFFSPEC_TASKS_DIR, else the hub)."""
    if name not in TASKS:
        raise UserError(f"unknown task '{name}': expected one of {', '.join(TASKS)}")
    if tasks_dir is None and os.environ.get(TASKS_DIR_ENV):
        tasks_dir = Path(os.environ[TASKS_DIR_ENV])
    if tasks_dir is None:
        examples = _from_hub(name)
    else:
        root = Path(tasks_dir).expanduser()
        if not root.is_dir():
            raise UserError(f"{root}: tasks directory not found (expected the shared/data layout, e.g. {FILES[name]})")
        examples = LOCAL[name](root)
    return [examples[i] for i in subset(len(examples), limit, seed)]


# ---- scoring -------------------------------------------------------------------------------------
def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's (context_ids, continuation_ids) for one request."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:  # lm-eval conditions an empty context on the BOS token (EOS when there is none)
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [prefix], _encode(tokenizer, continuation)
    context_ids = _encode(tokenizer, context)
    return context_ids, _encode(tokenizer, context + continuation)[len(context_ids):]


def _max_length(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):  # lm-eval's order
        if isinstance(getattr(cfg, attr, None), int):
            return getattr(cfg, attr)
    return 2048


def _common_prefix(rows: Sequence[Sequence[int]]) -> int:
    n = min(len(r) for r in rows)
    for j in range(n):
        if any(r[j] != rows[0][j] for r in rows[1:]):
            return j
    return n


@torch.inference_mode()
def score_tokens(model: nn.Module, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
    """(loglikelihood, is_greedy) of each (context_ids, continuation_ids), sharing the common prefix.

    Row i feeds `(context + continuation)[:-1]` (left-truncated like lm-eval to the model's length)
    and reads the last len(continuation) positions. The common prefix of the rows, up to the first
    position any row reads, runs once; its KV cache is repeated for the distinct tails.
    """
    limit = _max_length(model) + 1
    conts = [cont for _, cont in pairs]
    if any(not c for c in conts):
        raise ValueError("a continuation encodes to no tokens")
    inputs = [(ctx + cont)[-limit:][:-1] for ctx, cont in pairs]
    first = [len(inp) - len(cont) for inp, cont in zip(inputs, conts)]  # first position row i reads
    tails = list(dict.fromkeys(tuple(inp) for inp in inputs))
    p = min(_common_prefix(inputs), min(first)) if len(tails) > 1 else 0
    tails = list(dict.fromkeys(tuple(inp[p:]) for inp in inputs))
    row_of = {t: k for k, t in enumerate(tails)}
    width = max(len(t) for t in tails)
    keep = width - min(f - p for f in first)  # logits for the last `keep` positions cover every read
    batch = torch.zeros(len(tails), width, dtype=torch.long)
    for k, t in enumerate(tails):
        batch[k, : len(t)] = torch.tensor(t)  # right padding: causal attention never sees it
    cache = None
    if p:
        cache = model(torch.tensor([inputs[0][:p]]), use_cache=True, logits_to_keep=1).past_key_values
        if len(tails) > 1:
            cache.batch_repeat_interleave(len(tails))
    logits = model(batch, past_key_values=cache, use_cache=cache is not None, logits_to_keep=keep).logits.float()
    logp = torch.log_softmax(logits, dim=-1)  # (tails, keep, vocab)
    out = []
    for inp, f, cont in zip(inputs, first, conts):
        k = row_of[tuple(inp[p:])]
        pos = torch.arange(len(cont)) + (f - p) - (width - keep)
        target = torch.tensor(cont)
        ll = logp[k, pos, target].double().sum().item()
        greedy = bool((logits[k, pos].argmax(-1) == target).all())
        out.append((ll, greedy))
    return out


def score_choices(model: nn.Module, tokenizer, example: Example) -> list[tuple[float, bool]]:
    """(loglikelihood, is_greedy) per choice of `example`, as lm-eval computes them."""
    pairs = [encode_pair(tokenizer, c, t) for c, t in zip(example.contexts, example.continuations)]
    return score_tokens(model, pairs)


def _argmax(values: Iterable[float]) -> int:
    values = list(values)
    return max(range(len(values)), key=lambda i: (values[i], -i))  # first of ties, like np.argmax


def metrics(name: str, examples: Sequence[Example], scores: Sequence[list[tuple[float, bool]]]) -> dict[str, float | None]:
    """acc / acc_norm / perplexity of scored examples, by lm-eval's definitions."""
    if name == "lambada_openai":
        lls = [s[0][0] for s in scores]
        acc = sum(s[0][1] for s in scores) / len(scores)
        return {"acc": acc, "acc_norm": None, "perplexity": math.exp(-sum(lls) / len(lls))}
    hits = hits_norm = 0
    for ex, s in zip(examples, scores):
        lls = [ll for ll, _ in s]
        chars = [len(c) - len(TARGET_DELIMITER) for c in ex.continuations]  # len(choice) in characters
        hits += _argmax(lls) == ex.gold
        hits_norm += _argmax(ll / n for ll, n in zip(lls, chars)) == ex.gold
    n = len(examples)
    return {"acc": hits / n, "acc_norm": hits_norm / n if name in REPORTS_ACC_NORM else None, "perplexity": None}


def evaluate_tasks(model: nn.Module, tokenizer, names: Sequence[str], tasks_dir: Path | None = None,
                   limit: int | None = None, seed: int = 0) -> dict[str, TaskResult]:
    """Score each task in `names`; seconds cover loading and scoring."""
    for name in names:
        if name not in TASKS:
            raise UserError(f"unknown task '{name}': expected one of {', '.join(TASKS)}")
    results = {}
    for name in names:
        start = time.perf_counter()
        examples = load_task(name, tasks_dir, limit, seed)
        scores = [score_choices(model, tokenizer, ex) for ex in track(examples, name, total=len(examples))]
        m = metrics(name, examples, scores)
        results[name] = TaskResult(name, len(examples), m["acc"], m["acc_norm"], m["perplexity"], time.perf_counter() - start)
        log.info("%s: n=%d acc=%.4f (%.1f s)", name, len(examples), m["acc"], results[name].seconds)
    return results
