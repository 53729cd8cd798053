"""What every tuning step shares: its config (optimization + objective + data) and `fit`.

A tuning step only decides which parameters learn (all of them, or adapters);
`fit` builds the examples (the recipe's calibration text cut into `seqlen`
rows, or an instruction file), resolves the teacher, holds a few examples out
for evaluation when `eval_every` asks for it, and runs the shared loop in
`effspec.train`.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from torch import nn

from effspec.config import expect
from effspec.errors import UserError
from effspec.objectives import Loss, Objective, lm_loss
from effspec.train import TrainConfig, TrainLog, train
from effspec.train_data import TEMPLATES, StepBatches, collate, instruction_examples, lm_examples, read_instructions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TuneConfig(TrainConfig, Objective):
    """Optimization, objective and data of a tuning step."""

    data: str | None = None  # an Alpaca-layout instruction file (loss on responses); None: the calibration text
    template: str = "alpaca"  # how `data` is laid out: "alpaca" headers or "chat" (the tokenizer's chat template)
    eval_samples: int = 4  # held-out examples scored every eval_every steps

    def __post_init__(self):
        TrainConfig.__post_init__(self)
        Objective.__post_init__(self)
        expect(self.template in TEMPLATES, "template", self.template, f"one of {TEMPLATES}")


def resolve_teacher(cfg: Objective, model: nn.Module, teacher: nn.Module | None) -> nn.Module | None:
    """cfg.teacher (a model spec), else the teacher the recipe kept, else a frozen copy of `model` as it is now."""
    if not cfg.needs_teacher:
        return None
    if cfg.teacher is not None:
        from effspec.models import load_model

        return load_model(cfg.teacher).model
    if teacher is None:
        log.warning("distill: no teacher given; using a copy of the model as it enters this step")
        teacher = copy.deepcopy(model)
    return teacher


def examples(cfg: TuneConfig, calib: torch.Tensor | None, tokenizer) -> list:
    if cfg.data is not None:
        if tokenizer is None:
            raise UserError("instruction data needs the model's tokenizer")
        return instruction_examples(read_instructions(cfg.data), tokenizer, cfg.seqlen, cfg.template)
    if calib is None:
        raise UserError("a tuning step needs training text: the recipe's calibration data or `data:`")
    return lm_examples(calib, cfg.seqlen)


def fit(model: nn.Module, cfg: TuneConfig, calib: torch.Tensor | None, tokenizer=None,
        teacher: nn.Module | None = None, describe: str = "tune") -> TrainLog:
    """Train the parameters of `model` that require gradients under `cfg`; returns the loss log."""
    data = examples(cfg, calib, tokenizer)
    held = []
    if cfg.eval_every:
        if len(data) <= cfg.eval_samples:
            raise UserError(f"eval_every needs more than eval_samples={cfg.eval_samples} examples, got {len(data)}")
        data, held = data[: -cfg.eval_samples], data[-cfg.eval_samples:]
    pad = getattr(tokenizer, "pad_token_id", None) or getattr(tokenizer, "eos_token_id", None) or 0
    batches = StepBatches(data, cfg.batch_size, cfg.micro_batch, cfg.seed, pad)
    held_batch = collate(held, pad) if held else None

    def evaluate(m: nn.Module) -> float:  # held-out perplexity under the labels
        out = m(input_ids=held_batch["input_ids"], attention_mask=held_batch["attention_mask"])
        return float(torch.exp(lm_loss(out.logits, held_batch["labels"])))

    loss = Loss(cfg, resolve_teacher(cfg, model, teacher), cfg.seed)
    tlog = train(model, batches, loss, cfg, evaluate if held else None, describe)
    log.info("%s: %d steps, loss %.4f -> %.4f, %d tokens, %.1f tokens/s", describe, len(tlog.losses),
             tlog.losses[0] if tlog.losses else float("nan"), tlog.losses[-1] if tlog.losses else float("nan"),
             tlog.tokens, tlog.tokens_per_s)
    return tlog
