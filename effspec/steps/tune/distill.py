"""Knowledge distillation into the compressed model from the model it was (Hinton et al. 2015).

The recovery step of compression papers: after pruning or quantization, the
student (this model) learns to match the teacher's next-token distributions
-- by default the teacher is the model as it was before the recipe's steps, so
`drop-layers -> distill` heals the pruned model toward its own original. The
loss is forward KL at temperature T (times T^2, the paper's scaling); `kl:
reverse` gives MiniLLM's mode-seeking variant, `hidden_weight` adds
hidden-state matching and `on_policy` GKD's student-generated sequences (see
`effspec.objectives`). Every float parameter learns unless `targets` narrows
it; for adapters only, use `lora` with `objective: distill`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from effspec.registry import register
from effspec.steps.tune.finetune import FinetuneConfig, tune_all


@dataclass(frozen=True)
class DistillConfig(FinetuneConfig):
    objective: str = "distill"


@register("distill", family="tune", stage="training", config=DistillConfig, calibration=True, training=True)
def apply(model: nn.Module, cfg: DistillConfig, calib=None, tokenizer=None, teacher=None) -> nn.Module:
    tune_all(model, cfg, calib, tokenizer, teacher, "distill")
    return model
