"""The output head and the loss in one pass, with the gradient taken in the forward pass.

A causal LM's last matmul maps each position's hidden state to the whole
vocabulary (49,152 logits per token for smollm2), and cross-entropy or a
distillation KL then reads those logits once. Autograd would keep the logits,
their log-softmax and later their gradient -- ~100 MB each per 512 tokens --
and checkpointing the head instead computes the logits twice. Here the loss of
a chunk of positions is a closed form in its logits z (q = softmax(z / T),
p = the teacher's softmax(z_T / T)):

    cross-entropy of label y     d/dz = softmax(z) - onehot(y)
    forward KL(p || q) * T^2     d/dz = T (q - p)
    reverse KL(q || p) * T^2     d/dz = T q (log q - log p - KL(q || p))

so each chunk's logits are made, turned into their loss and into the
gradients of the hidden states (dz W) and of the head weight (dz^T h), and
dropped. Backward only scales the stored gradients by the incoming one: no
logits are kept and none are recomputed. Under CPU autocast the matmuls run in
the autocast dtype, as the plain `nn.Linear` head would; the softmaxes are float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ROWS = 128  # positions whose (rows x vocabulary) logits exist at once


@dataclass(frozen=True)
class HeadLossSpec:
    """How a chunk's logits become a loss: kd * KL + (1 - kd) * CE (kd 0: CE only)."""

    kd: float = 0.0
    kind: str = "forward"  # "forward" KL(teacher || student) or "reverse" KL(student || teacher)
    temperature: float = 1.0


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.get_autocast_dtype("cpu") if t.device.type == "cpu" and torch.is_autocast_enabled("cpu") else t.dtype


def _chunk(z: torch.Tensor, y: torch.Tensor, tz: torch.Tensor | None, spec: HeadLossSpec, want_grad: bool):
    """Summed loss of one chunk's float32 logits `z` (n, V) and, if wanted, its gradient with respect to z."""
    rows = torch.arange(len(z))
    total = z.new_zeros(())
    grad = None
    if spec.kd > 0:
        T = spec.temperature
        lq = torch.log_softmax(z / T, dim=-1)
        lp = torch.log_softmax(tz / T, dim=-1)
        q, p = lq.exp(), lp.exp()
        if spec.kind == "forward":
            total = total + spec.kd * T * T * (p * (lp - lq)).sum()
            grad = spec.kd * T * (q - p) if want_grad else None
        else:
            kl = (q * (lq - lp)).sum(-1, keepdim=True)
            total = total + spec.kd * T * T * kl.sum()
            grad = spec.kd * T * q * (lq - lp - kl) if want_grad else None
        del lq, lp, q, p
    if spec.kd < 1:
        ls = torch.log_softmax(z, dim=-1)
        total = total - (1 - spec.kd) * ls[rows, y].sum()
        if want_grad:
            g = ls.exp_()
            g[rows, y] -= 1
            g *= 1 - spec.kd
            grad = g if grad is None else grad.add_(g)
    return total, grad


def _run(h, weight, labels, teacher_h, teacher_weight, spec, want_h, want_w):
    """The summed loss over all rows, and the gradients wanted (h: like h; weight: float32)."""
    dtype = _compute_dtype(h)
    w = weight.to(dtype)
    tw = None if teacher_h is None else teacher_weight.to(_compute_dtype(teacher_h))
    grad_h = torch.empty_like(h) if want_h else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32) if want_w else None
    total = torch.zeros((), dtype=torch.float64)
    for s in range(0, len(h), ROWS):
        hc = h[s : s + ROWS].to(dtype)
        z = (hc @ w.t()).float()
        tz = None if tw is None else (teacher_h[s : s + ROWS].to(tw.dtype) @ tw.t()).float()
        loss, gz = _chunk(z, labels[s : s + ROWS], tz, spec, want_h or want_w)
        total += loss.double()
        del z, tz
        if gz is not None:
            gz = gz.to(dtype)
            if want_h:
                grad_h[s : s + ROWS] = gz @ w
            if want_w:
                grad_w += (gz.t() @ hc).float()
    return total.float(), grad_h, grad_w


class _HeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, labels, teacher_h, teacher_weight, spec):
        total, grad_h, grad_w = _run(h, weight, labels, teacher_h, teacher_weight, spec,
                                     ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = None if grad_h is None else grad_h * grad_out.to(grad_h.dtype)
        gw = None if grad_w is None else (grad_w * grad_out).to(ctx.weight_dtype)
        return gh, gw, None, None, None, None


def head_loss(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, spec: HeadLossSpec = HeadLossSpec(),
              teacher_h: torch.Tensor | None = None, teacher_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Summed loss of the logits `h @ weight.T` (h: (N, d) hidden states, labels: (N,) token ids).

    With `spec.kd > 0`, `teacher_h @ teacher_weight.T` are the teacher's logits (no gradient).
    Differentiable in `h` and `weight`; the value and gradients equal the plain formula's.
    """
    if spec.kd > 0 and (teacher_h is None or teacher_weight is None):
        raise ValueError("a distillation loss needs the teacher's hidden states and head weight")
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _HeadLoss.apply(h, weight, labels, teacher_h, teacher_weight, spec)
    return _run(h, weight, labels, teacher_h, teacher_weight, spec, False, False)[0]
