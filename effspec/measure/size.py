"""Stored size: bytes of the tensors a model keeps, counted as stored (packed), and bits per parameter.

Parameters are counted logically (a packed 4-bit linear layer of shape
out x in still has out*in parameters); bytes are what its state holds, with
tied tensors counted once. "Linear" figures cover the linear layers (float or
packed) other than the output head, the part compression steps target.
Sparsity is the fraction of exact zeros in float linear weights, or of pruned
positions in sparse-stored ones (`effspec.sparsity.SparseLinear`), per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Size:
    stored_bytes: int
    params: int
    bits_per_param: float
    linear_stored_bytes: int
    linear_params: int
    linear_bits_per_param: float
    sparsity: float | None  # over float linear weights; None when there are none
    layer_sparsity: dict[str, float] = field(default_factory=dict)


def _is_packed(m: nn.Module) -> bool:
    return hasattr(m, "kind") and hasattr(m, "manifest")


def _is_linear(name: str, m: nn.Module, head: nn.Module | None) -> bool:
    return (type(m) is nn.Linear or _is_packed(m)) and m is not head


def size(model: nn.Module) -> Size:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    seen: set[int] = set()
    stored = params = lin_stored = lin_params = 0
    zeros = dense = 0
    layer_sparsity = {}
    for name, module in model.named_modules():
        own = list(module.named_parameters(recurse=False)) + [
            (n, b) for n, b in module.named_buffers(recurse=False) if n not in module._non_persistent_buffers_set]
        m_bytes = m_params = 0
        for _, t in own:
            if t is None or t.data_ptr() in seen and t.numel():
                continue
            seen.add(t.data_ptr())
            m_bytes += t.numel() * t.element_size()
            m_params += t.numel() if isinstance(t, nn.Parameter) else 0
        if _is_packed(module) and next(module.children(), None) is None:  # a leaf: its logical weight
            m_params = module.in_features * module.out_features + (module.bias.numel() if module.bias is not None else 0)
        stored += m_bytes
        params += m_params
        if _is_linear(name, module, head):
            lin_stored += m_bytes
            lin_params += m_params
            if type(module) is nn.Linear or hasattr(module, "sparsity"):  # float, or stored sparse
                n = module.in_features * module.out_features
                z = int((module.weight == 0).sum()) if type(module) is nn.Linear else round(module.sparsity() * n)
                layer_sparsity[name] = z / n
                zeros += z
                dense += n
    return Size(stored, params, 8 * stored / max(params, 1), lin_stored, lin_params,
                8 * lin_stored / max(lin_params, 1), zeros / dense if dense else None, layer_sparsity)
