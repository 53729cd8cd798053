"""LoRA adapters kept beside a packed base (QLoRA) as the adapter files serving tools load over the exported base.

A QLoRA result is a packed base plus float low-rank updates scaling * B A,
which cannot be merged into the base without rounding it again. Serving tools
take exactly that split: vLLM serves a compressed-tensors base with a peft
LoRA adapter (`--enable-lora --lora-modules name=DIR`), transformers loads it
with `PeftModel.from_pretrained`, and llama.cpp runs a base GGUF with a LoRA
GGUF (`--lora FILE`). So the base is exported with each `LoRALinear` replaced
by the layer it wraps, and the adapter is written next to it:

- compressed-tensors: `OUT/lora/` in peft's layout (adapter_config.json,
  adapter_model.safetensors with `base_model.model.<layer>.lora_A.weight`
  (r, in) and `lora_B.weight` (out, r)), lora_alpha = scaling * r.
- GGUF: `OUT` with `.lora.gguf` for `.gguf`, in llama.cpp's adapter layout
  (general.type "adapter", adapter.type "lora", adapter.lora.alpha; tensors
  `<base tensor>.lora_a` (r, in) and `.lora_b` (out, r)). llama.cpp scales by
  alpha / r with r read from lora_a, so alpha = scaling * r here too. Query and
  key rows are permuted as the base's are (B's rows: P (B A) = (P B) A).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator

from torch import nn

from effspec.errors import UserError

PEFT_DIR = "lora"


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The model's `LoRALinear` layers by name (none for a model without kept adapters)."""
    from effspec.steps.tune.lora import LoRALinear

    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def rank_and_alpha(layers: dict[str, nn.Module]) -> tuple[int, float]:
    """The one (r, alpha = scaling * r) every layer shares; both formats hold one scaling per adapter."""
    pairs = {(int(m.lora_A.shape[0]), float(m.scaling)) for m in layers.values()}
    if len(pairs) != 1:
        raise UserError(f"export: the LoRA layers differ in rank or scaling ({sorted(pairs)}); "
                        "one adapter file holds one of each")
    (r, scaling), = pairs
    return r, scaling * r


@contextlib.contextmanager
def base_only(model: nn.Module, layers: dict[str, nn.Module]) -> Iterator[nn.Module]:
    """While inside, each LoRALinear in `model` is replaced by the layer it wraps."""
    from effspec.surgery import replace_module

    for name, m in layers.items():
        replace_module(model, name, m.base)
    try:
        yield model
    finally:
        for name, m in layers.items():
            replace_module(model, name, m)


def gguf_adapter_path(out: Path) -> Path:
    return Path(out).with_suffix(".lora.gguf")


def write_peft_adapter(layers: dict[str, nn.Module], out_dir: Path) -> None:
    """peft's LoRA adapter directory for `layers` (names relative to the transformers model)."""
    from safetensors.torch import save_file

    r, alpha = rank_and_alpha(layers)
    out_dir.mkdir(parents=True)
    state = {}
    for name, m in layers.items():
        state[f"base_model.model.{name}.lora_A.weight"] = m.lora_A.detach().float().contiguous()
        state[f"base_model.model.{name}.lora_B.weight"] = m.lora_B.detach().float().contiguous()
    save_file(state, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": 0.0,
              "bias": "none", "use_rslora": False, "use_dora": False, "fan_in_fan_out": False,
              "target_modules": sorted(layers), "base_model_name_or_path": "..", "inference_mode": True}
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))


def add_gguf_adapter(w, layers: dict[str, nn.Module], gguf_name, permute) -> None:
    """The adapter's metadata and tensors, into the GGUF writer `w` (arch already set)."""
    import gguf

    _, alpha = rank_and_alpha(layers)
    w.add_string(gguf.Keys.General.TYPE, gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for name, m in layers.items():
        hf = f"{name}.weight"
        base = gguf_name(hf)
        w.add_tensor(f"{base}.lora_a", m.lora_A.detach().float().contiguous().numpy())
        w.add_tensor(f"{base}.lora_b", permute(hf, m.lora_B.detach().float()).contiguous().numpy())
