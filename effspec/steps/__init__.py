"""Every step module, imported once so each registers itself (one line per technique)."""

from effspec.steps.prune import magnitude  # noqa: F401
from effspec.steps.quantize import gptq, rtn  # noqa: F401
