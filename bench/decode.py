"""Speculative decoding benchmark: effspec's prompt lookup and self-built drafts against transformers' `generate`.

`smollm2-135m` float32 under the speed protocol of BENCHMARKS.md
(../shared/BENCHMARKS.md): batch 1, greedy, `--new-tokens` (128) new tokens
(both sides stop early at the end-of-turn token `<|im_end|>`, kept in the
output), `--threads` (1) on both sides, one warm-up then the median of `--runs`
(3; the protocol's 5 with `--runs 5`). Protocol deviation: the prompts are not
the protocol's 128 tokens of WikiText but the two prompt sets the issue asks
for, each of `--prompts` (3) prompts in the model's chat template:

- grounded (input-grounded): a passage of ~`--passage-tokens` (1,000) tokens of
  wiki.test.raw -- whole paragraphs of one article, its headings left out, the
  WikiText tokenization undone (`@-@` -> `-`, no space before punctuation) --
  after an instruction that asks to rewrite it, summarize it, or list its names
  and dates (one instruction per prompt, in turn);
- open (open generation): a one-line request (write a story, explain, list).

Methods, each run on every prompt of each set (`--methods` picks families):

- effspec (side "effspec"): `es-plain` is `effspec.generate.greedy` on the lean
  engine (effspec.decoder); the others are `effspec.speculative.speculative_greedy`
  with its defaults (k 4, adapted by acceptance within [1, 12]) and a draft:
  `es-lookup` `PromptLookup()` (the longest suffix match, 12..1 tokens); `es-selfN` the target's own first
  N blocks, final norm and head (`DraftDecoder.self_draft`, N in `--self-blocks`,
  default 4,8; no second model); `es-dropD` a `drop-layers`-pruned copy of the
  target (`DraftDecoder(copy)`): the registry step with `n = --drop-blocks`
  (22 of the 30 blocks, so an 8-block draft to set beside `self8`; the step
  allows up to 28 with its default `keep_first`), its block-influence score
  (ShortGPT's BI, the step's default metric) computed on `--calib-samples` x
  `--calib-seqlen` (8 x 1024) tokens of wiki.valid.raw at `random.Random(0)`
  offsets (`effspec.data.calibration_samples`) -- fewer than the calibration
  protocol's 32 x 2048: the ranking only has to pick blocks for a draft. The
  copy has its own (deep-copied) blocks and shares the target's embeddings,
  final norm and tied head. `es-distill` a draft model directory given by
  `--distilled` (e.g. the target's first 4 blocks trained by `distill`, the
  README's `draft-4-distill` recipe). `es-eagle` an EAGLE head given by
  `--eagle` (`effspec train-draft`: one block that reads the target's own
  features; `effspec.eagle`), over the tokens it was trained with (or
  `--draft-vocab`'s) plus the prompt's, as `effspec generate` gives it, as a
  chain; `es-eagle-tree` the same head also
  offering its 2nd..`--eagle-width`-th likeliest first tokens, verified in the
  same pass as tree rows (`EagleDraft.propose_tree`; `effspec generate
  --speculate eagle:DIR`, width 3); `es-eagle-lookup` `PromptLookup()` and that
  head as two branches of one verified tree (`Branches`, as
  `effspec generate --speculate lookup --speculate eagle:DIR`);
  transformers' `assistant_model` cannot take a draft
  that reads the target's features, so it has no hf- row (a verdict against the
  1.3x target only). `--draft-vocab K` restricts every effspec
  draft's head to the K most frequent tokens of `--vocab-data`'s responses
  plus the prompt's (FR-Spec; `effspec.speculative.frequent_tokens`), the transformers side keeps
  the whole vocabulary (its assistant has no such option).
- transformers (side "transformers", the peer): `model.generate(do_sample=False)`
  on the same model object. `hf-plain` plain greedy; `hf-lookup`
  `prompt_lookup_num_tokens=--lookup-tokens` (10, the candidate generator's
  default and the method author's recommended call; n-gram size transformers'
  default 2); `hf-selfN`, `hf-dropD`, `hf-distill` `assistant_model=` the
  *same* drafts as standalone transformers models: a model object whose blocks
  are the target's first N (config.num_hidden_layers = N) sharing the target's
  embeddings, norm and head, the very drop-layers copy effspec drafts with, and
  the distilled model. The assistant runs
  at transformers' defaults (20 draft tokens a round, "constant" schedule,
  confidence threshold 0.4); its generation config is reset before every call
  so no state carries over between runs.

Measures, per method and prompt set (a row each):

- decode tokens/s: new tokens after the first, summed over the set's prompts,
  over the summed per-prompt medians of the decode seconds. effspec: the
  `Generation.decode_seconds` its loops report (a draft's own prefill of the
  prompt happens in its first proposal, so it is counted in decode). transformers:
  wall time of the `generate` call minus the median wall time of a
  `max_new_tokens=1` `generate` of the same prompt (plain, no assistant; its own
  median of `--runs`, after a warm-up) -- the same rule for assisted rows, so an
  assistant's prefill also counts as decode on that side.
- speedups: over the same side's plain greedy row and over effspec's plain row.
- acceptance: accepted draft tokens / proposed, over the set. transformers'
  counts are read by wrapping its candidate generators' `update_candidate_strategy`
  (proposed = candidates verified in the round, accepted = its `num_matches`).
- identical: prompts whose output tokens equal the same side's plain greedy
  output, and for `hf-plain` whether transformers' plain greedy equals effspec's.

Timed runs go round-robin (run r: every prompt, every method in turn) so a load
spike from other work on a shared machine falls on all methods alike.

Targets (the issue): prompt lookup >= 2.0x plain greedy decode speed on the
grounded set with identical output (`es-lookup` over `es-plain`); a draft
effspec builds from the target itself (`es-selfN`, `es-dropD`, `es-distill`)
>= 1.3x plain greedy on open generation with identical output, and >= 1.2x
transformers' assisted generation with the same draft (`es-selfN` over
`hf-selfN`, and so on). One verdict line each, per draft for the last two.

Extension point, `--parts` (default speculative,kv): `kv` calls
`cache_rows(args, model, tokenizer) -> list[dict]` from bench/decode_cache.py
(KV-cache compression rows, written separately) when that file exists, prints
its rows as their own table over the keys they have, and adds them to the JSON
with `part: "kv"`; without the file it prints a note and skips.

Prints a table per prompt set and the verdicts, writes every row to `--out`
(default bench/results/decode.json, not committed) and ends stdout with one
JSON line of every row. Timings on a shared, noisy machine: compare the ratios
within a run, not seconds across runs.

    python bench/decode.py --prompts 1 --new-tokens 16 --runs 1 --self-blocks 4 --parts speculative  # smoke, ~4 min
    python bench/decode.py --parts speculative --runs 1   # every row, one timed run: ~25 min on 1 thread
    python bench/decode.py                                # the benchmark: ~60 min for the speculative part, plus kv's
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import json
import logging
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "wikitext-2-raw"
DEFAULT_OUT = BENCH / "results" / "decode.json"
MODEL = "smollm2-135m"
SETS = ("grounded", "open")
FAMILIES = ("es-plain", "es-lookup", "es-self", "es-drop", "es-distill", "es-eagle", "es-eagle-tree",
            "es-eagle-lookup", "hf-plain", "hf-lookup", "hf-self", "hf-drop", "hf-distill")
DISTILL = ("es-distill", "hf-distill")  # need --distilled
EAGLE = ("es-eagle", "es-eagle-tree", "es-eagle-lookup")  # need --eagle
DEFAULT_INSTRUCT = REPO.parent / "shared" / "data" / "instruct" / "alpaca_en_demo.json"
PARTS = ("speculative", "kv")
SIDES = {"es": "effspec", "hf": "transformers"}
TARGET_LOOKUP = 2.0  # prompt lookup over plain greedy, grounded set
TARGET_DRAFT = 1.3  # a draft built from the target over plain greedy, open set
TARGET_DRAFT_PEER = 1.2  # the same draft, effspec over transformers' assisted generation, open set

INSTRUCTIONS = (
    "Rewrite the following passage in clear, plain English, keeping every fact, name and number.",
    "Summarize the following passage in one paragraph.",
    "List every person's name and every date that the following passage mentions.",
)
OPEN_PROMPTS = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain step by step how a refrigerator keeps food cold.",
    "List ten ideas for a rainy weekend at home, with one sentence about each.",
    "Write a letter to a friend describing the city you would most like to live in.",
    "Explain the difference between weather and climate to a ten-year-old.",
    "Write a recipe for a simple vegetable soup, with the ingredients first.",
)

log = logging.getLogger("bench.decode")


# ---- flags --------------------------------------------------------------------------------------------------------
def count(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def names(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    """argparse type: a comma-separated subset of `allowed`, returned in `allowed` order."""
    def parse(text: str) -> list[str]:
        wanted = {s.strip() for s in text.split(",") if s.strip()}
        if not wanted or wanted - set(allowed):
            raise argparse.ArgumentTypeError(f"unknown {', '.join(sorted(wanted - set(allowed))) or '(none given)'}; "
                                             f"expected some of {', '.join(allowed)}")
        return [a for a in allowed if a in wanted]
    return parse


def block_counts(text: str) -> list[int]:
    return sorted({count(s.strip()) for s in text.split(",") if s.strip()})


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=count, default=3, help="prompts per set (default 3)")
    p.add_argument("--new-tokens", type=count, default=128, help="greedy new tokens at most (default 128)")
    p.add_argument("--runs", type=count, default=3, help="timed runs after one warm-up, median (default 3; protocol 5)")
    p.add_argument("--threads", type=count, default=1, help="threads for both sides, torch and OMP/MKL (default 1)")
    p.add_argument("--self-blocks", type=block_counts, default=[4, 8], help="first-N-blocks drafts (default 4,8)")
    p.add_argument("--drop-blocks", type=count, default=22, help="blocks drop-layers removes for its draft (default 22 of 30)")
    p.add_argument("--calib-samples", type=count, default=8, help="drop-layers calibration sequences (default 8)")
    p.add_argument("--calib-seqlen", type=count, default=1024, help="tokens per calibration sequence (default 1024)")
    p.add_argument("--passage-tokens", type=count, default=1000, help="tokens per grounded passage, about (default 1000)")
    p.add_argument("--lookup-tokens", type=count, default=10, help="transformers' prompt_lookup_num_tokens (default 10)")
    p.add_argument("--sets", type=names(SETS), default=list(SETS), help="prompt sets (default grounded,open)")
    p.add_argument("--methods", type=names(FAMILIES), default=None,
                   help=f"method families (default all; the -distill ones with --distilled): {', '.join(FAMILIES)}; "
                        "-self/-drop cover every draft")
    p.add_argument("--distilled", type=Path, default=None,
                   help="a draft model directory for es-/hf-distill, e.g. from README's draft-4-distill recipe")
    p.add_argument("--eagle", type=Path, default=None,
                   help="an EAGLE head directory for es-eagle (`effspec train-draft`)")
    p.add_argument("--eagle-width", type=int, default=3,
                   help="es-eagle-tree, es-eagle-lookup: the head's top-W first tokens are verified side by side "
                        "(default 3, EagleDraft's)")
    p.add_argument("--draft-vocab", type=int, default=0,
                   help="effspec drafts propose only the K most frequent tokens of --vocab-data's responses (0: all)")
    p.add_argument("--vocab-data", type=Path, default=DEFAULT_INSTRUCT,
                   help="Alpaca-layout file whose responses, in the chat template, give --draft-vocab's counts")
    p.add_argument("--parts", type=names(PARTS), default=list(PARTS), help="speculative, kv (default both)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="WikiText-2 raw directory (default ../shared/data/wikitext-2-raw)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON rows (default bench/results/decode.json)")
    extension = kv_module()
    if extension is not None and hasattr(extension, "add_arguments"):  # the kv part's own flags, if it has any
        extension.add_arguments(p.add_argument_group("kv part (bench/decode_cache.py)"))
    args = p.parse_args(argv)
    if args.methods is None:
        args.methods = [m for m in FAMILIES if (m not in DISTILL or args.distilled is not None)
                        and (m not in EAGLE or args.eagle is not None)]
    if set(DISTILL) & set(args.methods) and args.distilled is None:
        p.error("es-distill/hf-distill need --distilled DIR (a draft model directory)")
    if set(EAGLE) & set(args.methods) and args.eagle is None:
        p.error("es-eagle/es-eagle-tree need --eagle DIR (an EAGLE head from `effspec train-draft`)")
    if args.eagle_width < 2:
        p.error(f"--eagle-width {args.eagle_width}: expected 2 or more (es-eagle is width 1)")
    if args.eagle is not None and not args.eagle.is_dir():
        p.error(f"--eagle {args.eagle}: no such directory")
    if args.distilled is not None and not args.distilled.is_dir():
        p.error(f"--distilled {args.distilled}: no such directory")
    if args.draft_vocab < 0:
        p.error("--draft-vocab must be 0 (all tokens) or positive")
    if args.draft_vocab and not args.vocab_data.is_file():
        p.error(f"--vocab-data {args.vocab_data}: no such file")
    return args


# ---- prompts -------------------------------------------------------------------------------------------------------
def detokenize(line: str) -> str:
    """Undo WikiText's tokenization of one paragraph: `@-@` style joiners and spaces before punctuation."""
    s = line.strip().replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    s = re.sub(r" ([.,;:!?)\]])", r"\1", s)
    s = re.sub(r"([(\[]) ", r"\1", s)
    return s.replace(" 's", "'s").replace(" n't", "n't")


def articles(text: str) -> list[list[str]]:
    """The paragraphs of each article of wiki.test.raw (a new article at each ` = Title = ` line)."""
    out: list[list[str]] = []
    for line in text.split("\n"):
        if re.fullmatch(r" = [^=].* = ", line):
            out.append([])
        elif line.strip() and not line.startswith(" =") and out:
            out[-1].append(detokenize(line))
    return out


def passages(text: str, tokenizer, n: int, target: int) -> list[str]:
    """`n` passages of whole paragraphs, one article each, of 0.85-1.15x `target` tokens, in file order."""
    lo, hi = 0.85 * target, 1.15 * target
    out = []
    for paras in articles(text):
        chosen, total = [], 0
        for para in paras:
            k = len(tokenizer(para, add_special_tokens=False)["input_ids"])
            if total + k > hi:
                break
            chosen.append(para)
            total += k
            if total >= lo:
                break
        if total >= lo:
            out.append("\n\n".join(chosen))
            if len(out) == n:
                return out
    raise SystemExit(f"bench/decode.py: error: wiki.test.raw has only {len(out)} articles with a passage of "
                     f"~{target} tokens; asked for {n}")


def chat(tokenizer, content: str):
    import torch

    ids = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                        tokenize=True, return_dict=False)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # some versions return a BatchEncoding
        ids = ids["input_ids"]
    return torch.tensor(ids, dtype=torch.long).flatten()


def prompt_sets(args: argparse.Namespace, tokenizer) -> dict[str, list]:
    out = {}
    if "grounded" in args.sets:
        text = (args.data / "wiki.test.raw").read_text(encoding="utf-8")
        found = passages(text, tokenizer, args.prompts, args.passage_tokens)
        out["grounded"] = [chat(tokenizer, f"{INSTRUCTIONS[i % len(INSTRUCTIONS)]}\n\n{p}") for i, p in enumerate(found)]
    if "open" in args.sets:
        if args.prompts > len(OPEN_PROMPTS):
            log.warning("only %d open prompts: they repeat", len(OPEN_PROMPTS))
        out["open"] = [chat(tokenizer, OPEN_PROMPTS[i % len(OPEN_PROMPTS)]) for i in range(args.prompts)]
    return out


# ---- drafts built from the target ----------------------------------------------------------------------------------
def first_blocks_model(model, n: int):
    """A transformers model of the target's first `n` blocks that shares every module with the target."""
    import torch
    from torch import nn

    cfg = copy.deepcopy(model.config)
    cfg.num_hidden_layers = n
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = cfg.layer_types[:n]
    with torch.device("meta"):
        draft = type(model)(cfg)
    body, src = draft.model, model.model
    body.embed_tokens, body.norm, body.rotary_emb = src.embed_tokens, src.norm, src.rotary_emb
    body.layers = nn.ModuleList(list(src.layers)[:n])
    draft.lm_head = model.lm_head
    draft.generation_config = copy.deepcopy(model.generation_config)
    left = [k for k, t in [*draft.named_parameters(), *draft.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"first_blocks_model: tensors left uninitialized: {left[:5]}")
    return draft.eval()


def drop_layers_model(model, args: argparse.Namespace, tokenizer):
    """The target with `--drop-blocks` blocks removed by the registry's drop-layers step: own blocks (deep-copied
    before the step rewrites them), shared embeddings, norm and head. (model, removed block indices)."""
    from effspec.data import calibration_samples, load_text, tokenize
    from effspec.registry import get_step

    step = get_step("drop-layers")
    draft = first_blocks_model(model, model.config.num_hidden_layers)
    draft.model.layers = copy.deepcopy(draft.model.layers)
    for i, block in enumerate(draft.model.layers):
        block._bench_index = i  # to name the removed blocks afterwards
    calib_text = load_text(str(args.data)).calib_text
    if calib_text is None:
        raise SystemExit(f"bench/decode.py: error: {args.data} has no wiki.valid.raw to calibrate drop-layers on")
    calib = calibration_samples(tokenize(tokenizer, calib_text), args.calib_samples, args.calib_seqlen, seed=0)
    draft = step.apply(draft, step.config(n=args.drop_blocks), calib)
    kept = {b._bench_index for b in draft.model.layers}
    return draft.eval(), sorted(set(range(model.config.num_hidden_layers)) - kept)


# ---- one generation of each method ---------------------------------------------------------------------------------
@dataclass
class Result:
    tokens: list[int]
    seconds: float  # effspec: decode seconds; transformers: wall seconds of the whole generate call
    prefill_seconds: float | None = None
    proposed: int | None = None
    accepted: int | None = None


@dataclass
class Method:
    name: str
    side: str
    draft: str
    run: Callable  # run(prompt_ids_1d) -> Result


@contextlib.contextmanager
def counting_candidates(tally: list[int]):
    """Sum transformers' (proposed, accepted) draft tokens into `tally` while inside; the classes are restored after."""
    from transformers.generation import candidate_generator as cg

    patched = []
    for name in ("AssistedCandidateGenerator", "PromptLookupCandidateGenerator"):
        cls = getattr(cg, name, None)
        if cls is None:
            continue
        own = cls.__dict__.get("update_candidate_strategy")
        inner = cls.update_candidate_strategy

        def wrapped(self, input_ids, scores, num_matches, *rest, _inner=inner, **kw):
            tally[0] += int(scores.shape[1]) - 1  # the candidates this round verified
            tally[1] += int(num_matches)
            return _inner(self, input_ids, scores, num_matches, *rest, **kw)

        cls.update_candidate_strategy = wrapped
        patched.append((cls, own))
    try:
        yield
    finally:
        for cls, own in patched:
            if own is None:
                del cls.update_candidate_strategy
            else:
                cls.update_candidate_strategy = own


def draft_vocabulary(args, tokenizer):
    """The --draft-vocab most frequent tokens of --vocab-data's responses laid out in the chat template (the
    distilled draft's training text), plus the end-of-turn token."""
    from effspec.speculative import frequent_tokens
    from effspec.train_data import instruction_examples, read_instructions

    examples = instruction_examples(read_instructions(args.vocab_data), tokenizer, 1 << 20, template="chat")
    return frequent_tokens([y[y >= 0] for _x, y in examples], args.draft_vocab, always=[tokenizer.eos_token_id])


def effspec_methods(model, eos: int, args, drafts: dict, vocab=None) -> list[Method]:
    from effspec.generate import greedy
    from effspec.speculative import K_MAX, DraftDecoder, PromptLookup, speculative_greedy, with_tokens

    k_max = K_MAX  # speculative_greedy's default, for the draft cache's size
    new = args.new_tokens

    def plain(ids):
        g = greedy(model, ids, new, eos_token_id=eos, engine="lean")
        return Result(g.tokens.tolist(), g.decode_seconds, g.prefill_seconds)

    def speculative(make_draft, tokens=None):
        """make_draft(room, tokens): the draft for one prompt, its head restricted to `tokens` plus the prompt's and
        end-of-text, as `effspec generate` gives them."""
        def run(ids):
            draft = make_draft(ids.numel() + new + k_max + 2, with_tokens(tokens, ids.tolist() + [eos]))
            g, st = speculative_greedy(model, ids, new, draft, eos_token_id=eos)
            return Result(g.tokens.tolist(), g.decode_seconds, g.prefill_seconds, st.proposed, st.accepted)
        return run

    out = []
    if "es-plain" in args.methods:
        out.append(Method("es-plain", "effspec", "-", plain))
    if "es-lookup" in args.methods:
        out.append(Method("es-lookup", "effspec", "prompt lookup", speculative(lambda _n, _t: PromptLookup())))
    for name, (label, hf_model, n_blocks) in drafts.items():
        if f"es-{name.rstrip('0123456789')}" not in args.methods:
            continue
        if n_blocks is not None:  # the target's own first blocks: no second model
            make = lambda L, t, n=n_blocks: DraftDecoder.self_draft(model, L, n, t)  # noqa: E731
        else:
            make = lambda L, t, m=hf_model: DraftDecoder(m, L, vocab=t)  # noqa: E731
        shown = label if vocab is None else f"{label}, {vocab.numel()} tokens + the prompt's"
        out.append(Method(f"es-{name}", "effspec", shown, speculative(make, vocab)))
    if set(EAGLE) & set(args.methods):
        from effspec.eagle import EagleDraft, EagleHead

        head = EagleHead.load(model, args.eagle)
        tokens = head.vocab if vocab is None else vocab
        shown = "EAGLE head, 1 block" + ("" if tokens is None else f", {tokens.numel()} tokens + the prompt's")
        for name, width in (("es-eagle", 1), ("es-eagle-tree", args.eagle_width)):
            if name in args.methods:
                label = shown + ("" if width == 1 else f", top-{width} first tokens")
                out.append(Method(name, "effspec", label,
                                  speculative(lambda L, t, w=width: EagleDraft(head, model, L, t, width=w), tokens)))
        if "es-eagle-lookup" in args.methods:
            from effspec.speculative import Branches

            w = args.eagle_width
            out.append(Method("es-eagle-lookup", "effspec", f"prompt lookup + {shown}, top-{w} first tokens, one tree",
                              speculative(lambda L, t: Branches([PromptLookup(), EagleDraft(head, model, L, t, width=w)]),
                                          tokens)))
    return out


def transformers_methods(model, eos: int, args, drafts: dict) -> tuple[list[Method], Method]:
    """The peer's methods and the one-token `generate` whose time is subtracted from theirs."""
    import torch

    def call(max_new: int, **extra):
        def run(ids):
            assistant = extra.get("assistant_model")
            if assistant is not None:  # transformers keeps draft-length state on the assistant's config: reset it
                assistant.generation_config = copy.deepcopy(model.generation_config)
            tally = [0, 0]
            with counting_candidates(tally), torch.inference_mode():
                t0 = time.perf_counter()
                seq = model.generate(input_ids=ids[None], attention_mask=torch.ones(1, ids.numel(), dtype=torch.long),
                                     max_new_tokens=max_new, do_sample=False, eos_token_id=eos, pad_token_id=eos,
                                     **extra)
                seconds = time.perf_counter() - t0
            speculating = bool(extra)
            return Result(seq[0, ids.numel():].tolist(), seconds, None,
                          tally[0] if speculating else None, tally[1] if speculating else None)
        return run

    out = []
    if "hf-plain" in args.methods:
        out.append(Method("hf-plain", "transformers", "-", call(args.new_tokens)))
    if "hf-lookup" in args.methods:
        out.append(Method("hf-lookup", "transformers", f"prompt lookup ({args.lookup_tokens})",
                          call(args.new_tokens, prompt_lookup_num_tokens=args.lookup_tokens)))
    for name, (label, hf_model, _n) in drafts.items():
        if f"hf-{name.rstrip('0123456789')}" in args.methods:
            out.append(Method(f"hf-{name}", "transformers", label, call(args.new_tokens, assistant_model=hf_model)))
    return out, Method("hf-prefill", "transformers", "-", call(1))


# ---- running a prompt set ------------------------------------------------------------------------------------------
@dataclass
class Runs:
    results: dict = field(default_factory=dict)  # (method, prompt index) -> [Result per run]

    def add(self, method: str, i: int, r: Result) -> None:
        self.results.setdefault((method, i), []).append(r)


def run_set(set_name: str, prompts: list, methods: list[Method], prefill: Method | None, runs: int) -> Runs:
    """One warm-up of every method on the first prompt, then `runs` rounds of every prompt x method."""
    every = methods + ([prefill] if prefill else [])
    for m in every:
        t0 = time.perf_counter()
        m.run(prompts[0])
        log.info("%s: warm-up %s %.1f s", set_name, m.name, time.perf_counter() - t0)
    out = Runs()
    for r in range(runs):
        for i, ids in enumerate(prompts):
            for m in every:
                res = m.run(ids)
                out.add(m.name, i, res)
                log.info("%s run %d/%d prompt %d (%d tokens): %-10s %3d new tokens in %.2f s", set_name, r + 1, runs,
                         i, ids.numel(), m.name, len(res.tokens), res.seconds)
    return out


def summarize(set_name: str, prompts: list, methods: list[Method], runs: Runs) -> list[dict]:
    """One row per method: aggregate decode speed, acceptance, identity; per-prompt detail under `per_prompt`."""
    rows = []
    for m in methods:
        per, steps, seconds, prefill = [], 0, 0.0, 0.0
        proposed = accepted = 0
        for i, ids in enumerate(prompts):
            rs = runs.results[(m.name, i)]
            median = statistics.median(r.seconds for r in rs)
            if m.side == "transformers":
                one = statistics.median(r.seconds for r in runs.results[("hf-prefill", i)])
                pre, dec = one, median - one
            else:
                pre, dec = statistics.median(r.prefill_seconds for r in rs), median
            tokens = rs[0].tokens
            per.append({"prompt": i, "prompt_tokens": ids.numel(), "new_tokens": len(tokens), "tokens": tokens,
                        "decode_seconds": dec, "prefill_seconds": pre, "run_seconds": [r.seconds for r in rs],
                        "stable": all(r.tokens == tokens for r in rs)})
            steps += len(tokens) - 1
            seconds += dec
            prefill += pre
            proposed += rs[0].proposed or 0
            accepted += rs[0].accepted or 0
        spec = rs[0].proposed is not None
        rows.append({"part": "speculative", "set": set_name, "method": m.name, "side": m.side, "draft": m.draft,
                     "prompts": len(prompts), "prompt_tokens_mean": sum(p["prompt_tokens"] for p in per) / len(per),
                     "new_tokens": sum(p["new_tokens"] for p in per), "decode_seconds": seconds,
                     "prefill_seconds": prefill, "decode_tokens_per_s": steps / seconds if seconds > 0 else None,
                     "proposed": proposed if spec else None, "accepted": accepted if spec else None,
                     "acceptance": accepted / proposed if spec and proposed else None, "per_prompt": per})
    add_comparisons(rows)
    return rows


def add_comparisons(rows: list[dict]) -> None:
    by = {r["method"]: r for r in rows}
    es = by.get("es-plain")
    for r in rows:
        plain = by.get("es-plain" if r["side"] == "effspec" else "hf-plain")
        r["speedup_vs_side_plain"] = _ratio(r["decode_tokens_per_s"], plain and plain["decode_tokens_per_s"])
        r["speedup_vs_effspec_plain"] = _ratio(r["decode_tokens_per_s"], es and es["decode_tokens_per_s"])
        same = [p["tokens"] == q["tokens"] for p, q in zip(r["per_prompt"], plain["per_prompt"])] if plain else []
        r["identical_to_side_plain"] = f"{sum(same)}/{len(same)}" if plain else None
        r["identical"] = all(same) if plain else None
    if es and "hf-plain" in by:
        same = [p["tokens"] == q["tokens"] for p, q in zip(by["hf-plain"]["per_prompt"], es["per_prompt"])]
        by["hf-plain"]["identical_to_effspec_plain"] = f"{sum(same)}/{len(same)}"


def _ratio(a, b):
    return a / b if a is not None and b else None


def _f(x, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


# ---- report --------------------------------------------------------------------------------------------------------
def grid(header: tuple, lines: list[tuple]) -> str:
    lines = [tuple(str(c) for c in header)] + [tuple(str(c) for c in line) for line in lines]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    fmt = lambda line: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))  # noqa: E731
    return "\n".join([fmt(lines[0]), "  ".join("-" * w for w in widths)] + [fmt(line) for line in lines[1:]])


def table(rows: list[dict]) -> str:
    header = ("method", "draft", "prompt tok", "new tok", "decode tok/s", "x side plain", "x es-plain",
              "accept", "identical", "prefill s")
    return grid(header, [(r["method"], r["draft"], f"{r['prompt_tokens_mean']:.0f}", r["new_tokens"],
                          _f(r["decode_tokens_per_s"]), _f(r["speedup_vs_side_plain"]) + "x",
                          _f(r["speedup_vs_effspec_plain"]) + "x", _f(r["acceptance"] and 100 * r["acceptance"], ".0f")
                          + ("%" if r["acceptance"] is not None else ""),
                          (r["identical_to_side_plain"] or "-") + (f" (es {r['identical_to_effspec_plain']})"
                                                                    if "identical_to_effspec_plain" in r else ""),
                          _f(r["prefill_seconds"])) for r in rows])


def verdicts(rows: list[dict], draft_names: list[str]) -> list[str]:
    by = {(r["set"], r["method"]): r for r in rows}

    def tps(s, m):
        r = by.get((s, m))
        return r and r["decode_tokens_per_s"]

    def line(label, a, b, target, ident=None):
        if by.get(a) is None or by.get(b) is None:
            missing = ", ".join(f"{s}/{m}" for s, m in (a, b) if (s, m) not in by)
            return f"{label}: not run ({missing} missing)"
        x = tps(*a) / tps(*b)
        ok = x >= target and (ident is None or ident["identical"])
        same = "" if ident is None else f", output identical {ident['identical_to_side_plain']}"
        return (f"{label}: {a[1]} {tps(*a):.2f} vs {b[1]} {tps(*b):.2f} tok/s = {x:.2f}x{same}: "
                f"{'met' if ok else 'not met'}")

    g, o = "grounded", "open"
    out = [line(f"prompt lookup >= {TARGET_LOOKUP:.1f}x plain greedy on {g}, identical", (g, "es-lookup"),
                (g, "es-plain"), TARGET_LOOKUP, by.get((g, "es-lookup")))]
    if (g, "es-lookup") in by and (g, "hf-plain") in by:
        out[-1] += f" (vs transformers plain {tps(g, 'es-lookup') / tps(g, 'hf-plain'):.2f}x)"
    for d in draft_names + [e[3:] for e in EAGLE if (o, e) in by]:
        out.append(line(f"draft {d} >= {TARGET_DRAFT:.1f}x plain greedy on {o}, identical", (o, f"es-{d}"),
                        (o, "es-plain"), TARGET_DRAFT, by.get((o, f"es-{d}"))))
    for d in draft_names:
        out.append(line(f"draft {d} >= {TARGET_DRAFT_PEER:.1f}x transformers assisted generation on {o}",
                        (o, f"es-{d}"), (o, f"hf-{d}"), TARGET_DRAFT_PEER))
    return out


# ---- the kv part: an extension point -------------------------------------------------------------------------------
def kv_module():
    """bench/decode_cache.py (KV-cache compression, written apart) if present, else None. It must define
    `cache_rows(args, model, tokenizer) -> list[dict]`; an `add_arguments(parser)` adds its flags to this script's."""
    if not (BENCH / "decode_cache.py").is_file():
        return None
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))  # bench/ is no package: the sibling module is imported by name
    return importlib.import_module("decode_cache")


def kv_part(args, model, tokenizer) -> tuple[list[dict], str | None]:
    """Rows of the kv module's `cache_rows`, or a note why there are none."""
    module = kv_module()
    if module is None:
        return [], "kv: bench/decode_cache.py not present; no KV-cache rows"
    rows = [{**r, "part": "kv"} for r in module.cache_rows(args, model, tokenizer)]
    return rows, None


def kv_table(rows: list[dict]) -> str:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys and not isinstance(r[k], (list, dict))]
    cell = lambda v: _f(v, ".3g") if isinstance(v, float) else ("-" if v is None else str(v))  # noqa: E731
    return grid(tuple(keys), [tuple(cell(r.get(k)) for k in keys) for r in rows])


# ---- main ----------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # before torch is imported; a value the caller set is kept
        os.environ.setdefault(var, str(args.threads))

    import torch
    import transformers

    from effspec.models import load_model
    from effspec.pipeline import environment

    torch.set_num_threads(args.threads)
    transformers.utils.logging.set_verbosity_error()
    t_start = time.perf_counter()
    loaded = load_model(MODEL)
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    eos = int(tokenizer.eos_token_id)
    rows: list[dict] = []
    notes: list[str] = []
    draft_names: list[str] = []
    drop_info = None

    if "speculative" in args.parts:
        sets = prompt_sets(args, tokenizer)
        drafts: dict = {f"self{n}": (f"first {n} blocks", first_blocks_model(model, n), n) for n in args.self_blocks
                        if {"es-self", "hf-self"} & set(args.methods)}
        if {"es-drop", "hf-drop"} & set(args.methods):
            t0 = time.perf_counter()
            drop_model, removed = drop_layers_model(model, args, tokenizer)
            kept = model.config.num_hidden_layers - len(removed)
            drafts[f"drop{args.drop_blocks}"] = (f"drop-layers, {kept} blocks", drop_model, None)
            drop_info = {"removed_blocks": removed, "calib": [args.calib_samples, args.calib_seqlen],
                         "seconds": time.perf_counter() - t0}
            log.info("drop-layers draft: removed blocks %s (%.0f s)", removed, drop_info["seconds"])
        if {"es-distill", "hf-distill"} & set(args.methods):
            distilled = load_model(str(args.distilled))
            if distilled.tokenizer.get_vocab() != tokenizer.get_vocab():
                raise SystemExit(f"bench/decode.py: error: {args.distilled}: its tokenizer differs from {MODEL}'s")
            blocks = distilled.model.config.num_hidden_layers
            drafts["distill"] = (f"distilled, {blocks} blocks", distilled.model.eval(), None)
        draft_names = list(drafts)
        vocab = draft_vocabulary(args, tokenizer) if args.draft_vocab else None
        es = effspec_methods(model, eos, args, drafts, vocab)
        hf, prefill = transformers_methods(model, eos, args, drafts)
        for set_name, prompts in sets.items():
            runs = run_set(set_name, prompts, es + hf, prefill if hf else None, args.runs)
            rows += summarize(set_name, prompts, es + hf, runs)

    kv_rows: list[dict] = []
    if "kv" in args.parts:
        kv_rows, note = kv_part(args, model, tokenizer)
        if note:
            notes.append(note)

    from effspec.speculative import K_MAX

    env = environment()
    record = {"benchmark": "decode", "model": MODEL, "data": str(args.data),
              "protocol": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "effspec_speculative": {"k": 4, "adaptive": True, "k_max": K_MAX, "prompt_lookup_ngrams": [12, 1]},
              "drop_layers": drop_info, "env": env, "notes": notes, "total_seconds": time.perf_counter() - t_start,
              "rows": rows + kv_rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1, default=str) + "\n", encoding="utf-8")

    omp = os.environ["OMP_NUM_THREADS"]
    report(args, rows, kv_rows, notes, draft_names, drop_info, env, omp, tokenizer.eos_token)
    print(json.dumps(record, default=str))
    return 0


def report(args, rows, kv_rows, notes, draft_names, drop_info, env, omp, eos_text) -> None:
    """The tables, the verdicts and the notes (everything printed before the final JSON line)."""
    if rows:
        header(args, drop_info, env, omp, eos_text)
    for set_name in SETS:
        set_rows = [r for r in rows if r["set"] == set_name]
        if set_rows:
            print(f"\n[{set_name}]\n{table(set_rows)}")
    if rows:
        print("\n" + "\n".join(verdicts(rows, draft_names)))
    if kv_rows:
        print(f"\n[kv] rows of bench/decode_cache.py\n{kv_table(kv_rows)}")
    for note in notes:
        print(f"\nnote: {note}")
    unstable = [f"{r['set']}/{r['method']}" for r in rows if not all(p["stable"] for p in r["per_prompt"])]
    if unstable:
        print(f"\nnote: output tokens differed between runs of {', '.join(unstable)}")
    if rows:
        print("\ndecode tok/s: new tokens after the first / summed per-prompt median decode seconds (transformers: "
              "generate wall minus a 1-token generate's); 'x side plain' over the same side's plain greedy, 'x es-plain' "
              "over effspec's; identical: prompts whose tokens equal the side's plain greedy (es: transformers plain vs "
              "effspec plain); prefill s: summed over the prompts (transformers: the 1-token generate).")
    print(f"Rows: {args.out}")


def header(args, drop_info, env, omp, eos_text) -> None:
    import torch

    from effspec.speculative import K_MAX

    print(f"effspec speculative decoding benchmark: {MODEL} float32, greedy, batch 1, up to {args.new_tokens} new "
          f"tokens (stop at {eos_text}), {args.prompts} prompt(s) per set; median of {args.runs} run(s) after "
          f"a warm-up; threads: torch {torch.get_num_threads()}, OMP_NUM_THREADS={omp}; cpu: {env['cpu']}\n"
          f"effspec {env['effspec']} (speculative_greedy k 4 adaptive to {K_MAX}) vs transformers {env['transformers']} "
          f"generate (prompt lookup {args.lookup_tokens} tokens; assistants at its defaults); torch {env['torch']}")
    if drop_info:
        print(f"drop-layers draft: removed blocks {drop_info['removed_blocks']} (block influence on "
              f"{args.calib_samples} x {args.calib_seqlen} wiki.valid.raw tokens)")


if __name__ == "__main__":
    sys.exit(main())
