"""Adapters through peft: LoRA (Hu et al. 2021), rsLoRA, DoRA, IA3, prompt and prefix tuning, and QLoRA.

LoRA freezes W and learns a low-rank update, h = W x + (alpha / r) B A x with
A (r x in) Gaussian-initialized and B (out x r) zero, so training starts at the
base model; rsLoRA (Kalajdzievski 2023) scales by alpha / sqrt(r) instead,
which keeps the update's size steady as r grows. DoRA (Liu et al. 2024)
learns a magnitude per output column on top of a LoRA direction; IA3 (Liu et
al. 2022) learns one scale per feature of keys, values and the FFN input;
prompt and prefix tuning learn virtual tokens. peft builds all of them (they
are not rewritten here); this step picks the method, trains it with the shared
loop and objective (`objective: distill` gives "LoRA + distill"), optionally
saves the adapter in peft's own format (`save_adapter`, loadable with
`PeftModel.from_pretrained`), and then

- merges the update into float dense bases (W <- W + (alpha/r) B A): no extra
  op or byte is left at inference;
- keeps it beside packed or sparse bases, as `LoRALinear`, so the base stays
  packed (QLoRA, Dettmers et al. 2023: LoRA over a frozen 4-bit base; merging
  would need re-quantizing) or sparse. Those bases join peft through its
  custom-module hook, and their backward recomputes the dequantized weight
  instead of storing it (`effspec.frozen`), so training memory stays near the
  packed size.

Prompt and prefix tuning cannot merge into weights and change the model's
inputs; they train and save adapters only (`effspec tune`), not in a recipe.
Defaults: r=16 (the issue's benchmark), alpha=32 (alpha = 2r, common practice),
dropout 0.05 and every projection of every block (QLoRA found adapting all
linear layers necessary to match full fine-tuning); IA3's targets are the
paper's keys, values and FFN down-projection.
"""

from __future__ import annotations

import fnmatch
import logging
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from effspec.block_cache import block_cache
from effspec.config import expect
from effspec.errors import UserError
from effspec.fsutil import atomic_dir
from effspec.layers import PACKED_LAYERS
from effspec.registry import register
from effspec.surgery import replace_module
from effspec.tuning import TuneConfig, fit

log = logging.getLogger(__name__)
METHODS = ("lora", "dora", "ia3", "prompt", "prefix")
WEIGHT_METHODS = ("lora", "dora", "ia3")  # the ones a recipe can apply (they merge into weights)
BLOCK_LINEARS = ("*.q_proj", "*.k_proj", "*.v_proj", "*.o_proj", "*.gate_proj", "*.up_proj", "*.down_proj")
IA3_TARGETS = ("*.k_proj", "*.v_proj", "*.down_proj")
IA3_FEEDFORWARD = ("*.down_proj",)  # IA3 scales this layer's input (the FFN activation), others' outputs


@dataclass(frozen=True)
class AdapterConfig(TuneConfig):
    method: str = "lora"
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    rslora: bool = False  # scale alpha / sqrt(r) instead of alpha / r
    targets: tuple[str, ...] = ()  # module-name patterns; empty: the method's default (see the docstring)
    virtual_tokens: int = 20  # prompt/prefix tuning: learned tokens
    merge: bool = True  # merge into float dense bases; packed and sparse bases always keep the adapter
    save_adapter: str | None = None  # also write the trained adapter here, in peft's format

    def __post_init__(self):
        super().__post_init__()
        expect(self.method in METHODS, "method", self.method, f"one of {METHODS}")
        expect(self.r >= 1, "r", self.r, "a rank of at least 1")
        expect(self.alpha > 0, "alpha", self.alpha, "positive")
        expect(0 <= self.dropout < 1, "dropout", self.dropout, "in [0, 1)")
        expect(self.virtual_tokens >= 1, "virtual_tokens", self.virtual_tokens, "at least 1")
        expect(self.merge or self.method == "lora", "merge", self.merge, "true unless method is lora")

    @property
    def scaling(self) -> float:
        return self.alpha / (self.r ** 0.5 if self.rslora else self.r)


class LoRALinear(nn.Module):
    """base(x) + scaling * B(A(x)) over a frozen base that stays as it is stored (packed, sparse or float)."""

    kind = "lora"

    def __init__(self, base: nn.Module, r: int, scaling: float):
        super().__init__()
        self.base, self.scaling = base, scaling
        self.lora_A = nn.Parameter(torch.zeros(r, base.in_features), requires_grad=False)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r), requires_grad=False)

    in_features = property(lambda self: self.base.in_features)
    out_features = property(lambda self: self.base.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A.to(x.dtype).T) @ (self.lora_B.to(x.dtype).T * self.scaling)

    def manifest(self) -> dict:
        return {"kind": self.kind, "r": self.lora_A.shape[0], "scaling": self.scaling}

    @classmethod
    def wrap(cls, m: dict, old: nn.Module) -> "LoRALinear":
        """Rebuild around the module a loader finds at this name; A and B come from the state dict."""
        return cls(old, int(m["r"]), float(m["scaling"]))


PACKED_LAYERS[LoRALinear.kind] = LoRALinear  # type: ignore[assignment]


def _matching(model: nn.Module, patterns: tuple[str, ...]) -> list[str]:
    """Names of linear-like modules (float or packed) matching `patterns`."""
    names = [n for n, m in model.named_modules()
             if (type(m) is nn.Linear or type(m) in PACKED_LAYERS.values()) and hasattr(m, "in_features")
             and any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not names:
        raise UserError(f"adapter targets {list(patterns)} match no linear layer of {type(model).__name__}")
    return names


def peft_config(model: nn.Module, cfg: AdapterConfig):
    """The peft config of `cfg`, with packed layer types registered for LoRA."""
    import peft

    if cfg.method in ("prompt", "prefix"):
        cls = peft.PromptTuningConfig if cfg.method == "prompt" else peft.PrefixTuningConfig
        return cls(task_type="CAUSAL_LM", num_virtual_tokens=cfg.virtual_tokens)
    if cfg.method == "ia3":
        targets = _matching(model, cfg.targets or IA3_TARGETS)
        ff = [n for n in targets if any(fnmatch.fnmatchcase(n, p) for p in IA3_FEEDFORWARD)]
        return peft.IA3Config(task_type="CAUSAL_LM", target_modules=targets, feedforward_modules=ff)
    targets = _matching(model, cfg.targets or BLOCK_LINEARS)
    packed = {type(model.get_submodule(n)) for n in targets} - {nn.Linear}
    if packed and cfg.method != "lora":
        raise UserError(f"{cfg.method} needs float weights; {sorted(t.__name__ for t in packed)} layers take "
                        "method: lora (QLoRA)")
    config = peft.LoraConfig(task_type="CAUSAL_LM", r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                             use_rslora=cfg.rslora, use_dora=cfg.method == "dora", target_modules=targets)
    if packed:
        config._register_custom_module({t: _packed_base_lora() for t in packed})
    return config


@lru_cache(maxsize=1)
def _packed_base_lora() -> type:
    """peft's LoRA `Linear`, told a packed or sparse base's device and dtype without computing its weight.

    peft places each adapter by reading its base's `weight`; a packed layer's `weight` dequantizes the whole
    matrix (a 2048 x 8192 projection: 67 MB in float32), once per layer, only to learn a device. Before this, and
    before attaching ran inside the block cache, glibc's heap kept those pages: QLoRA over smollm2-1.7b's shape
    peaked 3.5 GB above its loaded size where LoRA rose 1.1 GB. The adapter is float32, as that `weight` is."""
    from peft.tuners.lora.layer import Linear as PeftLoraLinear

    class PackedBaseLoraLinear(PeftLoraLinear):
        def _get_base_layer_device_and_dtype(self, base_layer):
            stored = next(iter(base_layer.state_dict(keep_vars=True).values()), None)
            return (None if stored is None else stored.device), torch.float32

    return PackedBaseLoraLinear


def attach(model: nn.Module, cfg: AdapterConfig):
    """A peft model over `model` whose only trainable parameters are the adapter's (seeded init)."""
    import peft

    model.requires_grad_(False)
    torch.manual_seed(cfg.seed)
    with warnings.catch_warnings():  # peft warns about every custom (packed) layer type and renamed APIs
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        pm = peft.get_peft_model(model, peft_config(model, cfg))
    for module in pm.modules():  # peft's dropouts, as FastDropout
        for name, child in list(module.named_children()):
            if type(child) is nn.Dropout and child.p > 0:
                setattr(module, name, FastDropout(child.p))
    return pm


class FastDropout(nn.Module):
    """Dropout with a cheaper random draw: one random int16 per element against p * 2^15.

    torch's CPU dropout spends ~4.5 ms drawing a 512 x 1536 mask (bernoulli_), and LoRA calls it
    for every adapter, twice under activation checkpointing: 22% of a smollm2 LoRA step measured
    in the profiler. Drawing int16s takes ~1.9 ms. Same rule as nn.Dropout (zero with probability
    p, survivors scaled by 1 / (1 - p)); # deviation: p is rounded to a multiple of 2^-15.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.threshold = round(p * 32768)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.threshold == 0:
            return x
        keep = torch.empty(x.shape, dtype=torch.int16).random_() >= self.threshold  # random_ on int16: 0 .. 2^15 - 1
        return x * keep.to(x.dtype) * (32768 / (32768 - self.threshold))


def save_adapter(peft_model, out: str | Path) -> None:
    """peft's own adapter directory at `out`, written whole or not at all; an existing path is never touched."""
    out = Path(out).expanduser()
    if out.exists():
        raise UserError(f"save_adapter: {out} already exists; name a new directory")
    with atomic_dir(out) as tmp:
        peft_model.save_pretrained(str(tmp))


def detach(peft_model, cfg: AdapterConfig) -> nn.Module:
    """The plain model back: adapters merged into float dense bases, kept as LoRALinear beside the others."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = peft_model.get_base_model()
    for name, module in list(model.named_modules()):
        if not isinstance(module, BaseTunerLayer):
            continue
        base = module.get_base_layer()
        if type(base) is nn.Linear and (cfg.merge or cfg.method != "lora"):
            module.merge()
            replace_module(model, name, base)
            continue
        keep = LoRALinear(base, cfg.r, cfg.scaling)
        with torch.no_grad():
            keep.lora_A.copy_(module.lora_A["default"].weight)
            keep.lora_B.copy_(module.lora_B["default"].weight)
        replace_module(model, name, keep)
    peft_model.peft_config.clear()
    return model.requires_grad_(False)


def train_adapter(model: nn.Module, cfg: AdapterConfig, calib=None, tokenizer=None, teacher=None):
    """Attach `cfg`'s adapter, train it; returns (peft model, training log).

    Attaching runs inside the training loop's block cache too: DoRA's initial weight norms make weight-size
    temporaries among the adapters' small tensors, and on glibc's heap those left holes that the loop (served by
    the cache) never reused -- DoRA over smollm2-360m's shape rose 1.7 GB while training, LoRA 0.6 GB."""
    with block_cache():
        pm = attach(model, cfg)
        tlog = fit(pm, cfg, calib, tokenizer, teacher, cfg.method)
    return pm.eval(), tlog


@register("lora", family="tune", stage="training", config=AdapterConfig, calibration=True, training=True)
def apply(model: nn.Module, cfg: AdapterConfig, calib=None, tokenizer=None, teacher=None) -> nn.Module:
    if cfg.method not in WEIGHT_METHODS:
        raise UserError(f"method {cfg.method} changes the model's inputs and cannot merge; train it with "
                        f"`effspec tune --method {cfg.method}` (saves a peft adapter)")
    pm, _ = train_adapter(model, cfg, calib, tokenizer, teacher)
    if cfg.save_adapter:
        save_adapter(pm, cfg.save_adapter)
    return detach(pm, cfg)
