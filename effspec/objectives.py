"""Training objectives: language modelling and knowledge distillation from a teacher.

Every loss is a mean over target tokens -- positions t whose next token t+1 has
a label (not -100), so prompts and padding never count.

- `lm`: next-token cross-entropy on the labels.
- distillation (Hinton et al. 2015, "Distilling the Knowledge in a Neural
  Network"): with p = softmax(teacher logits / T), q = softmax(student logits / T)
    forward KL  KL(p || q) * T^2   (mean-seeking; the T^2 keeps gradients at
                                    the scale of T = 1, as in the paper)
    reverse KL  KL(q || p) * T^2   (mode-seeking; MiniLLM, Gu et al. 2024)
  mixed with the labels' cross-entropy as kd_weight * KD + (1 - kd_weight) * CE, plus
  optionally `hidden_weight` times the mean squared error between student and
  teacher hidden states (normalized by the teacher's mean square; student
  layer k of Ls matched to teacher layer round(k * Lt / Ls), so a student with
  fewer blocks still learns each block's share, as in TinyBERT's uniform map).
- on-policy (GKD, Agarwal et al. 2024): with probability `on_policy`, a batch's
  sequences are replaced by the student's own sampled continuations of their
  first quarter, and the divergence is taken on those generated tokens -- the
  distributions the student will actually meet when it generates.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from effspec.config import expect
from effspec.head_loss import HeadLossSpec, head_loss
from effspec.train_data import IGNORE

Batch = dict[str, torch.Tensor]
KINDS = ("forward", "reverse")
OBJECTIVES = ("lm", "distill")


@dataclass(frozen=True)
class Objective:
    """What a tuning step minimizes. Inherited by the tuning steps' configs, so a recipe sets it inline."""

    objective: str = "lm"  # "lm" (labels' cross-entropy) or "distill" (from the teacher)
    kl: str = "forward"  # distill: "forward" KL(teacher || student) or "reverse" KL(student || teacher)
    temperature: float = 1.0  # distill: softmax temperature (Minitron found 1.0 best for LLM recovery)
    kd_weight: float = 1.0  # distill: weight of the KD term; 1 - kd_weight goes to the labels' cross-entropy
    hidden_weight: float = 0.0  # distill: weight of the hidden-state matching term
    on_policy: float = 0.0  # distill: fraction of batches replaced by student-generated sequences (GKD)
    teacher: str | None = None  # distill: a model spec; None: the model before the recipe's steps

    def __post_init__(self):
        expect(self.objective in OBJECTIVES, "objective", self.objective, f"one of {OBJECTIVES}")
        expect(self.kl in KINDS, "kl", self.kl, f"one of {KINDS}")
        expect(self.temperature > 0, "temperature", self.temperature, "positive")
        expect(0 <= self.kd_weight <= 1, "kd_weight", self.kd_weight, "between 0 and 1")
        expect(self.hidden_weight >= 0, "hidden_weight", self.hidden_weight, "non-negative")
        expect(0 <= self.on_policy <= 1, "on_policy", self.on_policy, "between 0 and 1")

    @property
    def needs_teacher(self) -> bool:
        return self.objective == "distill"


def _targets(labels: torch.Tensor) -> torch.Tensor:
    """Mask (B, L-1) of logit positions whose next token is a target."""
    return labels[:, 1:] != IGNORE


def _plain(head: nn.Module | None) -> bool:
    """A bare linear head without bias, which the fused head + loss computes itself."""
    return type(head) is nn.Linear and head.bias is None


def _logits(out, batch: Batch) -> torch.Tensor:
    """The logits of the batch's own tokens (prompt tuning prepends virtual tokens' logits)."""
    return out.logits[:, -batch["input_ids"].shape[1]:]


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the target tokens."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE)


def kl_divergence(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, kind: str = "forward",
                  temperature: float = 1.0) -> torch.Tensor:
    """Mean over masked positions of KL(p_T || p_S) ("forward") or KL(p_S || p_T) ("reverse"), times T^2.

    `student`, `teacher`: (N, V) logits at the masked positions' rows; `mask`: (N,) bool.
    """
    s = F.log_softmax(student[mask].float() / temperature, dim=-1)
    t = F.log_softmax(teacher[mask].float() / temperature, dim=-1)
    if s.numel() == 0:
        return student.sum() * 0.0
    p, q = (t, s) if kind == "forward" else (s, t)  # KL(p || q) = sum p (log p - log q)
    return (p.exp() * (p - q)).sum(-1).mean() * temperature ** 2


def hidden_loss(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...], mask: torch.Tensor) -> torch.Tensor:
    """Mean over student layers k >= 1 of ||h_S[k] - h_T[map(k)]||^2 / mean(h_T[map(k)]^2) on target positions."""
    Ls, Lt = len(student) - 1, len(teacher) - 1
    terms = []
    for k in range(1, Ls + 1):
        hs, ht = student[k][:, :-1][mask].float(), teacher[round(k * Lt / Ls)][:, :-1][mask].float()
        terms.append(F.mse_loss(hs, ht) / ht.pow(2).mean().clamp_min(1e-8))
    return torch.stack(terms).mean()


@torch.no_grad()
def student_sequences(model: nn.Module, batch: Batch, generator: random.Random) -> Batch:
    """GKD's on-policy data: keep each row's first quarter, let the student sample the rest (temperature 1)."""
    ids = batch["input_ids"]
    keep = max(1, ids.shape[1] // 4)
    was_training = model.training
    model.eval()
    torch.manual_seed(generator.randrange(2 ** 31))
    out = model.generate(ids[:, :keep], attention_mask=batch["attention_mask"][:, :keep], do_sample=True,
                         max_new_tokens=ids.shape[1] - keep, min_new_tokens=ids.shape[1] - keep, top_k=0,
                         temperature=1.0, pad_token_id=0, use_cache=True)
    model.train(was_training)
    labels = out.clone()
    labels[:, :keep] = IGNORE  # the divergence is taken on the generated tokens only
    return {"input_ids": out, "labels": labels, "attention_mask": torch.ones_like(out)}


PLAIN_HEADS = ("llama", "qwen2", "qwen3", "mistral", "gpt2")  # logits = lm_head(last hidden state), nothing after
CHUNK = 128  # positions per head call in the loss: the logits held at once


@contextlib.contextmanager
def head_apart(model: nn.Module) -> Iterator[nn.Module | None]:
    """While inside, `model(...)` returns its last hidden states as "logits"; yields the head to apply.

    The loss then applies the head itself (`effspec.head_loss`: chunk by chunk, the gradient taken
    in the forward pass), so training never holds the (tokens x vocabulary) logits, their
    log-softmax and their gradient at once: at 512 tokens and smollm2's 49,152-token vocabulary
    that is ~100 MB each. Yields None (and changes nothing) for models whose logits are not just
    the head of the last hidden state.
    """
    config = getattr(model, "config", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or getattr(config, "model_type", None) not in PLAIN_HEADS:
        yield None
        return
    model.set_output_embeddings(nn.Identity())
    try:
        yield head
    finally:
        model.set_output_embeddings(head)


class Loss:
    """`loss(model, batch)` for the training loop, holding the teacher when the objective distills."""

    def __init__(self, cfg: Objective, teacher: nn.Module | None = None, seed: int = 0):
        if cfg.needs_teacher and teacher is None:
            raise ValueError("objective 'distill' needs a teacher model")
        self.cfg, self.teacher = cfg, teacher
        self.rng = random.Random(seed)
        if teacher is not None:
            teacher.eval().requires_grad_(False)

    def __call__(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        cfg = self.cfg
        if cfg.needs_teacher and cfg.on_policy and self.rng.random() < cfg.on_policy:
            batch = student_sequences(model, batch, self.rng)
        hidden = cfg.needs_teacher and cfg.hidden_weight > 0
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        with head_apart(model) as head:
            out = model(**inputs, output_hidden_states=hidden)
        h = _logits(out, batch)[:, :-1]  # last hidden states (or logits, head None) predicting tokens 1..L-1
        ref = ref_h = teacher_head = None
        if cfg.needs_teacher:
            with torch.no_grad(), head_apart(self.teacher) as teacher_head:
                ref = self.teacher(**inputs, output_hidden_states=hidden)
            ref_h = _logits(ref, batch)[:, :-1]
        mask, labels = _targets(batch["labels"]), batch["labels"][:, 1:]
        kd = cfg.kd_weight if cfg.needs_teacher else 0.0
        if _plain(head) and (not kd or _plain(teacher_head)):  # the fused head + loss: no logits kept
            spec = HeadLossSpec(kd=kd, kind=cfg.kl, temperature=cfg.temperature)
            total = head_loss(h[mask], head.weight, labels[mask], spec, None if not kd else ref_h[mask],
                              None if not kd else teacher_head.weight)
        else:
            total = self._chunked(h, ref_h, mask, labels, head, teacher_head, kd)
        loss = total / mask.sum().clamp_min(1)
        if hidden:
            loss = loss + cfg.hidden_weight * hidden_loss(out.hidden_states, ref.hidden_states, mask)
        return loss

    def _chunked(self, h, ref_h, mask, labels, head, teacher_head, kd) -> torch.Tensor:
        """The summed loss for heads other than a bare linear layer: chunks of positions, recomputed in backward."""
        cfg = self.cfg

        def chunk_loss(hs: torch.Tensor, ht: torch.Tensor | None, m: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            """Summed loss of one chunk of positions (divided by the target count by the caller)."""
            logits = (head(hs) if head is not None else hs)[m].float()
            total = logits.sum() * 0.0
            if kd:
                with torch.no_grad():
                    t = (teacher_head(ht) if teacher_head is not None else ht)[m].float()
                total = total + kd * kl_divergence(logits, t, torch.ones(len(t), dtype=torch.bool), cfg.kl,
                                                   cfg.temperature) * len(t)
            if kd < 1:
                total = total + (1 - kd) * F.cross_entropy(logits, y[m], reduction="sum")
            return total

        total = h.sum() * 0.0
        for s in range(0, h.shape[1], CHUNK):
            part = (h[:, s : s + CHUNK], None if ref_h is None else ref_h[:, s : s + CHUNK], mask[:, s : s + CHUNK],
                    labels[:, s : s + CHUNK])
            if head is not None and torch.is_grad_enabled():  # recompute the chunk's logits in backward
                total = total + torch.utils.checkpoint.checkpoint(chunk_loss, *part, use_reentrant=False)
            else:
                total = total + chunk_loss(*part)
        return total
