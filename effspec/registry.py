"""The one place steps register: name, family, stage of the spectrum, config class, calibration need.

A step module decorates its `apply` with `@register(...)`; `effspec/steps/__init__.py`
imports each step module in one line. The CLI's `steps` list, the recipe parser and
the contract tests all read `STEPS`, so a new technique is one file and one import.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

from effspec.errors import UserError

STAGES = ("budget", "data", "architecture", "training", "inference")


@dataclass(frozen=True)
class StepInfo:
    name: str
    family: str  # quantize, prune, lowrank, tune, decode, arch, data, budget
    stage: str  # one of STAGES
    config: type  # frozen dataclass
    apply: Callable  # apply(model, cfg, calib=None) -> model
    needs_calibration: bool
    summary: str  # first line of the step module's docstring
    training: bool = False  # apply also takes tokenizer= and teacher= (tuning steps)


STEPS: dict[str, StepInfo] = {}


def register(name: str, *, family: str, stage: str, config: type, calibration: bool = False, training: bool = False):
    """Decorator on a step's `apply` that makes it available to recipes under `name`."""
    if stage not in STAGES:
        raise ValueError(f"stage={stage!r}: expected one of {STAGES}")

    def wrap(apply: Callable) -> Callable:
        doc = (sys.modules[apply.__module__].__doc__ or "").strip().splitlines()
        STEPS[name] = StepInfo(name, family, stage, config, apply, calibration, doc[0] if doc else "", training)
        return apply

    return wrap


def get_step(name: str) -> StepInfo:
    import effspec.steps  # noqa: F401  (registers every step)

    if name not in STEPS:
        raise UserError(f"unknown step '{name}': registered steps are {', '.join(sorted(STEPS))}")
    return STEPS[name]


def all_steps() -> dict[str, StepInfo]:
    import effspec.steps  # noqa: F401

    return dict(sorted(STEPS.items()))
