"""Text sources, evaluation windows and calibration samples, exactly as BENCHMARKS.md defines them.

A data spec names where text comes from; it resolves to a `TextSource` with the
text to evaluate on and, when the source has one, a separate text to draw
calibration from:

- a WikiText-layout directory: evaluate on `wiki.test.raw`, calibrate on `wiki.valid.raw`;
- a text file (read whole), or a `.jsonl` whose records have a `text` field (joined by blank lines);
- `hf:NAME[:CONFIG[:SPLIT]]` through HF `datasets`, when a hub is reachable;
- builtin `stdlib-docs`: the docstrings of this Python's standard library, read
  with `ast` (nothing imported) in sorted file order, so it needs no download;
  each distinct docstring once, every fifth held out for calibration.

Evaluation: tokenize the whole text once, cut it into non-overlapping windows of
`seqlen` tokens, keep the first `n`. Calibration: `n` sequences of `seqlen`
tokens at start offsets drawn by `random.Random(seed).randint(0, len - seqlen - 1)`
(the GPTQ reference's sampler); from the separate calibration text when there is
one, else from the tokens after the evaluated windows, so calibration never sees
scored text.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import random
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from effspec.errors import UserError
from effspec.fsutil import atomic_write_text, cache_dir

log = logging.getLogger(__name__)

BUILTIN_DATA = {"stdlib-docs": "docstrings of the Python standard library (offline, deterministic)"}
WIKITEXT_EVAL, WIKITEXT_CALIB = "wiki.test.raw", "wiki.valid.raw"


@dataclass(frozen=True)
class TextSource:
    spec: str
    eval_text: str
    calib_text: str | None = None  # None: calibrate on the eval text past the evaluated windows


def load_text(spec: str) -> TextSource:
    """Resolve a data spec to its text (see the module docstring for the forms)."""
    if spec in BUILTIN_DATA:
        return _stdlib_docs()
    if spec.startswith("hf:"):
        return _hf_dataset(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        test = path / WIKITEXT_EVAL
        if not test.is_file():
            raise UserError(f"{spec}: directory has no {WIKITEXT_EVAL} (expected the WikiText layout)")
        valid = path / WIKITEXT_CALIB
        return TextSource(spec, _read(test), _read(valid) if valid.is_file() else None)
    if path.is_file():
        return TextSource(spec, _read_jsonl(path) if path.suffix == ".jsonl" else _read(path))
    raise UserError(f"unknown data '{spec}': not a file, directory, builtin ({', '.join(BUILTIN_DATA)}) or hf:NAME")


def _read(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise UserError(f"{path}: file is empty")
    return text


def jsonl_records(path: Path, lines: list[str], fields: dict[str, type]) -> list[tuple[int, dict]]:
    """(line number, record) for each non-blank JSON line, checking that `fields` exist with their types.

    `lines` are split on "\n" only: str.splitlines would also split inside a JSON string at U+2028.
    """
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        bad = [k for k, t in fields.items() if not isinstance(record, dict) or not isinstance(record.get(k), t)]
        if bad:
            want = ", ".join(f"'{k}': {t.__name__}" for k, t in fields.items())
            raise UserError(f"{path}:{i}: expected an object with {want} (bad or missing: {', '.join(bad)})")
        out.append((i, record))
    return out


def _read_jsonl(path: Path) -> str:
    return "\n\n".join(r["text"] for _, r in jsonl_records(path, _read(path).split("\n"), {"text": str}))


def _hf_dataset(spec: str) -> TextSource:
    parts = spec[3:].split(":")
    if not parts[0] or len(parts) > 3:
        raise UserError(f"{spec}: expected hf:NAME[:CONFIG[:SPLIT]]")
    name, config, split = parts[0], (parts[1] if len(parts) > 1 else None), (parts[2] if len(parts) > 2 else "test")
    try:
        import datasets

        rows = datasets.load_dataset(name, config, split=split)
    except ImportError:
        raise UserError(f"{spec}: needs the `datasets` package (pip install datasets)") from None
    except Exception as e:  # offline or missing dataset: the user's to fix
        raise UserError(f"{spec}: could not load from the hub ({str(e).splitlines()[0][:200]})") from e
    if "text" not in rows.column_names:
        raise UserError(f"{spec}: dataset has no 'text' column (columns: {rows.column_names})")
    # deviation: lm-eval/HF join WikiText lines with "" since each line keeps its newline; other sets get "\n\n"
    joiner = "" if all(t.endswith("\n") for t in rows["text"][:100] if t) else "\n\n"
    return TextSource(spec, joiner.join(rows["text"]))


def _stdlib_docs() -> TextSource:
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    cached = cache_dir() / "data" / f"stdlib-docs-v2-py{version}.json"
    if cached.is_file():
        docs = json.loads(cached.read_text())
    else:
        docs = _collect_docstrings(Path(sysconfig.get_paths()["stdlib"]))
        atomic_write_text(cached, json.dumps(docs))
    eval_docs = [d for i, d in enumerate(docs) if i % 5 != 4]
    calib_docs = [d for i, d in enumerate(docs) if i % 5 == 4]
    return TextSource("stdlib-docs", "\n\n".join(eval_docs), "\n\n".join(calib_docs))


def _collect_docstrings(root: Path) -> list[str]:
    skip = {"site-packages", "test", "tests", "idle_test", "lib2to3", "__pycache__"}
    files = sorted(p for p in root.rglob("*.py")
                   if not any(part in skip or part.startswith("test") for part in p.relative_to(root).parts))
    docs: dict[str, None] = {}  # distinct, in first-seen order: no docstring on both sides of the split
    for path in files:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    docs.setdefault(doc)
    return list(docs)


# ---- tokens -----------------------------------------------------------------------------------
def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D tensor of token ids, no special tokens added."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def eval_windows(ids: torch.Tensor, seqlen: int, n_windows: int | None) -> torch.Tensor:
    """The first `n_windows` non-overlapping windows of `seqlen` tokens, (n, seqlen)."""
    if seqlen < 2:
        raise UserError(f"--seqlen must be at least 2, got {seqlen}")
    available = ids.numel() // seqlen
    if available == 0:
        raise UserError(f"the data has {ids.numel()} tokens, fewer than one window of {seqlen}")
    n = available if n_windows is None else n_windows
    if n < 1:
        raise UserError(f"--windows must be at least 1, got {n}")
    if n > available:
        raise UserError(f"the data holds {available} windows of {seqlen} tokens, fewer than the {n} asked for")
    return ids[: n * seqlen].view(n, seqlen)


def calibration_samples(ids: torch.Tensor, n: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """`n` sequences of `seqlen` tokens at seeded random offsets, (n, seqlen)."""
    if ids.numel() < seqlen + 1:
        raise UserError(f"calibration text has {ids.numel()} tokens, too few for sequences of {seqlen}")
    rng = random.Random(seed)
    starts = [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(n)]
    return torch.stack([ids[s : s + seqlen] for s in starts])


def calibration_tokens(tokenizer, source: TextSource, eval_tokens_used: int) -> torch.Tensor:
    """Token ids calibration may draw from: the separate calib text, else the eval text past the scored windows."""
    if source.calib_text is not None:
        return tokenize(tokenizer, source.calib_text)
    rest = tokenize(tokenizer, source.eval_text)[eval_tokens_used:]
    if rest.numel() == 0:
        raise UserError(f"{source.spec}: no text left after the evaluated windows to calibrate on; pass --calib-data")
    return rest


def text_digest(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest()
