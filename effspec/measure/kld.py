"""KL divergence of a compressed model's next-token distribution from the original's, and top-1 agreement.

llama.cpp judges quantization this way (`perplexity --kl-divergence`): for every
scored position t, KL(P_t || Q_t) = sum_v P_t(v) (log P_t(v) - log Q_t(v)),
where P is the original model and Q the compressed one, reported as the mean and
99th percentile over positions, with the share of positions whose most likely
token is unchanged ("same top p").

The original's distributions are computed once per (model, eval windows) and
cached on disk, compressed to their top-k entries: storing all 49,152
probabilities of 65,536 positions would take 13 GB.
# deviation: with only P's top-k kept, the remaining vocabulary is merged into one
# "tail" outcome on both sides, KL ~= sum_{v in topk} P(v) log(P(v)/Q(v)) + P_tail log(P_tail/Q_tail).
# Merging outcomes never increases KL (log-sum inequality), so this is a lower
# bound that is exact when the top-k carry all of P's mass. On smollm2-135m over
# WikiText-2 windows the top 64 hold ~84.5% of it (measured; reported per run as
# `reference_mass`), so figures are a lower bound, comparable between settings.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from effspec.fsutil import atomic_write_bytes, cache_dir

log = logging.getLogger(__name__)

TOPK = 64


@dataclass
class KLD:
    kld_mean: float
    kld_p99: float
    top1_agreement: float
    reference_mass: float  # mean share of P's probability inside the stored top-k


class Reference:
    """The original model's top-k log-probabilities at every scored position, window by window."""

    def __init__(self, logp: list[torch.Tensor] | None = None, index: list[torch.Tensor] | None = None):
        self.logp = logp or []  # each (L-1, k) float32, descending
        self.index = index or []  # each (L-1, k) int32

    def record(self, i: int, window: torch.Tensor, logits: torch.Tensor) -> None:
        """Observer for `perplexity`: keep window i's top-k log-probabilities."""
        lp = torch.log_softmax(logits.float(), -1)
        top = lp.topk(min(TOPK, lp.shape[-1]), dim=-1)
        self.logp.append(top.values.contiguous())
        self.index.append(top.indices.to(torch.int32).contiguous())

    def save(self, path: Path) -> None:
        import io

        buf = io.BytesIO()
        torch.save({"logp": self.logp, "index": self.index, "k": TOPK}, buf)
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: Path) -> "Reference | None":
        try:
            data = torch.load(path, weights_only=True)
        except (OSError, RuntimeError, EOFError):
            return None
        return cls(data["logp"], data["index"]) if data.get("k") == TOPK else None


def reference_path(model_fingerprint: str, windows: torch.Tensor) -> Path:
    digest = hashlib.blake2b(windows.numpy().tobytes(), digest_size=8).hexdigest()
    return cache_dir() / "kld" / f"{model_fingerprint}-{digest}-top{TOPK}.pt"


class KLDAccumulator:
    """Observer for `perplexity`: compares each window's logits with the reference's."""

    def __init__(self, reference: Reference):
        self.reference = reference
        self.kl: list[torch.Tensor] = []
        self.same_top1 = 0
        self.positions = 0
        self.mass = 0.0

    def __call__(self, i: int, window: torch.Tensor, logits: torch.Tensor) -> None:
        kl, same, mass = kl_topk(self.reference.logp[i], self.reference.index[i], torch.log_softmax(logits.float(), -1))
        self.kl.append(kl)
        self.same_top1 += int(same.sum())
        self.positions += kl.numel()
        self.mass += float(mass.sum())

    def result(self) -> KLD:
        kl = torch.cat(self.kl).double()
        return KLD(float(kl.mean()), float(torch.quantile(kl, 0.99)), self.same_top1 / self.positions,
                   self.mass / self.positions)


def kl_topk(p_logp: torch.Tensor, p_index: torch.Tensor, q_logp: torch.Tensor):
    """Per-position KL(P||Q) from P's top-k (with its tail merged), top-1 agreement, and P's top-k mass.

    p_logp, p_index: (T, k) P's top-k log-probabilities and token ids; q_logp: (T, V) Q's log-probabilities.
    """
    q_top = q_logp.gather(-1, p_index.long())  # (T, k) Q at P's top-k tokens
    p_top = p_logp.exp()
    p_tail = (1 - p_top.sum(-1)).clamp_min(0)
    q_tail = (1 - q_top.exp().sum(-1)).clamp_min(1e-30)
    kl = (p_top * (p_logp - q_top)).sum(-1)
    kl = kl + torch.where(p_tail > 0, p_tail * (p_tail.clamp_min(1e-30).log() - q_tail.log()), torch.zeros_like(kl))
    same = q_logp.argmax(-1) == p_index[:, 0].long()
    return kl, same, 1 - p_tail
