"""Every step module, imported once so each registers itself (one line per technique)."""

from effspec.steps.prune import drop_layers, magnitude, prune_width, sparsegpt, wanda  # noqa: F401
from effspec.steps.quantize import gptq, rtn  # noqa: F401
from effspec.steps.quantize import rotate  # noqa: F401
from effspec.steps.quantize import fp8, nf4  # noqa: F401
from effspec.steps.quantize import awq  # noqa: F401
from effspec.steps.quantize import outliers, smoothquant, w8a8  # noqa: F401
from effspec.steps.lowrank import svd  # noqa: F401
from effspec.steps.tune import distill, finetune, lora  # noqa: F401
