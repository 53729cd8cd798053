"""The one training loop every tuning step shares: AdamW, a schedule, accumulation, checkpoints.

A tuning step (`finetune`, `lora`, `distill`) decides which parameters learn
(`requires_grad`) and what the loss is; `train` does the rest, the way a
demanding user expects of a trainer on a CPU:

- gradient accumulation: `batch_size` sequences per optimizer step, fed
  `micro_batch` at a time, the loss of each micro-batch weighted by its share
  of the step's target tokens so the step's gradient equals the full batch's;
- bfloat16 autocast when the CPU has native bf16 arithmetic (AVX512-BF16 or
  AMX; `bf16: null` decides from /proc/cpuinfo) -- elsewhere bf16 emulation is
  slower than float32;
- gradient checkpointing (activations recomputed in backward, so peak memory
  is about one block's activations instead of all of them), and large tensors
  served from a size-class cache (`effspec.block_cache`) instead of glibc's
  heap, which fragments around them;
- linear warm-up then cosine (or linear, or constant) learning-rate decay;
- an evaluation callback every `eval_every` steps;
- a progress bar with the loss and tokens/s (a log line per 10% without a terminal);
- checkpoint and resume: every `checkpoint_every` steps the trainable
  parameters, optimizer, schedule, RNG state and the loss log are written
  atomically to `checkpoint_dir`; started again with the same config, training
  continues from there and ends where the uninterrupted run would have, because
  batches are a pure function of (seed, step) and the RNG state is restored.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from effspec.block_cache import block_cache
from effspec.config import expect
from effspec.errors import UserError
from effspec.progress import status_bar

log = logging.getLogger(__name__)
SCHEDULES = ("cosine", "linear", "constant")
CHECKPOINT_FILE = "checkpoint.pt"


@dataclass(frozen=True)
class TrainConfig:
    """Optimization settings shared by every tuning step (defaults: QLoRA's recipe scaled to a CPU budget)."""

    steps: int = 100  # optimizer steps
    batch_size: int = 8  # sequences per optimizer step
    micro_batch: int = 1  # sequences per forward/backward (batch_size / micro_batch = accumulation steps)
    seqlen: int = 512  # tokens per training sequence
    lr: float = 2e-4  # QLoRA's 2e-4 for small models; full fine-tuning wants ~1e-5
    schedule: str = "cosine"
    warmup: int = 10  # warm-up steps (linear from 0), at most `steps`
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 turns clipping off
    bf16: bool | None = None  # autocast to bfloat16; None: only where the CPU has native bf16
    grad_checkpointing: bool = True
    eval_every: int = 0  # 0: no evaluation during training
    checkpoint_every: int = 0  # 0: no checkpoints
    checkpoint_dir: str | None = None
    seed: int = 0

    def __post_init__(self):
        expect(self.steps >= 1, "steps", self.steps, "at least 1")
        expect(self.micro_batch >= 1, "micro_batch", self.micro_batch, "at least 1")
        expect(self.batch_size >= self.micro_batch and self.batch_size % self.micro_batch == 0, "batch_size",
               self.batch_size, f"a multiple of micro_batch ({self.micro_batch})")
        expect(self.seqlen >= 2, "seqlen", self.seqlen, "at least 2")
        expect(self.lr > 0, "lr", self.lr, "a positive learning rate")
        expect(self.schedule in SCHEDULES, "schedule", self.schedule, f"one of {SCHEDULES}")
        expect(self.warmup >= 0, "warmup", self.warmup, "non-negative")
        expect(self.weight_decay >= 0, "weight_decay", self.weight_decay, "non-negative")
        expect(self.max_grad_norm >= 0, "max_grad_norm", self.max_grad_norm, "non-negative")
        expect(self.eval_every >= 0, "eval_every", self.eval_every, "non-negative")
        expect(self.checkpoint_every >= 0, "checkpoint_every", self.checkpoint_every, "non-negative")
        expect(self.checkpoint_every == 0 or self.checkpoint_dir is not None, "checkpoint_dir", self.checkpoint_dir,
               "a directory when checkpoint_every > 0")

    @property
    def accumulation(self) -> int:
        return self.batch_size // self.micro_batch

    def optimization(self) -> dict:
        """The fields that determine the trajectory: a checkpoint resumes only under the same ones."""
        return {k: v for k, v in asdict(self).items() if k not in ("checkpoint_every", "checkpoint_dir", "eval_every")}


@dataclass
class TrainLog:
    """What a training run did: the loss of every step, evaluations, tokens and time."""

    losses: list[float] = field(default_factory=list)
    evals: list[tuple[int, float]] = field(default_factory=list)  # (step, value)
    tokens: int = 0  # target tokens trained on
    seconds: float = 0.0
    resumed_from: int = 0  # the step a checkpoint resumed at (0: from scratch)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (else autocast emulates it, slower than float32)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def learning_rate_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of cfg.lr at optimizer step `step` (0-based): linear warm-up, then the decay schedule."""
    warmup = min(cfg.warmup, cfg.steps)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, cfg.steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1.0 - progress


@contextlib.contextmanager
def training_mode(model: nn.Module, checkpointing: bool) -> Iterator[None]:
    """train() with no KV cache and, if asked, gradient checkpointing; the model's modes restored after."""
    was_training = model.training
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    can_checkpoint = checkpointing and getattr(model, "supports_gradient_checkpointing", False)
    if config is not None:
        config.use_cache = False
    newer = hasattr(model, "activation_checkpointing_enable")  # transformers >= 5.2 renamed it
    disable = model.activation_checkpointing_disable if newer else getattr(model, "gradient_checkpointing_disable", None)
    if can_checkpoint:  # non-reentrant: works when only adapter parameters (not the inputs) need gradients
        kwargs = {"use_reentrant": False}
        if newer:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.train()
    try:
        yield
    finally:
        if can_checkpoint:
            disable()
        if config is not None:
            config.use_cache = use_cache
        model.train(was_training)


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise UserError("nothing to train: the model has no parameter that requires gradients")
    return params


# ---- checkpoints --------------------------------------------------------------------------------
def _save_checkpoint(path: Path, step: int, params: dict, opt, sched, log_: TrainLog, cfg: TrainConfig) -> None:
    state = {"step": step, "params": {n: p.detach().clone() for n, p in params.items()},
             "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": torch.get_rng_state(),
             "log": asdict(log_), "config": cfg.optimization()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a kill mid-write leaves the previous checkpoint whole


def _load_checkpoint(path: Path, params: dict, opt, sched, cfg: TrainConfig) -> tuple[int, TrainLog]:
    try:
        state = torch.load(path, weights_only=False)
    except Exception as e:  # truncated or foreign file: the user's to remove, never silently ignored
        raise UserError(f"{path}: cannot read training checkpoint ({str(e).splitlines()[0][:120]})") from None
    if state.get("config") != cfg.optimization():
        raise UserError(f"{path}: checkpoint was written by a run with other settings; use another checkpoint_dir")
    if set(state["params"]) != set(params):
        raise UserError(f"{path}: checkpoint holds other trainable parameters than this model's")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state["params"][n])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    saved = state["log"]
    log_ = TrainLog(list(saved["losses"]), [tuple(e) for e in saved["evals"]], saved["tokens"], saved["seconds"],
                    resumed_from=state["step"])
    return state["step"], log_


# ---- the loop -----------------------------------------------------------------------------------
Batch = dict[str, torch.Tensor]  # input_ids, labels (-100 where not trained on), attention_mask
LossFn = Callable[[nn.Module, Batch], torch.Tensor]  # mean loss over the batch's target tokens


def train(model: nn.Module, batches: Callable[[int], list[Batch]], loss_fn: LossFn, cfg: TrainConfig,
          evaluate: Callable[[nn.Module], float] | None = None, describe: str = "train") -> TrainLog:
    """Run cfg.steps optimizer steps on the parameters of `model` that require gradients.

    `batches(step)` returns that step's micro-batches (a pure function of the step, so a resumed
    run sees the same data); `loss_fn(model, batch)` the mean loss over a batch's target tokens.
    """
    params = trainable(model)
    decay = [p for p in params.values() if p.ndim >= 2] if cfg.weight_decay else list(params.values())
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if cfg.weight_decay:  # no decay on norms and biases, as usual
        groups.append({"params": [p for p in params.values() if p.ndim < 2], "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: learning_rate_factor(s, cfg))
    start, tlog = 0, TrainLog()
    ckpt = Path(cfg.checkpoint_dir).expanduser() / CHECKPOINT_FILE if cfg.checkpoint_dir else None
    if ckpt is not None and ckpt.is_file():
        start, tlog = _load_checkpoint(ckpt, params, opt, sched, cfg)
        log.info("%s: resuming from step %d of %d (%s)", describe, start, cfg.steps, ckpt)
    else:
        torch.manual_seed(cfg.seed)  # dropout masks: a pure function of the seed
    bf16 = native_bf16() if cfg.bf16 is None else cfg.bf16
    with training_mode(model, cfg.grad_checkpointing), block_cache(), status_bar(describe, cfg.steps, start) as bar:
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            micro = batches(step)
            targets = [int((b["labels"][:, 1:] != -100).sum()) for b in micro]
            total = max(1, sum(targets))
            loss_sum = 0.0
            for b, n in zip(micro, targets):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss = loss_fn(model, b)
                (loss.float() * (n / total)).backward()
                loss_sum += float(loss.detach()) * n / total
            if not math.isfinite(loss_sum):
                raise UserError(f"{describe}: the loss became {loss_sum} at step {step}; lower lr (now {cfg.lr})")
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params.values(), cfg.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            tlog.losses.append(loss_sum)
            tlog.tokens += sum(targets)
            tlog.seconds += time.perf_counter() - t0
            if evaluate is not None and cfg.eval_every and (step + 1) % cfg.eval_every == 0:
                with torch.no_grad():
                    model.eval()
                    tlog.evals.append((step + 1, float(evaluate(model))))
                    model.train()
                log.info("%s: step %d eval %.4f", describe, step + 1, tlog.evals[-1][1])
            bar(loss=loss_sum, tokens_per_s=tlog.tokens_per_s)
            if ckpt is not None and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
                _save_checkpoint(ckpt, step + 1, params, opt, sched, tlog, cfg)
    for p in params.values():
        p.grad = None
    return tlog
