"""Full fine-tuning: every parameter (or those matching `targets`) learns, on text or instructions.

The baseline every parameter-efficient method is measured against: AdamW over
all weights (two float32 moments each, so optimizer state is twice the model),
through the shared loop of `effspec.train` (accumulation, checkpointing,
schedule, resume). With `objective: distill` it learns from the teacher's
distributions instead of the labels (see the `distill` step for recovery after
compression).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from torch import nn

from effspec.config import expect
from effspec.registry import register
from effspec.train import TrainLog
from effspec.tuning import TuneConfig, fit


@dataclass(frozen=True)
class FinetuneConfig(TuneConfig):
    lr: float = 5e-5  # full fine-tuning of a ~100M model: lower than an adapter's 2e-4
    targets: tuple[str, ...] = ("*",)  # parameter-name patterns that learn; the rest stay frozen

    def __post_init__(self):
        super().__post_init__()
        expect(len(self.targets) > 0, "targets", self.targets, "at least one parameter-name pattern")


def select_parameters(model: nn.Module, targets: tuple[str, ...]) -> int:
    """requires_grad on the float parameters matching `targets`, off elsewhere; returns how many learn."""
    n = 0
    for name, p in model.named_parameters():
        on = p.is_floating_point() and any(fnmatch.fnmatchcase(name, t) for t in targets)
        p.requires_grad_(on)
        n += p.numel() if on else 0
    return n


def tune_all(model: nn.Module, cfg: FinetuneConfig, calib, tokenizer, teacher, describe: str) -> TrainLog:
    """Train `cfg.targets` of `model` in place (frozen again afterwards); the step and `effspec tune` share it."""
    select_parameters(model, cfg.targets)
    try:
        return fit(model, cfg, calib, tokenizer, teacher, describe)
    finally:
        model.requires_grad_(False)


@register("finetune", family="tune", stage="training", config=FinetuneConfig, calibration=True, training=True)
def apply(model: nn.Module, cfg: FinetuneConfig, calib=None, tokenizer=None, teacher=None) -> nn.Module:
    tune_all(model, cfg, calib, tokenizer, teacher, "finetune")
    return model
