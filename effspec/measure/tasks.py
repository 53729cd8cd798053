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
encode(context + continuation)[len(context_ids):]`, with the tokenizer's
default special tokens as lm-eval's `tok_encode` (a BOS first for Llama-style
tokenizers); an empty context is the BOS token (else EOS). A choice's loglikelihood is the sum
of log-softmax over its continuation tokens; acc takes the argmax, acc_norm the
argmax of loglikelihood / len(choice) in characters.

Speed: the choices of one example share a token prefix (the context, often
more; for WinoGrande the sentence up to the blank), so each example becomes a
token tree: the prefix once, then each distinct tail, with an attention mask
that lets a tail see only the prefix and itself and position ids that restart
where the prefix ends. Trees are sorted by length and batched, one tree per
row, left-padded, up to BATCH_TOKENS padded tokens per forward, and the LM head
runs only on the positions that score a continuation. Each row sees exactly the
tokens a batch-1 forward of `context + continuation` sees, so only float
rounding differs (~1e-5 in a loglikelihood). Where choices share a context this
skips most of lm-eval's token-forwards; where they do not (BoolQ's one-token
answers, LAMBADA) only the head on context positions is saved.
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

from effspec.data import jsonl_records
from effspec.errors import UserError
from effspec.progress import track

log = logging.getLogger(__name__)

TASKS: tuple[str, ...] = ("hellaswag", "piqa", "arc_easy", "winogrande", "boolq", "lambada_openai")
ROLLING_TASKS: tuple[str, ...] = ("wikitext",)  # lm-eval's rolling log-likelihood task (effspec.measure.wikitext)
ALL_TASKS = TASKS + ROLLING_TASKS
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
    acc: float | None  # in [0, 1]; None for wikitext
    acc_norm: float | None
    perplexity: float | None  # lambada_openai only
    seconds: float
    word_perplexity: float | None = None  # wikitext only, as lm-eval defines these three
    byte_perplexity: float | None = None
    bits_per_byte: float | None = None


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
    """The file's lines, split on "\n" only (str.splitlines would also split inside a JSON string at U+2028)."""
    if not path.is_file():
        raise UserError(f"{path}: file not found (expected the shared/data layout, e.g. {path.parent.name}/{path.name})")
    try:
        raw = bz2.decompress(path.read_bytes()) if path.suffix == ".bz2" else path.read_bytes()
        lines = raw.decode("utf-8").split("\n")
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read ({e})") from None
    if lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def _jsonl(path: Path, fields: dict[str, type]) -> list[tuple[int, dict]]:
    return jsonl_records(path, _lines(path), fields)


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


def split_ctx(ctx: str) -> tuple[str, str]:
    """(ctx_a, ctx_b) back from the file's joined `ctx_a + " " + ctx_b`, for lm-eval's ctx_b.capitalize().

    deviation: the text file keeps only the joined ctx, so ctx_b is taken to be what follows the
    last sentence end, unless the ctx ends a sentence itself: ActivityNet items are whole sentences
    then a lower-case fragment ("... on a roof. he"); WikiHow items end a sentence, ctx_b empty.
    """
    if re.search(r"[.!?][\"')]*$", ctx):
        return ctx, ""
    ends = list(_SENTENCE_END.finditer(ctx))
    cut = ends[-1].end() if ends else 0
    return ctx[:cut].rstrip(), ctx[cut:]


def _local_hellaswag(root: Path) -> list[Example]:
    """llama.cpp's layout: 6 lines per item: "activity_label: ctx", gold (0-3), the 4 endings.

    The extractor (klosax/hellaswag_text_data) cleaned each field already, but only of the tags
    [header] [step] [substeps] [title] and with spaces trimmed; lm-eval's cleaning is applied again
    on top (it also drops other [...], e.g. "[www.kiddio.org]").
    deviation: where a tag began or ended an ending, lm-eval's text keeps a space there that the
    file no longer has; that cannot be recovered.
    """
    path = root / FILES["hellaswag"]
    lines = _lines(path)
    if len(lines) % 6:
        raise UserError(f"{path}: {len(lines)} lines, expected 6 per item (context, label, 4 endings)")
    out = []
    for k in range(0, len(lines), 6):
        activity, sep, ctx = lines[k].partition(": ")
        label = lines[k + 1].strip()
        if not sep or label not in ("0", "1", "2", "3"):
            raise UserError(f"{path}:{k + 1}: expected 'activity_label: context' then a label 0-3 on line {k + 2}")
        ctx_a, ctx_b = split_ctx(ctx)
        doc = {"activity_label": activity, "ctx_a": ctx_a, "ctx_b": ctx_b, "endings": lines[k + 2 : k + 6], "label": label}
        out.append(_hellaswag(doc))
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


def _env_tasks_dir() -> Path | None:
    return Path(os.environ[TASKS_DIR_ENV]) if os.environ.get(TASKS_DIR_ENV) else None


def load_task(name: str, tasks_dir: Path | None = None, limit: int | None = None, seed: int = 0) -> list[Example]:
    """The examples of task `name` from `tasks_dir` (else $EFFSPEC_TASKS_DIR, else the hub)."""
    if name not in TASKS:
        raise UserError(f"unknown task '{name}': expected one of {', '.join(TASKS)}")
    tasks_dir = tasks_dir or _env_tasks_dir()
    if tasks_dir is None:
        examples, source = _from_hub(name), HUB[name][0]
    else:
        root = Path(tasks_dir).expanduser()
        if not root.is_dir():
            raise UserError(f"{root}: tasks directory not found (expected the shared/data layout, e.g. {FILES[name]})")
        examples, source = LOCAL[name](root), str(root / FILES[name])
    if not examples:
        raise UserError(f"{source}: no examples of task {name}")
    return [examples[i] for i in subset(len(examples), limit, seed)]


# ---- scoring -------------------------------------------------------------------------------------
# Padded tokens per batched forward. smollm2-135m, 2 threads: one 151-token row runs at ~560
# tokens/s, 8 such rows at ~700; an 80-token row at ~470, 12 of them at ~690. (Before, trees were
# packed into one sequence with a block-diagonal mask: ~490 tokens/s at 240 tokens.)
BATCH_TOKENS = 2048


def encode(tokenizer, text: str) -> list[int]:
    """lm-eval's `tok_encode`: the tokenizer's own special-token default (BOS for Llama-style tokenizers,
    nothing for GPT-2 style), unless the text already starts with the BOS string."""
    bos = tokenizer.bos_token
    if bos and text.startswith(bos):
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(text)["input_ids"])


def prefix_token(tokenizer) -> int:
    """What lm-eval conditions an empty context (and a document's first token) on: BOS, else EOS."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's (context_ids, continuation_ids) for one request."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:  # lm-eval conditions an empty context on the BOS token (EOS when there is none)
        return [prefix_token(tokenizer)], encode(tokenizer, continuation)
    context_ids = encode(tokenizer, context)
    return context_ids, encode(tokenizer, context + continuation)[len(context_ids):]


def max_length(model: nn.Module) -> int:
    """lm-eval's context length: n_positions / max_position_embeddings / n_ctx of the (text) config, else 2048."""
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
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


@dataclass
class _Tree:
    """One example's rows as a token tree: a shared prefix, then each distinct tail after it."""

    tokens: list[int]
    prefix: int  # the first `prefix` tokens are shared by every row
    tails: list[tuple[int, int]]  # (start, length) of each tail in `tokens`; a tail sees the prefix and itself
    reads: list[tuple[list[int], list[int]]]  # per row: indices into `tokens` whose logits score it, and its targets


def _tree(pairs: Sequence[tuple[list[int], list[int]]], max_length: int) -> _Tree:
    """Row i feeds `(context + continuation)[:-1]`, left-truncated like lm-eval to max_length, and
    reads its last len(continuation) positions; rows share their common prefix (but each keeps a
    tail of at least one token) and identical tails are stored once."""
    conts = [cont for _, cont in pairs]
    if any(not c for c in conts):
        raise ValueError("a continuation encodes to no tokens")
    inputs = [(ctx + cont)[-(max_length + 1):][:-1] for ctx, cont in pairs]
    p = min(_common_prefix(inputs), min(len(i) for i in inputs) - 1)
    tokens, start = list(inputs[0][:p]), {}
    for inp in inputs:
        tail = tuple(inp[p:])
        if tail not in start:
            start[tail] = len(tokens)
            tokens.extend(tail)
    reads = []
    for inp, cont in zip(inputs, conts):
        s = start[tuple(inp[p:])]
        reads.append(([j if j < p else s + j - p for j in range(len(inp) - len(cont), len(inp))], cont))
    return _Tree(tokens, p, [(s, len(t)) for t, s in start.items()], reads)


def _tree_mask(t: _Tree) -> tuple[torch.Tensor, list[int]]:
    """Which of tree t's tokens each token sees (n, n), and their position ids: the prefix is causal,
    each tail sees the prefix and itself causally, and its positions go on from the prefix's end."""
    n, p = len(t.tokens), t.prefix
    allowed = torch.zeros(n, n, dtype=torch.bool)
    allowed[:p, :p] = torch.ones(p, p, dtype=torch.bool).tril()
    positions = list(range(p))
    for s, k in t.tails:  # in token order
        allowed[s : s + k, :p] = True
        allowed[s : s + k, s : s + k] = torch.ones(k, k, dtype=torch.bool).tril()
        positions.extend(range(p, p + k))
    return allowed, positions


def _batch(trees: Sequence[_Tree]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """One row per tree, left-padded to the longest: token ids and position ids (b, L), additive attention
    mask (b, 1, L, L), and each row's padding length. Left padding ends every row at position L - 1, so the
    positions read (the continuations, at a tree's end) line up across rows; padding sees only itself."""
    L = max(len(t.tokens) for t in trees)
    ids = torch.zeros(len(trees), L, dtype=torch.long)
    positions = torch.zeros(len(trees), L, dtype=torch.long)
    allowed = torch.eye(L, dtype=torch.bool).repeat(len(trees), 1, 1)
    offsets = []
    for r, t in enumerate(trees):
        o = L - len(t.tokens)
        a, pos = _tree_mask(t)
        ids[r, o:], positions[r, o:], allowed[r, o:, o:] = torch.tensor(t.tokens), torch.tensor(pos), a
        offsets.append(o)
    mask = torch.zeros(len(trees), 1, L, L).masked_fill_(~allowed[:, None], torch.finfo(torch.float32).min)
    return ids, positions, mask, offsets


@torch.inference_mode()
def score_trees(model: nn.Module, trees: Sequence[_Tree]) -> list[list[tuple[float, bool]]]:
    """(loglikelihood, is_greedy) of every row of every tree, in one batched forward pass.

    Each tree is one row of the batch, its attention mask letting each tail see only its prefix and
    itself; the LM head runs on the read positions only (their union over the rows).
    """
    ids, positions, mask, offsets = _batch(trees)
    keep = sorted({o + j for t, o in zip(trees, offsets) for idx, _ in t.reads for j in idx})
    col = {j: c for c, j in enumerate(keep)}
    dtype = getattr(model, "dtype", torch.float32)
    mask = mask.to(dtype if dtype.is_floating_point else torch.float32)
    logits = model(ids, attention_mask=mask, position_ids=positions, use_cache=False,
                   logits_to_keep=torch.tensor(keep)).logits  # (b, len(keep), vocab)
    rows, cols, targets = [], [], []
    spans: list[list[tuple[int, int]]] = []  # per tree, per row: (start, length) of its reads in `targets`
    for r, (t, o) in enumerate(zip(trees, offsets)):
        spans.append([])
        for idx, cont in t.reads:
            spans[-1].append((len(targets), len(cont)))
            rows += [r] * len(idx)
            cols += [col[o + j] for j in idx]
            targets += cont
    read = logits[torch.tensor(rows), torch.tensor(cols)].float()  # (reads, vocab)
    target = torch.tensor(targets)
    ll = (read[torch.arange(len(targets)), target] - torch.logsumexp(read, dim=-1)).double()  # log-softmax, unmaterialized
    hit = read.argmax(-1) == target
    return [[(ll[s : s + n].sum().item(), bool(hit[s : s + n].all())) for s, n in tree] for tree in spans]


def _example_tree(model: nn.Module, tokenizer, example: Example) -> _Tree:
    pairs = [encode_pair(tokenizer, c, t) for c, t in zip(example.contexts, example.continuations)]
    return _tree(pairs, max_length(model))


def score_choices(model: nn.Module, tokenizer, example: Example) -> list[tuple[float, bool]]:
    """(loglikelihood, is_greedy) per choice of `example`, as lm-eval computes them."""
    return score_trees(model, [_example_tree(model, tokenizer, example)])[0]


def score_examples(model: nn.Module, tokenizer, examples: Sequence[Example], description: str = "scoring",
                   batch_tokens: int = BATCH_TOKENS) -> list[list[tuple[float, bool]]]:
    """score_choices for every example: their trees sorted by length, longest first (so the first batch
    shows the peak memory), and batched up to `batch_tokens` padded tokens per forward."""
    trees = [_example_tree(model, tokenizer, ex) for ex in examples]
    order = sorted(range(len(trees)), key=lambda i: len(trees[i].tokens), reverse=True)
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * len(trees[batches[-1][0]].tokens) <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    out: list[list[tuple[float, bool]]] = [[] for _ in trees]
    for batch in track(batches, f"{description} ({len(examples)} examples)"):
        for i, scores in zip(batch, score_trees(model, [trees[i] for i in batch])):
            out[i] = scores
    return out


def _argmax(values: Iterable[float]) -> int:
    values = list(values)
    return max(range(len(values)), key=lambda i: (values[i], -i))  # first of ties, like np.argmax


def metrics(name: str, examples: Sequence[Example], scores: Sequence[list[tuple[float, bool]]]) -> tuple[float, float | None, float | None]:
    """(acc, acc_norm, perplexity) of scored examples by lm-eval's definitions; None where lm-eval reports none."""
    if name == "lambada_openai":
        lls = [s[0][0] for s in scores]
        return sum(s[0][1] for s in scores) / len(scores), None, math.exp(-sum(lls) / len(lls))
    hits = hits_norm = 0
    for ex, s in zip(examples, scores):
        lls = [ll for ll, _ in s]
        chars = [len(c) - len(TARGET_DELIMITER) for c in ex.continuations]  # len(choice) in characters
        hits += _argmax(lls) == ex.gold
        hits_norm += _argmax(ll / n if n else -math.inf for ll, n in zip(lls, chars)) == ex.gold
    n = len(examples)
    return hits / n, (hits_norm / n if name in REPORTS_ACC_NORM else None), None


def evaluate_tasks(model: nn.Module, tokenizer, names: Sequence[str], tasks_dir: Path | None = None,
                   limit: int | None = None, seed: int = 0) -> dict[str, TaskResult]:
    """Score each task in `names`; seconds cover loading and scoring."""
    for name in names:
        if name not in ALL_TASKS:
            raise UserError(f"unknown task '{name}': expected one of {', '.join(ALL_TASKS)}")
    results = {}
    for name in names:
        if name == "wikitext":
            from effspec.measure.wikitext import evaluate_wikitext

            w = evaluate_wikitext(model, tokenizer, tasks_dir or _env_tasks_dir(), limit, seed)
            results[name] = TaskResult(name, w.documents, None, None, None, w.seconds, w.word_perplexity,
                                       w.byte_perplexity, w.bits_per_byte)
            log.info("wikitext: %d documents, word perplexity %.4f (%.1f s)", w.documents, w.word_perplexity, w.seconds)
            continue
        start = time.perf_counter()
        examples = load_task(name, tasks_dir, limit, seed)
        scores = score_examples(model, tokenizer, examples, name)
        acc, acc_norm, ppl = metrics(name, examples, scores)
        results[name] = TaskResult(name, len(examples), acc, acc_norm, ppl, time.perf_counter() - start)
        log.info("%s: n=%d acc=%.4f (%.1f s)", name, len(examples), acc, results[name].seconds)
    return results
