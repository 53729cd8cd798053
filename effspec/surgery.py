"""Model surgery by module name, so steps never hard-code a model family's attribute paths.

`linear_layers` finds the linear layers a step should touch by glob patterns
over qualified names; `replace_module` swaps one in place; `decoder_blocks`
finds the stack of transformer blocks that block-by-block calibration walks.
"""

from __future__ import annotations

import fnmatch
from typing import Iterable

from torch import nn

from effspec.errors import UserError

DEFAULT_EXCLUDE = ("lm_head", "*embed_out")  # the output head: usually tied to the embeddings


def linear_layers(model: nn.Module, include: Iterable[str] = ("*",), exclude: Iterable[str] = DEFAULT_EXCLUDE,
                  sparse: bool = False, step: str = "") -> dict[str, nn.Linear]:
    """Float nn.Linear modules whose qualified name matches `include` and no `exclude` pattern; with `sparse`, pruned
    layers too (`effspec.sparsity.SparseLinear`: float values, a dense `weight`), which quantizers keep sparse.

    With `step` (the caller's name), finding none is a UserError: a step that silently compressed nothing (say
    `nf4` after `wanda`, whose layers it cannot take) would report an unchanged model as its result.
    """
    include, exclude = tuple(include), tuple(exclude)
    found, compressed = {}, {}
    for name, module in model.named_modules():
        if not (any(fnmatch.fnmatchcase(name, p) for p in include) and not any(fnmatch.fnmatchcase(name, p) for p in exclude)):
            continue
        kind = getattr(module, "kind", None)
        # not subclasses: packed layers are already compressed
        if type(module) is nn.Linear or (sparse and kind == "sparse"):
            found[name] = module
        elif kind is not None and hasattr(module, "in_features"):
            compressed[name] = kind
    if step and not found:
        why = (f"; {len(compressed)} matching layers are already compressed ({', '.join(sorted(set(compressed.values())))}), "
               f"which {step} does not take: put it before the step that compressed them") if compressed else ""
        raise UserError(f"{step}: no float linear layer matches targets {list(include)} (ignore {list(exclude)}){why}")
    return found


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The ModuleList holding the model's transformer blocks (one per hidden layer)."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    candidates = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    for m in candidates:
        if n is None or len(m) == n:
            return m
    raise UserError(f"unsupported architecture {type(model).__name__}: no list of {n} decoder blocks found")
