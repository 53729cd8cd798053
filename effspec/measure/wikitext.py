"""lm-evaluation-harness's `wikitext` task: word perplexity, byte perplexity and bits per byte.

These normalize a model's log-likelihood by the text instead of by its tokens, so
models with different tokenizers compare; they are not the token perplexity of
BENCHMARKS.md (non-overlapping 2048-token windows of the raw test file).
lm-eval 0.4's definition, reproduced step by step:

- Documents: WikiText-2 raw test split cut into articles the way the
  `EleutherAI/wikitext_document_level` dataset cuts it: a new page starts at each
  level-1 heading line (" = Title = ", after "= = =" / "= =" are joined up), pages
  are the lines joined by "\\n", empty pages dropped. 62 documents.
- The scored text is the page through lm-eval's `wikitext_detokenizer`
  (" @-@ " -> "-", " , " -> ", ", spaces inside brackets and quotes removed, ...).
- Rolling log-likelihood (`loglikelihood_rolling`, context_len 1): the tokens
  (tokenizer defaults, as lm-eval's `tok_encode`) are cut into windows of the
  model's maximum length; the first window is the prefix token (BOS, else EOS)
  then the document, predicting every token; each later window predicts the next
  max_length tokens from the max_length tokens before them. Every token is
  predicted exactly once.
- Normalizers come from the page *before* detokenization: words =
  `len(re.split(r"\\s+", page))`, bytes = UTF-8 length. Over all documents:
  word_perplexity = exp(-sum ll / sum words), byte_perplexity =
  exp(-sum ll / sum bytes), bits_per_byte = -sum ll / sum bytes / ln 2.

The head runs in chunks of positions so an 8,192-token window of a 49,152-token
vocabulary never holds its (tokens x vocabulary) logits at once.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from effspec.errors import UserError
from effspec.progress import track

FILE = "wikitext-2-raw/wiki.test.raw"  # relative to the tasks directory (the shared/data layout)
HUB = ("EleutherAI/wikitext_document_level", "wikitext-2-raw-v1", "test")
HEAD_CHUNK = 1024  # positions whose logits exist at once


@dataclass
class WikitextResult:
    documents: int
    tokens: int  # predicted tokens
    loglikelihood: float  # summed over all documents (nats)
    words: int
    bytes: int
    seconds: float

    @property
    def word_perplexity(self) -> float:
        return math.exp(-self.loglikelihood / self.words)

    @property
    def byte_perplexity(self) -> float:
        return math.exp(-self.loglikelihood / self.bytes)

    @property
    def bits_per_byte(self) -> float:
        return -self.loglikelihood / self.bytes / math.log(2)


def documents(raw: str) -> list[str]:
    """The pages of a WikiText raw file, split at level-1 headings as the document-level dataset does."""
    pages, lines = [], []
    for line in raw.split("\n"):
        joined = line.replace("= = =", "===").replace("= =", "==").strip()
        if joined.startswith("= ") and joined.endswith(" ="):
            page = "\n".join(lines)
            if page.strip():
                pages.append(page)
            lines = []
        lines.append(line)
    pages.append("\n".join(lines))  # the last page, as the dataset builder keeps it
    return pages


_PLAIN = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" : ", ": "), (" ; ", "; "), (" . ", ". "),
          (" ! ", "! "), (" ? ", "? "), (" , ", ", "))
_BRACKETS = ((r"\(\s*([^\)]*?)\s*\)", r"(\1)"), (r"\[\s*([^\]]*?)\s*\]", r"[\1]"), (r"{\s*([^}]*?)\s*}", r"{\1}"),
             (r"\"\s*([^\"]*?)\s*\"", r'"\1"'), (r"'\s*([^']*?)\s*'", r"'\1'"))
_LAST = (("= = = =", "===="), ("= = =", "==="), ("= =", "=="), (" \u00b0 ", "\u00b0"), (" \n", "\n"), ("\n ", "\n"),
         (" N ", " 1 "), (" 's", "'s"))


def detokenize(page: str) -> str:
    """WikiText's tokenized spacing undone, in the order of lm-eval's `wikitext_detokenizer`."""
    s = page.replace("s '", "s'")
    s = re.sub(r"/' [0-9]/", r"/'[0-9]/", s)
    for old, new in _PLAIN:
        s = s.replace(old, new)
    for pattern, repl in _BRACKETS:
        s = re.sub(pattern, repl, s)
    for old, new in _LAST:
        s = s.replace(old, new)
    return s


def rolling_windows(tokens: Sequence[int], prefix: int, max_length: int) -> list[tuple[list[int], int]]:
    """(input ids, n): each window's input and how many of its last positions predict new tokens.

    Window inputs are at most max_length long; together they predict every token once,
    the first from `prefix`.
    """
    tokens = list(tokens)
    if not tokens:
        return []
    first = min(max_length, len(tokens))
    out = [([prefix] + tokens[: first - 1], first)]
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, max_length)
        end = done + n
        out.append((tokens[end - max_length - 1 : end - 1], n))
        done = end
    return out


@torch.inference_mode()
def window_loglikelihood(model: nn.Module, ids: Sequence[int], n: int) -> float:
    """Summed log-probability of the last n tokens of `ids`, each given the tokens before it.

    `ids` is a window's input followed by the token its last position predicts; the model
    sees ids[:-1], and its last n positions score ids[-n:].
    """
    from effspec.objectives import head_apart

    x = torch.tensor(ids[:-1])[None]
    targets = torch.tensor(ids[1:])[-n:]
    with head_apart(model) as head:
        out = model(x, use_cache=False).logits[0, -n:]
    total = 0.0
    for i in range(0, n, HEAD_CHUNK):
        chunk = out[i : i + HEAD_CHUNK]
        logits = (head(chunk) if head is not None else chunk).float()
        logp = torch.log_softmax(logits, dim=-1)
        total += logp.gather(1, targets[i : i + HEAD_CHUNK, None]).double().sum().item()
    return total


def document_loglikelihood(model: nn.Module, tokens: Sequence[int], prefix: int, length: int) -> float:
    total = 0.0
    tokens = list(tokens)
    done = 0
    for window, n in rolling_windows(tokens, prefix, length):
        # the window's inputs, then the token its last position predicts
        total += window_loglikelihood(model, window + [tokens[done + n - 1]], n)
        done += n
    return total


def load_pages(tasks_dir: Path | None) -> list[str]:
    if tasks_dir is not None:
        path = Path(tasks_dir) / FILE
        if not path.is_file():
            raise UserError(f"task 'wikitext': {path} not found (expected the shared/data layout under --tasks-dir)")
        return documents(path.read_text(encoding="utf-8"))
    try:
        import datasets
    except ImportError:
        raise UserError("task 'wikitext': no --tasks-dir given and HF `datasets` is not installed") from None
    name, config, split = HUB
    try:
        return [d["page"] for d in datasets.load_dataset(name, config, split=split)]
    except Exception as e:  # noqa: BLE001 -- network, auth or missing dataset: one line for the user
        raise UserError(f"task 'wikitext': cannot load {name} from the hub ({type(e).__name__}); "
                        "pass --tasks-dir with wikitext-2-raw/wiki.test.raw") from None


def evaluate_wikitext(model: nn.Module, tokenizer, tasks_dir: Path | None = None, limit: int | None = None,
                      seed: int = 0) -> WikitextResult:
    """lm-eval's wikitext figures of `model`; `limit` scores a seeded subset of the documents."""
    from effspec.measure.tasks import encode, max_length, prefix_token, subset

    start = time.perf_counter()
    pages = load_pages(tasks_dir)
    pages = [pages[i] for i in subset(len(pages), limit, seed)]
    prefix, length = prefix_token(tokenizer), max_length(model)
    ll, count = 0.0, 0
    for page in track(pages, "wikitext", total=len(pages)):
        tokens = encode(tokenizer, detokenize(page))
        ll += document_loglikelihood(model, tokens, prefix, length)
        count += len(tokens)
    if not math.isfinite(ll):
        raise UserError("wikitext: the log-likelihood is not finite: the model produces NaN or inf logits")
    words = sum(len(re.split(r"\s+", p)) for p in pages)
    size = sum(len(p.encode("utf-8")) for p in pages)
    return WikitextResult(len(pages), count, ll, words, size, time.perf_counter() - start)
