"""The path every command shares: load -> calibrate -> apply steps -> measure -> store -> save.

`run_recipe` is what `effspec run` and each point of `effspec spectrum` do:
derive the result key, reuse a stored row if there is one, otherwise apply the
recipe's steps to the model in place (with calibration drawn as the contract
says), check the result is finite, measure it, store the row, and optionally
save the model. `Evaluation` holds what every recipe on one model shares: the
tokenized data, eval windows, calibration tokens and the original model's
distributions for KL divergence.
"""

from __future__ import annotations

import copy
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import effspec
from effspec.block_cache import block_cache
from effspec.data import TextSource, calibration_samples, calibration_tokens, eval_windows, load_text, text_digest, tokenize
from effspec.errors import UserError
from effspec.measure.kld import KLDAccumulator, Reference, reference_path
from effspec.measure.perplexity import TextNorm, perplexity
from effspec.measure.size import size
from effspec.measure.speed import speed
from effspec.models import LoadedModel, fingerprint
from effspec.recipe import Recipe
from effspec.registry import get_step
from effspec.store import Store, result_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MeasureConfig:
    """How results are measured; part of every result's key. Defaults are BENCHMARKS.md's protocol."""

    windows: int | None = 32
    seqlen: int = 2048
    prompt_tokens: int = 128
    new_tokens: int = 128
    prefill_tokens: int = 2048
    runs: int = 5
    tasks: tuple[str, ...] = ()  # zero-shot tasks to score; a recipe measuring "tasks" with none named scores all
    tasks_dir: str | None = None  # local task files (shared/data layout); None: $EFFSPEC_TASKS_DIR or the hub
    task_limit: int | None = None  # a seeded subset of this many examples per task
    kld: bool = False  # also measure KL divergence to the input model, whatever the recipe lists

    def measures_for(self, recipe: Recipe) -> tuple[str, ...]:
        """The recipe's measures plus those the command line adds (--tasks, --kld)."""
        extra = (("tasks",) if self.tasks else ()) + (("kld",) if self.kld else ())
        return tuple(dict.fromkeys(recipe.measures + extra))


class Evaluation:
    """One model's data, tokenized once: eval windows, speed prompt, calibration tokens on demand."""

    def __init__(self, loaded: LoadedModel, source: TextSource, mcfg: MeasureConfig, calib_source: TextSource | None = None):
        self.source, self.mcfg, self.calib_source = source, mcfg, calib_source
        self.tokenizer = loaded.tokenizer
        self.ids = tokenize(loaded.tokenizer, source.eval_text)
        limit = getattr(loaded.model.config, "max_position_embeddings", None)
        if limit and mcfg.seqlen > limit:
            raise UserError(f"--seqlen {mcfg.seqlen} exceeds the model's context of {limit} tokens")
        self.windows = eval_windows(self.ids, mcfg.seqlen, mcfg.windows)
        self._calib_ids: torch.Tensor | None = None
        self._loaded_sources: dict[str, TextSource] = {}
        self._text_norm: TextNorm | None = None

    def result_key(self, model_fp: str, recipe: Recipe) -> str:
        """What determines a result: the input model, the recipe, how it is measured, and on what text."""
        measure = {"measures": sorted(self.mcfg.measures_for(recipe)), **asdict(self.mcfg), "data": self.source.spec,
                   "data_digest": text_digest(self.source.eval_text), "threads": torch.get_num_threads()}
        if recipe.needs_calibration:
            source = self._calibration_source(recipe)
            measure["calibration"] = {"data": source.spec, "digest": text_digest(source.calib_text or source.eval_text)}
        return result_key(model_fp, recipe.hash, measure)

    def _calibration_source(self, recipe: Recipe) -> TextSource:
        """--calib-data, else the recipe's calibration.data, else the eval data itself."""
        if self.calib_source is not None:
            return self.calib_source
        spec = recipe.calibration.data
        if spec is None:
            return self.source
        if spec not in self._loaded_sources:
            self._loaded_sources[spec] = load_text(spec)
        return self._loaded_sources[spec]

    def calibration(self, recipe: Recipe) -> torch.Tensor:
        """Calibration ids (samples, seqlen), drawn from text disjoint from the scored windows."""
        spec = recipe.calibration
        source = self._calibration_source(recipe)
        if source is self.source:  # the eval data: its calibration text, else what lies past the windows
            if self._calib_ids is None:
                self._calib_ids = calibration_tokens(self.tokenizer, source, self.windows.numel())
            ids = self._calib_ids
        else:
            ids = calibration_tokens(self.tokenizer, source, 0)
        return calibration_samples(ids, spec.samples, spec.seqlen, spec.seed)

    # ---- the original's distributions, for KL divergence ----------------------------------------
    def cached_reference(self, model_fp: str) -> Reference | None:
        return Reference.load(reference_path(model_fp, self.windows))

    def build_reference(self, model: torch.nn.Module, model_fp: str) -> Reference:
        """Score the original model once on the eval windows, keeping its top-k (cached on disk)."""
        reference = self.cached_reference(model_fp)
        if reference is None:
            reference = Reference()
            perplexity(model, self.windows, observers=[reference.record])
            reference.save(reference_path(model_fp, self.windows))
        return reference

    # ---- measuring ----------------------------------------------------------------------------
    def measure(self, model: torch.nn.Module, measures: tuple[str, ...], reference: Reference | None = None,
                model_fp: str | None = None) -> dict:
        """Every requested figure of `model`. For "kld", `reference` is the original's distributions; when it is
        None, `model` is the original itself (a recipe without steps) and is recorded as the reference."""
        row: dict = {}
        if "perplexity" in measures or "kld" in measures:
            observers: list = []
            recording = "kld" in measures and reference is None
            if recording:
                reference = Reference()
                observers.append(reference.record)
            if "kld" in measures:
                kld = KLDAccumulator(reference)
                observers.append(kld)
            p = perplexity(model, self.windows, observers)
            row.update(perplexity=p.perplexity, eval_nll=p.nll, eval_tokens=p.eval_tokens,
                       eval_windows=p.eval_windows, eval_seqlen=p.eval_seqlen, **self.text_norm.figures(p))
            if "kld" in measures:
                row.update(asdict(kld.result()))
                if recording and model_fp:
                    reference.save(reference_path(model_fp, self.windows))
        if "size" in measures:
            s = size(model)
            row.update({k: v for k, v in asdict(s).items() if k != "layer_sparsity"})
            if s.sparsity and s.sparsity > 0.01:  # pruned: say what each layer reached
                row["layer_sparsity"] = s.layer_sparsity
        if "tasks" in measures:
            row.update(self.measure_tasks(model))
        if "speed" in measures:
            m = self.mcfg
            sp = speed(model, self.ids, m.prompt_tokens, m.new_tokens, m.prefill_tokens, m.runs)
            row.update(decode_tokens_per_s=sp.decode_tokens_per_s, prefill_tokens_per_s=sp.prefill_tokens_per_s,
                       peak_rss_bytes=sp.peak_rss_bytes, prompt_tokens=sp.prompt_tokens,
                       new_tokens=sp.new_tokens, prefill_tokens=sp.prefill_tokens, threads=sp.threads)
        return row

    @property
    def text_norm(self) -> TextNorm:
        if self._text_norm is None:
            self._text_norm = TextNorm.of(self.tokenizer, self.windows)
        return self._text_norm

    def measure_tasks(self, model: torch.nn.Module) -> dict:
        from effspec.measure.tasks import TASKS, evaluate_tasks

        m = self.mcfg
        results = evaluate_tasks(model, self.tokenizer, m.tasks or TASKS, Path(m.tasks_dir) if m.tasks_dir else None,
                                 m.task_limit)
        row: dict = {}
        for name, r in results.items():
            figures = {f"acc_{name}": r.acc, f"acc_norm_{name}": r.acc_norm, f"{name}_perplexity": r.perplexity,
                       f"{name}_word_perplexity": r.word_perplexity, f"{name}_byte_perplexity": r.byte_perplexity,
                       f"{name}_bits_per_byte": r.bits_per_byte, f"{name}_n": r.n}
            row.update({k: v for k, v in figures.items() if v is not None})
        accs = [r.acc for r in results.values() if r.acc is not None]
        if accs:
            row["tasks_avg_acc"] = sum(accs) / len(accs)
        row["tasks_seconds"] = sum(r.seconds for r in results.values())
        return row


def environment() -> dict:
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"effspec": effspec.__version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "cpu": cpu, "threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}


def check_finite(model: torch.nn.Module, step: str) -> None:
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not torch.isfinite(t.float() if t.element_size() == 1 else t).all():
            raise UserError(f"step '{step}' left NaN/inf values in {name}")


def apply_recipe(model: torch.nn.Module, recipe: Recipe, ev: Evaluation) -> torch.nn.Module:
    """Apply the steps in order. Tuning steps also get the tokenizer and, when they distill from it, the
    teacher: a frozen copy of the model as it was before the first step (kept only while a step needs it)."""
    calib = ev.calibration(recipe) if recipe.needs_calibration else None
    wants_teacher = [i for i, (_, cfg) in enumerate(recipe.steps)
                     if getattr(cfg, "needs_teacher", False) and getattr(cfg, "teacher", None) is None]
    teacher = copy.deepcopy(model).eval().requires_grad_(False) if wants_teacher else None
    for i, (name, cfg) in enumerate(recipe.steps):
        log.info("applying %s", name)
        info = get_step(name)
        with block_cache():  # a step's repeated per-layer shapes would fragment glibc's heap
            if info.training:
                model = info.apply(model, cfg, calib, tokenizer=ev.tokenizer, teacher=teacher)
            else:
                model = info.apply(model, cfg, calib)
        check_finite(model, name)
        if wants_teacher and i == wants_teacher[-1]:
            teacher = None  # no later step distills: free its memory before measuring
    return model.eval()


def run_recipe(loaded: LoadedModel, recipe: Recipe, ev: Evaluation, store: Store | None,
               force: bool = False, model_fp: str | None = None, save_to: Path | None = None) -> tuple[dict, bool]:
    """Result row of `recipe` on `loaded` and whether it came from the store.

    The steps change `loaded.model` in place (a fresh load per recipe costs under
    a second from the cache, and keeping a float original resident would inflate
    the compressed model's measured peak memory); pass a copy to keep it.
    """
    model_fp = model_fp or fingerprint(loaded.model)
    key = ev.result_key(model_fp, recipe)
    if store is not None and not force and save_to is None and (row := store.get(key)) is not None:
        return row, True
    measures = ev.mcfg.measures_for(recipe)
    reference = None
    if "kld" in measures:  # the input model's distributions, before any step changes it
        reference = ev.cached_reference(model_fp)
        if reference is None and recipe.steps:
            reference = ev.build_reference(loaded.model, model_fp)
    model = loaded.model
    t0 = time.perf_counter()
    model = apply_recipe(model, recipe, ev)
    apply_seconds = time.perf_counter() - t0
    row = {"recipe": recipe.name, "recipe_hash": recipe.hash, "recipe_yaml": recipe.text, "model": loaded.spec,
           "model_fingerprint": model_fp, "data": ev.source.spec, "steps": recipe.describe_steps(),
           "apply_seconds": apply_seconds, **ev.measure(model, measures, reference, model_fp), "env": environment()}
    if save_to is not None:
        from effspec.models import save_model

        save_model(model, loaded.tokenizer, save_to, {"recipe": recipe.name, "recipe_hash": recipe.hash,
                                                       "source_model": loaded.spec, "result": row})
    if store is not None:
        store.put(key, row)
    row["key"] = key
    return row, False
