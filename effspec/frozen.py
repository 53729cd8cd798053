"""A frozen compressed linear layer inside training: gradients reach its input, its weight is not kept.

Autograd would save the dequantized weight of every packed layer for the
backward pass -- a float copy of the whole model, undoing QLoRA's saving. The
function here saves nothing but the layer: backward dequantizes again (the
same trade bitsandbytes' 4-bit matmul makes), so what stays resident is the
packed bytes plus the activations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _FrozenLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:  # type: ignore[override]
        ctx.layer = layer
        bias = None if layer.bias is None else layer.bias.to(x.dtype)
        return F.linear(x, layer.dequantized_weight().to(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        # y = x W^T + b  =>  dL/dx = dL/dy W; the layer's own tensors are frozen
        return grad @ ctx.layer.dequantized_weight().to(grad.dtype), None


def needs_grad(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def frozen_linear(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """x W^T + b for a layer that has `dequantized_weight()`, differentiable in x only."""
    return _FrozenLinear.apply(x, layer)
