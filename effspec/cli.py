"""effspec command line: a thin layer over models, data, recipes, pipeline, store and report.

Every user error prints one line `effspec: error: ...` on stderr and exits 2
(`--debug` shows the traceback). With `--json`, the last line of stdout is one
JSON object holding every figure measured.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import sys
import time
from pathlib import Path

from effspec.errors import UserError

log = logging.getLogger("effspec")


# ---- helpers -------------------------------------------------------------------------------------
def _quiet_libraries() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _emit(args, table: list[tuple[str, object]], record: dict) -> None:
    width = max((len(k) for k, _ in table), default=0)
    for k, v in table:
        print(f"{k:<{width}}  {_fmt(v)}")
    if args.json:
        print(json.dumps(record, default=str))


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:,.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return "—" if v is None else str(v)


def _task_names(text: str | None) -> tuple[str, ...]:
    if not text:
        return ()
    from effspec.measure.tasks import ALL_TASKS, TASKS

    names = TASKS if text == "all" else tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [t for t in names if t not in ALL_TASKS]
    if unknown:
        raise UserError(f"--tasks: unknown task '{unknown[0]}'; expected 'all' or some of {', '.join(ALL_TASKS)}")
    return names


def _measure_config(args):
    from effspec.pipeline import MeasureConfig

    for flag in ("windows", "seqlen", "prompt_tokens", "new_tokens", "prefill_tokens", "runs", "limit"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    if args.tasks_dir and not Path(args.tasks_dir).is_dir():
        raise UserError(f"--tasks-dir {args.tasks_dir}: no such directory")
    return MeasureConfig(windows=args.windows, seqlen=args.seqlen, prompt_tokens=args.prompt_tokens,
                         new_tokens=args.new_tokens, prefill_tokens=args.prefill_tokens, runs=args.runs,
                         tasks=_task_names(args.tasks), tasks_dir=args.tasks_dir, task_limit=args.limit, kld=args.kld)


def _metrics_table(row: dict) -> list[tuple[str, object]]:
    keys = ("perplexity", "eval_windows", "eval_seqlen", "eval_tokens", "bits_per_byte", "word_perplexity",
            "kld_mean", "kld_p99", "top1_agreement", "stored_bytes", "params", "bits_per_param",
            "linear_stored_bytes", "linear_bits_per_param", "sparsity", "decode_tokens_per_s", "prefill_tokens_per_s",
            "peak_rss_bytes", "apply_seconds")
    tasks = [k for k in row if k.startswith(("acc_", "tasks_avg", "wikitext_"))
             or k.endswith("_perplexity") and k not in ("word_perplexity", "byte_perplexity")]
    return [(k, row[k]) for k in keys if k in row] + [(k, row[k]) for k in tasks]


def _flat(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ("recipe_yaml",)}


# ---- commands ------------------------------------------------------------------------------------
def cmd_models(args) -> None:
    from effspec.models import BUILTIN_MODELS

    for name, (desc, _) in BUILTIN_MODELS.items():
        print(f"{name:<14} {desc}")
    if args.json:
        print(json.dumps({"models": {n: d for n, (d, _) in BUILTIN_MODELS.items()}}))


def cmd_steps(args) -> None:
    from effspec.config import config_to_dict
    from effspec.registry import all_steps

    steps = all_steps()
    for s in steps.values():
        calib = "calibrated" if s.needs_calibration else "data-free"
        print(f"{s.name:<12} {s.family:<10} {s.stage:<10} {calib:<11} {s.summary}")
        print(f"{'':<12} defaults: {config_to_dict(s.config())}")
    if args.json:
        print(json.dumps({n: {"family": s.family, "stage": s.stage, "calibration": s.needs_calibration,
                              "defaults": config_to_dict(s.config())} for n, s in steps.items()}))


def cmd_recipes(args) -> None:
    from effspec.recipe import builtin_recipes, load_recipe

    for name in builtin_recipes():
        r = load_recipe(name)
        print(f"{name:<18} {r.describe_steps() or '(no steps: the model as loaded)'}")


def cmd_load_check(args) -> None:
    from effspec.measure.size import size
    from effspec.models import load_model, packed_manifest

    t0 = time.perf_counter()
    loaded = load_model(args.model)
    seconds = time.perf_counter() - t0
    cfg, s = loaded.model.config, size(loaded.model)
    record = {"model": args.model, "architecture": type(loaded.model).__name__, "model_type": cfg.model_type,
              "layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size,
              "params": s.params, "stored_bytes": s.stored_bytes, "bits_per_param": s.bits_per_param,
              "packed_layers": len(packed_manifest(loaded.model)), "load_seconds": seconds}
    _emit(args, list(record.items()), record)


def cmd_eval(args) -> None:
    from effspec.data import load_text
    from effspec.models import load_model
    from effspec.pipeline import Evaluation, environment

    from effspec.models import fingerprint
    from effspec.recipe import MEASURES

    mcfg = _measure_config(args)
    measures = tuple(dict.fromkeys(m.strip() for m in args.measure.split(",") if m.strip()))
    bad = [m for m in measures if m not in MEASURES]
    if bad:
        raise UserError(f"--measure: unknown measure '{bad[0]}'; expected some of {', '.join(MEASURES)}")
    measures += (("tasks",) if mcfg.tasks and "tasks" not in measures else ()) + (
        ("kld",) if mcfg.kld and "kld" not in measures else ())
    loaded = load_model(args.model)
    ev = Evaluation(loaded, load_text(args.data), mcfg)
    reference = None
    if "kld" in measures:
        spec = args.reference or loaded.meta.get("source_model")
        if not spec:
            raise UserError("--kld needs the original model: pass --reference MODEL (models saved by `effspec run` remember theirs)")
        original = load_model(spec)
        if original.model.config.vocab_size != loaded.model.config.vocab_size:
            raise UserError(f"--reference {spec}: vocabulary of {original.model.config.vocab_size} tokens, "
                            f"but {args.model} has {loaded.model.config.vocab_size}")
        reference = ev.build_reference(original.model, fingerprint(original.model))
        del original
    row = {"model": args.model, "data": args.data, **ev.measure(loaded.model, measures, reference), "env": environment()}
    _emit(args, _metrics_table(row), _flat(row))


def cmd_run(args) -> None:
    from effspec.data import load_text
    from effspec.fsutil import atomic_dir, check_output_dir
    from effspec.models import fingerprint, load_model
    from effspec.pipeline import Evaluation, run_recipe
    from effspec.recipe import load_recipe
    from effspec.store import Store

    recipe = _with_calibration_flags(load_recipe(args.recipe), args)
    out = Path(args.out)
    if out.exists():
        check_output_dir(out, force=True, kind="model")  # only effspec's own model directories may be reused
    loaded = load_model(args.model)
    ev = Evaluation(loaded, load_text(args.data), _measure_config(args),
                    load_text(args.calib_data) if args.calib_data else None)
    fp = fingerprint(loaded.model)
    key = ev.result_key(fp, recipe)
    if out.exists() and not args.force and (out / "results.db").is_file() and (out / "config.json").is_file():
        stored = Store(out / "results.db").get(key)
        if stored is not None:
            log.warning("%s already holds this result; reusing it (pass --force to recompute)", out)
            _emit(args, _metrics_table(stored), _flat({**stored, "out": str(out), "reused": True}))
            return
        raise UserError(f"{out}: holds a different result; pass --force to replace it or choose another --out")
    check_output_dir(out, args.force, kind="model")
    with atomic_dir(out) as tmp:
        store = Store(tmp / "results.db")
        row, _ = run_recipe(loaded, recipe, ev, store, force=True, model_fp=fp, save_to=tmp)
        store.close()
    _emit(args, _metrics_table(row), _flat({**row, "out": str(out), "reused": False}))


def _with_calibration_flags(recipe, args):
    """--calib-samples/--calib-seqlen override the recipe's calibration (defaults < YAML < flags)."""
    import dataclasses

    from effspec.config import ConfigError
    from effspec.recipe import CalibrationSpec

    changes = {k: v for k, v in (("samples", args.calib_samples), ("seqlen", args.calib_seqlen)) if v is not None}
    if not changes:
        return recipe
    try:
        spec = CalibrationSpec(**{**dataclasses.asdict(recipe.calibration), **changes})
    except (ConfigError, ValueError) as e:
        raise UserError(f"--calib-{next(iter(changes))}: {e}") from e
    return dataclasses.replace(recipe, calibration=spec)


def cmd_spectrum(args) -> None:
    from effspec.data import load_text
    from effspec.fsutil import MARKER, atomic_write_text, marker_kind
    from effspec.models import fingerprint, load_model
    from effspec.pipeline import Evaluation, run_recipe
    from effspec.recipe import builtin_recipes, load_recipe
    from effspec.registry import get_step
    from effspec.report import write_report
    from effspec.store import Store

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory; choose another --out")
    if out.exists() and any(out.iterdir()) and marker_kind(out) != "spectrum":
        found = marker_kind(out)
        raise UserError(f"{out}: {'holds an effspec ' + found + ' output' if found else 'is not empty and was not written by effspec'}"
                        f", not a spectrum; choose another --out")
    recipes = [_with_calibration_flags(load_recipe(r), args) for r in (args.recipes or list(builtin_recipes()))]
    if not args.recipes:  # training recipes take ~30 min each: only when named
        tuned = [r.name for r in recipes if any(get_step(n).stage == "training" for n, _ in r.steps)]
        recipes = [r for r in recipes if r.name not in tuned]
        if tuned:
            print(f"skipping training recipes (name them with --recipes to run): {', '.join(tuned)}", file=sys.stderr)
    names = [r.name for r in recipes]
    if len(set(names)) != len(names):
        raise UserError(f"--recipes: two recipes share the name '{next(n for n in names if names.count(n) > 1)}'")
    loaded = load_model(args.model)
    ev = Evaluation(loaded, load_text(args.data), _measure_config(args),
                    load_text(args.calib_data) if args.calib_data else None)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / MARKER, json.dumps({"kind": "spectrum", "model": args.model, "data": args.data}))
    store = Store(out / "results.db")
    fp = fingerprint(loaded.model)
    rows, failed = [], []
    fresh, loaded = loaded, None  # steps change a model in place: each computed recipe gets its own load
    for i, recipe in enumerate(recipes, 1):
        try:
            model, fresh = fresh or load_model(args.model), None
            row, reused = run_recipe(model, recipe, ev, store, force=args.force, model_fp=fp)
            if reused:
                fresh = model
            del model
        except UserError as e:
            failed.append(f"{recipe.name}: {e}")
            print(f"[{i}/{len(recipes)}] {recipe.name}: failed: {e}", file=sys.stderr)
            continue
        rows.append(row)
        ppl = row.get("perplexity")
        print(f"[{i}/{len(recipes)}] {recipe.name:<18} ppl {_fmt(ppl)}  {_fmt(row.get('stored_bytes'))} B  "
              f"{_fmt(row.get('decode_tokens_per_s'))} tok/s{'  (stored)' if reused else ''}", file=sys.stderr)
    paths = write_report(rows, out, title=f"effspec spectrum: {args.model} on {args.data}")
    store.close()
    print(f"report: {', '.join(str(p) for p in paths)}")
    if args.json:
        print(json.dumps({"out": str(out), "rows": [_flat(r) for r in rows], "failed": failed}, default=str))
    if failed:
        raise UserError(f"{len(failed)} of {len(recipes)} recipes failed; first: {failed[0]}")


def cmd_generate(args) -> None:
    import torch

    from effspec.generate import TextStream, generate
    from effspec.models import load_model

    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    config = _sampling_config(args)
    if args.kv_cache:
        from effspec.kvcache import parse_cache_spec

        parse_cache_spec(args.kv_cache)  # a malformed spec fails before the (slow) load
        if args.speculate:
            raise UserError("--kv-cache and --speculate cannot be combined: a compressed cache cannot be rolled back")
    if args.draft_vocab and not args.speculate:
        raise UserError("--draft-vocab applies to a --speculate self:N, draft:MODEL or eagle:DIR draft; none was given")
    loaded = load_model(args.model)
    tokenizer = loaded.tokenizer
    if args.chat:
        from effspec.train_data import chat_prompt

        try:
            ids = chat_prompt(tokenizer, args.prompt)
        except UserError as e:
            raise UserError(f"--chat: {e} ({args.model}); give the prompt without --chat") from None
    else:
        ids = tokenizer(args.prompt, add_special_tokens=False)["input_ids"]
    prompt = torch.tensor(ids, dtype=torch.long)
    if prompt.numel() == 0:
        raise UserError("--prompt is empty after tokenization")
    draft = _draft(loaded, prompt, args) if args.speculate else None
    cache = None
    if args.kv_cache:
        from effspec.kvcache import make_cache

        cache = make_cache(args.kv_cache, loaded.model)

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    stream = None if args.json else TextStream(decode, config.stop)

    def show(token: int) -> None:
        print(stream.push(token), end="", flush=True)

    on_token = None if stream is None else show
    if stream is not None:  # the prompt now, the new text as its tokens arrive
        print(args.prompt, end="", flush=True)
    eos, acceptance = tokenizer.eos_token_id, None
    if draft is not None:
        gen, stats = _speculate(loaded, prompt, draft, config, args, decode, on_token)
        acceptance = stats.acceptance if stats.proposed else None
    else:
        gen = generate(loaded.model, prompt, args.max_new_tokens, config, eos_token_id=eos, decode=decode,
                       on_token=on_token, cache=cache)
    text = gen.text if gen.text is not None else decode(gen.tokens.tolist())
    if stream is not None:
        print(stream.rest(text))
        return
    print(args.prompt + text)
    rate = gen.decode_tokens_per_s  # NaN with a single new token: no decode step to time
    print(json.dumps({"text": text, "new_tokens": gen.tokens.numel(), "decode_tokens_per_s": rate if rate == rate else None,
                      "prefill_tokens_per_s": prompt.numel() / gen.prefill_seconds, "acceptance_rate": acceptance,
                      "kv_cache_bytes": gen.cache_bytes}))


def _sampling_config(args):
    """--temperature/--top-k/--top-p/--seed/--stop as a SamplingConfig; a bad value is a one-line UserError."""
    from effspec.generate import SamplingConfig

    try:
        return SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                              stop=tuple(args.stop or ()))
    except ValueError as e:  # "top_p=1.5: expected ..." names the field: name the flag instead
        field, _, rest = str(e).partition("=")
        raise UserError(f"--{field.replace('_', '-')} {rest}") from None


def _draft(loaded, prompt, args):
    """--speculate lookup | self:N (the first N blocks as draft) | draft:MODEL (same tokenizer) | eagle:DIR (an
    EAGLE head trained by `effspec train-draft`); repeated, their proposals as one token tree (`Branches`)."""
    from effspec.decoder import supported
    from effspec.speculative import Branches

    if not supported(loaded.model):
        raise UserError(f"--speculate needs a Llama or Qwen2 model; {args.model} is {loaded.model.config.model_type}")
    kinds = [spec.partition(":")[0] for spec in args.speculate]
    if args.draft_vocab < 0 or (args.draft_vocab and all(kind == "lookup" for kind in kinds)):
        raise UserError("--draft-vocab: expected a positive count of tokens for a self:N, draft:MODEL or eagle:DIR draft")
    if len(args.speculate) > 1 and (args.temperature > 0 or args.stop):
        raise UserError("several --speculate drafts verify a token tree, which greedy decoding without --stop does; "
                        "give one draft to sample or stop")
    room = prompt.numel() + args.max_new_tokens + 16

    @functools.cache
    def draft_vocab():  # counted once, and only once a draft spec is known to be good (tokenizing takes ~1 s)
        return _draft_vocab(loaded.tokenizer, prompt, args) if args.draft_vocab else None

    drafts = [_one_draft(loaded, prompt, spec, args, room, draft_vocab) for spec in args.speculate]
    return drafts[0] if len(drafts) == 1 else Branches(drafts)


def _one_draft(loaded, prompt, spec, args, room, vocab):
    """One --speculate SPEC's draft; `vocab()` the --draft-vocab token set (None: all)."""
    from effspec.decoder import supported
    from effspec.models import load_model
    from effspec.speculative import DraftDecoder, PromptLookup

    kind, _, arg = spec.partition(":")
    if kind == "lookup" and not arg:
        return PromptLookup()
    if kind == "self" and arg.isdigit() and 0 < int(arg) < len(loaded.model.model.layers):
        return DraftDecoder.self_draft(loaded.model, room, int(arg), vocab())
    if kind == "draft" and arg:
        other = load_model(arg)
        if other.tokenizer.get_vocab() != loaded.tokenizer.get_vocab():
            raise UserError(f"--speculate draft:{arg}: its tokenizer differs from {args.model}'s")
        if not supported(other.model):
            raise UserError(f"--speculate draft:{arg}: the draft must be a Llama or Qwen2 model too")
        return DraftDecoder(other.model, room, vocab=vocab())
    if kind == "eagle" and arg:
        return _eagle_draft(loaded, prompt, arg, room, vocab())
    raise UserError(f"--speculate {spec!r}: expected lookup, self:N (0 < N < "
                    f"{len(loaded.model.model.layers)} blocks), draft:MODEL or eagle:DIR")


def _eagle_draft(loaded, prompt, path, room, vocab):
    """An EAGLE head from `path` over the loaded model; it proposes its trained vocabulary (or --draft-vocab's)
    plus the prompt's tokens and end-of-text."""
    from effspec.eagle import EagleDraft, EagleHead
    from effspec.speculative import with_tokens

    if not Path(path).is_dir():
        raise UserError(f"--speculate eagle:{path}: no such directory (train one with `effspec train-draft`)")
    try:
        head = EagleHead.load(loaded.model, path)
    except ValueError as e:
        raise UserError(f"--speculate eagle:{e}") from None
    eos = [] if loaded.tokenizer.eos_token_id is None else [loaded.tokenizer.eos_token_id]
    vocab = with_tokens(head.vocab if vocab is None else vocab, prompt.tolist() + eos)
    return EagleDraft(head, loaded.model, room, vocab)


def _draft_vocab(tokenizer, prompt, args):
    """The --draft-vocab most frequent tokens of --draft-vocab-data, the prompt's tokens and end-of-text."""
    from effspec.data import load_text, tokenize
    from effspec.speculative import frequent_tokens

    text = tokenize(tokenizer, load_text(args.draft_vocab_data).eval_text)
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    return frequent_tokens([text], args.draft_vocab, always=prompt.tolist() + eos)


def _speculate(loaded, prompt, draft, config, args, decode, on_token):
    """Exact speculative greedy when plain greedy was asked for; speculative sampling otherwise (with stop
    strings too: at temperature 0 it makes the greedy choices)."""
    from effspec.speculative import K_MAX, speculative_greedy, speculative_sampling

    eos = loaded.tokenizer.eos_token_id
    k_max = max(K_MAX, args.draft_tokens)  # a longer initial draft than the default cap is the user's to ask for
    if config.greedy and not config.stop:
        return speculative_greedy(loaded.model, prompt, args.max_new_tokens, draft, k=args.draft_tokens,
                                  k_max=k_max, eos_token_id=eos, on_token=on_token)
    return speculative_sampling(loaded.model, prompt, args.max_new_tokens, draft, config, k=args.draft_tokens,
                                k_max=k_max, eos_token_id=eos, decode=decode, on_token=on_token)


def cmd_long_ppl(args) -> None:
    """Perplexity of one long text scored in chunks through each KV cache, against the uncompressed cache."""
    from effspec.data import load_text, tokenize
    from effspec.kvcache import make_cache, parse_cache_spec
    from effspec.measure.long_context import long_context_perplexity
    from effspec.models import load_model

    specs = list(dict.fromkeys(args.kv_cache or []))
    for spec in specs:
        parse_cache_spec(spec)  # malformed specs fail before the (slow) load
    if args.tokens < 2 or args.chunk < 1:
        raise UserError(f"--tokens must be >= 2 and --chunk >= 1, got {args.tokens} and {args.chunk}")
    loaded = load_model(args.model)
    ids = tokenize(loaded.tokenizer, load_text(args.data).eval_text)
    if ids.numel() < args.tokens:
        raise UserError(f"--data {args.data} has {ids.numel()} tokens, fewer than --tokens {args.tokens}")
    ids = ids[: args.tokens]
    rows = []
    for spec in [None] + specs:
        factory = None if spec is None else (lambda s=spec: make_cache(s, loaded.model))
        r = long_context_perplexity(loaded.model, ids, factory, chunk=args.chunk)
        rows.append({"cache": spec or "uncompressed", **r.summary(),
                     **({"by_position": r.by_position(args.bin)} if args.bin else {})})
    base = rows[0]
    print(f"{'cache':<28} {'perplexity':>10} {'vs uncompressed':>15} {'held MiB':>9} {'bytes':>7}")
    for r in rows:
        r["ppl_delta_pct"] = 100 * (r["perplexity"] / base["perplexity"] - 1)
        r["bytes_ratio"] = r["final_cache_bytes"] / base["final_cache_bytes"]
        print(f"{r['cache']:<28} {r['perplexity']:>10.4f} {r['ppl_delta_pct']:>+14.2f}% "
              f"{r['final_cache_bytes'] / 2**20:>9.2f} {r['bytes_ratio']:>6.3f}x")
        for start, ppl in r.get("by_position", []):
            print(f"    tokens {start:>7}-{start + args.bin - 1:<7} perplexity {ppl:.4f}")
    if args.json:
        print(json.dumps({"model": args.model, "data": args.data, "rows": rows}, default=str))


def cmd_export(args) -> None:
    from effspec.export import check_request, export
    from effspec.models import load_model

    out = Path(args.out)
    check_request(args.format, out, args.type, args.force)  # before the (slow) load
    t0 = time.perf_counter()
    loaded = load_model(args.model)
    report = export(loaded, args.format, out, args.type, args.force)
    record = {"model": args.model, **report.record(), "export_seconds": time.perf_counter() - t0}
    table = [(k, record[k]) for k in ("format", "out", "bytes", "exact_layers", "converted_tensors", "dense_layers")]
    table.append(("tensor_types", ", ".join(f"{k} {v}" for k, v in report.tensor_types.items())))
    if report.adapter:
        table.append(("lora adapter", f"{report.adapter} ({report.adapter_layers} layers)"))
    table += [(f"converted {k}", v) for k, v in report.converted.items()]
    _emit(args, table, record)


def _tune_config(args):
    """The step config of `effspec tune`: its flags, then --set KEY=VALUE on any field (defaults < flags < --set)."""
    import yaml

    from effspec.config import ConfigError, config_from_dict
    from effspec.registry import get_step

    fields: dict = {"steps": args.steps, "lr": args.lr, "seqlen": args.train_seqlen, "batch_size": args.batch_size,
                    "micro_batch": args.micro_batch, "objective": args.objective, "eval_every": args.eval_every,
                    "checkpoint_every": args.checkpoint_every, "data": args.instructions}
    if args.method != "full":
        fields.update(method=args.method, r=args.r)
    for item in args.set or ():
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--set {item}: expected KEY=VALUE")
        fields[key.strip()] = yaml.safe_load(value)
    fields = {k: v for k, v in fields.items() if v is not None}
    if fields.get("checkpoint_every"):
        fields.setdefault("checkpoint_dir", str(Path(args.out).with_name(Path(args.out).name + ".ckpt")))
    name = "finetune" if args.method == "full" else "lora"
    try:
        return name, config_from_dict(get_step(name).config, fields)
    except (ConfigError, ValueError) as e:
        raise UserError(f"tune: {e}") from None


def cmd_tune(args) -> None:
    import shutil

    from effspec.data import calibration_tokens, load_text
    from effspec.fsutil import MARKER, atomic_dir, check_output_dir
    from effspec.measure.memory import peak_rss_bytes, reset_peak
    from effspec.models import load_model, save_model
    from effspec.steps.tune import finetune, lora

    name, cfg = _tune_config(args)
    if args.merge and args.method in ("prompt", "prefix"):
        raise UserError(f"--merge: {args.method} tuning learns virtual tokens, which cannot merge into weights")
    if args.data is None and args.instructions is None:
        raise UserError("tune: give --data (text to model) or --instructions (an Alpaca-layout file)")
    out = Path(args.out)
    kind = "model" if args.method == "full" or args.merge else "adapter"
    check_output_dir(out, args.force, kind)
    loaded = load_model(args.model)
    text = None
    if args.data is not None and args.instructions is None:  # its calibration part, else all of it
        text = calibration_tokens(loaded.tokenizer, load_text(args.data), 0)
    reset_peak()  # distilling without --set teacher=MODEL: the teacher is a copy of MODEL (effspec.tuning)
    t0 = time.perf_counter()
    if name == "finetune":
        tlog = finetune.tune_all(loaded.model, cfg, text, loaded.tokenizer, None, "full")
        model, pm = loaded.model, None
    else:
        pm, tlog = lora.train_adapter(loaded.model, cfg, text, loaded.tokenizer)
        model = lora.detach(pm, cfg) if args.merge else None
    seconds, peak = time.perf_counter() - t0, peak_rss_bytes()
    trained = {"method": args.method, "base_model": args.model, "steps": len(tlog.losses), "tokens": tlog.tokens,
               "seconds": seconds, "tokens_per_s": tlog.tokens_per_s, "loss_first": tlog.losses[0] if tlog.losses else None,
               "loss_last": tlog.losses[-1] if tlog.losses else None, "resumed_from": tlog.resumed_from,
               "evals": tlog.evals, "peak_rss_bytes": peak}
    with atomic_dir(out) as tmp:
        if model is not None:
            save_model(model.eval(), loaded.tokenizer, tmp, {"source_model": args.model, "tune": trained})
        else:
            pm.save_pretrained(str(tmp))
            (tmp / MARKER).write_text(json.dumps({"kind": "adapter", "source_model": args.model, "tune": trained},
                                                 indent=2, default=str))
    if cfg.checkpoint_dir and cfg.checkpoint_every:  # the run is whole: its checkpoint has served
        shutil.rmtree(Path(cfg.checkpoint_dir).expanduser(), ignore_errors=True)
    record = {**trained, "out": str(out), "kind": kind, "losses": tlog.losses}
    _emit(args, [(k, trained[k]) for k in ("method", "steps", "tokens", "seconds", "tokens_per_s", "loss_first",
                                           "loss_last", "resumed_from", "peak_rss_bytes")] + [("out", str(out))], record)


def cmd_train_draft(args) -> None:
    """Train an EAGLE draft head for MODEL on its own features of --instructions (chat layout) or --data."""
    from dataclasses import asdict

    from effspec.data import calibration_tokens, load_text
    from effspec.decoder import supported
    from effspec.eagle import EagleConfig, pack_rows, train_eagle
    from effspec.fsutil import MARKER, atomic_dir, check_output_dir
    from effspec.models import load_model
    from effspec.speculative import frequent_tokens
    from effspec.train_data import instruction_examples, own_answers, read_instructions

    if (args.data is None) == (args.instructions is None):
        raise UserError("train-draft: give one of --data (text) or --instructions (an Alpaca-layout file)")
    if args.own_answers < 0 or (args.own_answers and args.instructions is None):
        raise UserError("train-draft: --own-answers N takes N >= 0 new tokens per answer, and --instructions")
    fields = {k: getattr(args, k) for k in ("steps", "lr", "batch_size", "seqlen", "vocab", "seed")
              if getattr(args, k) is not None}
    try:
        cfg = EagleConfig(**fields)
    except ValueError as e:
        raise UserError(f"train-draft: {e}") from None
    out = Path(args.out)
    check_output_dir(out, args.force, "eagle")
    loaded = load_model(args.model)
    if not supported(loaded.model):
        raise UserError(f"train-draft needs a Llama or Qwen2 model; {args.model} is {loaded.model.config.model_type}")
    tok = loaded.tokenizer
    if args.instructions is not None:
        template = "chat" if getattr(tok, "chat_template", None) else "alpaca"
        records = read_instructions(args.instructions)
        seqs = [ids for ids, _ in instruction_examples(records, tok, 1 << 30, template)]  # whole, prompt included
        if args.own_answers:
            seqs += own_answers(loaded.model, tok, records, args.own_answers, template)
    else:
        seqs = [calibration_tokens(tok, load_text(args.data), 0)]
    try:
        rows = pack_rows(seqs, cfg.seqlen)
    except ValueError as e:
        raise UserError(f"train-draft: {e}") from None
    eos = [] if tok.eos_token_id is None else [tok.eos_token_id]
    vocab = frequent_tokens([rows], cfg.vocab, always=eos) if cfg.vocab else None
    t0 = time.perf_counter()
    try:
        head, tlog = train_eagle(loaded.model, rows, cfg, vocab)
    except ValueError as e:  # e.g. too few rows to hold some out
        raise UserError(f"train-draft: {e}") from None
    trained = {"base_model": args.model, "steps": cfg.steps, "tokens": tlog.tokens, "rows": rows.shape[0],
               "seconds": time.perf_counter() - t0, "loss_first": tlog.losses[0], "loss_last": tlog.losses[-1],
               "agreement": tlog.agreement, "config": asdict(cfg)}
    with atomic_dir(out) as tmp:
        head.save(tmp, {"trained": trained})
        (tmp / MARKER).write_text(json.dumps({"kind": "eagle", "source_model": args.model}, indent=2))
    _emit(args, [(k, trained[k]) for k in ("steps", "tokens", "seconds", "loss_first", "loss_last", "agreement")]
          + [("out", str(out))], {**trained, "out": str(out), "losses": tlog.losses})


# ---- parser --------------------------------------------------------------------------------------
def _add_calibration_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib-samples", type=int, help="calibration sequences, overriding recipes (default: recipe's, else 32)")
    p.add_argument("--calib-seqlen", type=int, help="tokens per calibration sequence, overriding recipes (default: recipe's, else 2048)")


def _add_measure_flags(p: argparse.ArgumentParser, windows: int | None = 32) -> None:
    p.add_argument("--windows", type=int, default=windows, help="eval windows (default: %(default)s)")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per eval window (default: %(default)s)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="decode-speed prompt length (default: %(default)s)")
    p.add_argument("--new-tokens", type=int, default=128, help="decode-speed new tokens (default: %(default)s)")
    p.add_argument("--prefill-tokens", type=int, default=2048, help="prefill-speed window (default: %(default)s)")
    p.add_argument("--runs", type=int, default=5, help="timed runs after one warm-up, median (default: %(default)s)")
    p.add_argument("--tasks", help="zero-shot tasks to score: comma-separated names or 'all' (hellaswag, piqa, "
                   "arc_easy, winogrande, boolq, lambada_openai); also 'wikitext': lm-eval's word perplexity "
                   "and bits per byte over whole WikiText-2 articles")
    p.add_argument("--tasks-dir", help="local task files (layout of ../shared/data; default $EFFSPEC_TASKS_DIR, else the hub)")
    p.add_argument("--limit", type=int, help="score a fixed seeded subset of N examples per task")
    p.add_argument("--kld", action="store_true", help="KL divergence and top-1 agreement against the original model")


def _common_flags(suppress: bool) -> argparse.ArgumentParser:
    """Flags accepted before or after the command; after it, they default to 'not given' so they never undo before."""
    p = argparse.ArgumentParser(add_help=False)
    d = {"default": argparse.SUPPRESS} if suppress else {}
    p.add_argument("--json", action="store_true", help="end stdout with one JSON line of every figure", **d)
    p.add_argument("--debug", action="store_true", help="show tracebacks", **d)
    p.add_argument("-v", "--verbose", action="store_true", help="log progress messages", **d)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)", **(d or {"default": None}))
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="effspec", description=__doc__.splitlines()[0], parents=[_common_flags(False)])
    common = _common_flags(True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("models", parents=[common], help="list builtin models").set_defaults(fn=cmd_models)
    sub.add_parser("steps", parents=[common], help="list registered steps and their defaults").set_defaults(fn=cmd_steps)
    sub.add_parser("recipes", parents=[common], help="list builtin recipes").set_defaults(fn=cmd_recipes)
    p = sub.add_parser("load-check", parents=[common], help="load a model and print its architecture and size")
    p.add_argument("model")
    p.set_defaults(fn=cmd_load_check)

    p = sub.add_parser("eval", parents=[common], help="measure perplexity, speed, memory and size")
    p.add_argument("model")
    p.add_argument("--data", required=True)
    p.add_argument("--measure", default="perplexity,speed,size",
                   help="comma-separated from perplexity, speed, size, tasks, kld (default: %(default)s)")
    p.add_argument("--reference", help="original model for --kld (default: the one an effspec-saved MODEL came from)")
    _add_measure_flags(p)
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("run", parents=[common], help="apply a recipe, measure it, save the model")
    p.add_argument("recipe", help="recipe YAML file or builtin recipe name")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, help="directory for the model and result (created atomically)")
    p.add_argument("--calib-data", help="calibration text (default: recipe's calibration.data, else part of --data)")
    _add_calibration_flags(p)
    p.add_argument("--force", action="store_true", help="recompute and replace an existing effspec output")
    _add_measure_flags(p)
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("spectrum", parents=[common], help="run many recipes and report the Pareto frontier")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, help="work directory: results.db, report.md/html, results.csv, plots")
    p.add_argument("--recipes", nargs="+", help="recipe files or builtin names (default: all builtin recipes "
                   "without a training step)")
    p.add_argument("--calib-data")
    _add_calibration_flags(p)
    p.add_argument("--force", action="store_true", help="recompute rows already in the store")
    _add_measure_flags(p)
    p.set_defaults(fn=cmd_spectrum)

    p = sub.add_parser("generate", parents=[common], help="generate text (greedy or sampled), timed")
    p.add_argument("model")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--chat", action="store_true",
                   help="put the prompt in the model's chat template as a user turn (instruction-tuned models)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature; 0 (default) is greedy decoding")
    p.add_argument("--top-k", type=int, default=0, help="sample from the K most likely tokens only (default 0: all)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="sample from the smallest set of most likely tokens whose probability reaches P (default 1: all)")
    p.add_argument("--seed", type=int, help="seed for sampling, to reproduce a generation (default: unseeded)")
    p.add_argument("--stop", action="append", metavar="TEXT",
                   help="stop when the new text contains TEXT, which is cut off (repeatable)")
    p.add_argument("--speculate", action="append", metavar="DRAFT",
                   help="speculative decoding, the same output distribution as without it (greedy: the same "
                        "text): lookup (prompt n-grams), self:N (the model's first N blocks), draft:MODEL (a "
                        "smaller model, same tokenizer), eagle:DIR (an EAGLE head from `effspec train-draft`); "
                        "repeat it to verify several drafts' proposals at once as a token tree (greedy; the first "
                        "draft's rows first), e.g. --speculate lookup --speculate eagle:DIR")
    p.add_argument("--draft-tokens", type=int, default=4, help="initial draft length, adapted to acceptance (default 4)")
    p.add_argument("--draft-vocab", type=int, default=0, metavar="K",
                   help="self:N, draft:MODEL and eagle:DIR propose only the K most frequent tokens of "
                        "--draft-vocab-data and the prompt's tokens (a cheaper draft head; 0: all tokens, or an "
                        "eagle head's own)")
    p.add_argument("--draft-vocab-data", default="stdlib-docs", metavar="DATA",
                   help="text whose token counts pick --draft-vocab's tokens (default: the builtin stdlib-docs)")
    p.add_argument("--kv-cache", default="", metavar="SPEC",
                   help="compressed KV cache: kivi:BITS (2/4/8; keys per channel, values per token), "
                        "streaming:WINDOW (attention sinks + recent window), h2o:RATIO (heavy hitters); "
                        "parameters as kivi:bits=2,group=8 (default: the uncompressed cache)")
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("long-ppl", parents=[common],
                       help="long-context perplexity through compressed KV caches, against the uncompressed cache")
    p.add_argument("model")
    p.add_argument("--data", required=True, help="text to score: a file, a WikiText directory, stdlib-docs, hf:NAME")
    p.add_argument("--kv-cache", action="append", metavar="SPEC",
                   help="a cache to compare (repeatable): kivi:BITS, streaming:WINDOW, h2o:RATIO, or name:key=value,...")
    p.add_argument("--tokens", type=int, default=4096, help="tokens of the text scored (default: %(default)s)")
    p.add_argument("--chunk", type=int, default=64, help="tokens per forward through the cache (default: %(default)s)")
    p.add_argument("--bin", type=int, default=0, help="also print perplexity per BIN tokens of position")
    p.set_defaults(fn=cmd_long_ppl)

    p = sub.add_parser("tune", parents=[common],
                       help="fine-tune a model or train an adapter (LoRA, DoRA, IA3, prompt, prefix) on text or instructions")
    p.add_argument("model")
    p.add_argument("--out", required=True, help="the adapter (peft format) or, for full / --merge, the model directory")
    p.add_argument("--method", default="lora", choices=("full", "lora", "dora", "ia3", "prompt", "prefix"))
    p.add_argument("--data", help="text to learn (language modelling): a file, WikiText directory (its valid split), "
                   "stdlib-docs, hf:NAME")
    p.add_argument("--instructions", help="Alpaca-layout JSON/JSONL (instruction, input, output); loss on responses")
    p.add_argument("--objective", choices=("lm", "distill"), help="lm (default) or distill (from --set teacher=MODEL)")
    p.add_argument("--steps", type=int, help="optimizer steps (default 100)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: 2e-4 adapters, 5e-5 full)")
    p.add_argument("--train-seqlen", type=int, help="tokens per training sequence (default 512)")
    p.add_argument("--batch-size", type=int, help="sequences per optimizer step (default 8)")
    p.add_argument("--micro-batch", type=int, help="sequences per forward/backward; the rest accumulates (default 1)")
    p.add_argument("--r", type=int, help="adapter rank (default 16)")
    p.add_argument("--eval-every", type=int, help="held-out perplexity every N steps")
    p.add_argument("--checkpoint-every", type=int, default=10,
                   help="checkpoint every N steps into OUT.ckpt; run again to resume after a kill (default 10; 0: off)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="any other field of the finetune/lora step config, e.g. --set rslora=true (repeatable)")
    p.add_argument("--merge", action="store_true", help="merge the adapter and save the whole model (lora, dora, ia3)")
    p.add_argument("--force", action="store_true", help="replace an existing effspec output")
    p.set_defaults(fn=cmd_tune)

    p = sub.add_parser("train-draft", parents=[common],
                       help="train an EAGLE draft head (one block over the model's own features) for --speculate eagle:DIR")
    p.add_argument("model")
    p.add_argument("--out", required=True, help="directory for the head: its own weights only (17 MB for smollm2-135m), not the model's")
    p.add_argument("--instructions", help="Alpaca-layout JSON/JSONL, laid out in the tokenizer's chat template")
    p.add_argument("--data", help="text instead: a file, WikiText directory (its valid split), stdlib-docs, hf:NAME")
    p.add_argument("--own-answers", type=int, default=0, metavar="N",
                   help="train on MODEL's own greedy answers to the instructions (up to N tokens each) as well as "
                        "the file's (self-distillation: the text the draft will meet); 0: the file's only")
    p.add_argument("--steps", type=int, help="optimizer steps (default 500)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 1e-3)")
    p.add_argument("--batch-size", type=int, help="rows per step (default 8)")
    p.add_argument("--seqlen", type=int, help="tokens per row (default 512)")
    p.add_argument("--vocab", type=int, help="the head's K most frequent tokens of the data (default 8192; 0: all)")
    p.add_argument("--seed", type=int, help="seed of the init, order and noise (default 0)")
    p.add_argument("--force", action="store_true", help="replace an existing effspec output")
    p.set_defaults(fn=cmd_train_draft)

    p = sub.add_parser("export", parents=[common], help="write a model as compressed-tensors (transformers/vLLM) or GGUF (llama.cpp)")
    p.add_argument("model", help="a directory saved by `effspec run`, or any MODEL")
    p.add_argument("--format", required=True, help="compressed-tensors (a directory) or gguf (a .gguf file)")
    p.add_argument("--out", required=True, help="output directory (compressed-tensors) or .gguf file (written atomically)")
    p.add_argument("--type", help=("gguf: type of tensors without an exact GGML form: q8_0 (default), q4_0, q4_1, q4_k, q6_k, f16, bf16, "
                        "f32 (q4_k/q6_k rows that are not a multiple of 256: q5_0/q8_0)"))
    p.add_argument("--force", action="store_true", help="replace an existing effspec export")
    p.set_defaults(fn=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        _quiet_libraries()
        args.fn(args)
    except UserError as e:
        if args.debug:
            raise
        print(f"effspec: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("effspec: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
