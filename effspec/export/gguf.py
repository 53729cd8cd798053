"""Write an effspec model as a llama.cpp GGUF file, packed layers block for block where a GGML type holds them.

GGML's block formats (ggml-common.h; blocks of 32 consecutive weights of a row):

    Q4_0: w = (u - 8) * d        u in [0, 16),  d float16            18 bytes
    Q4_1: w =  u * d + m         u in [0, 16),  d, m float16         20 bytes
    Q8_0: w =  x * d             x in [-128, 128), d float16         34 bytes

and our grid (effspec.quant) is w = q * scale + minimum per group, with float16
scale and minimum. So when a layer's group is a multiple of 32 (per-channel
included, if the row length is) every GGML block takes its group's scale and:

- symmetric b <= 4 bits (minimum = -2^(b-1) scale) -> Q4_0 with u = q + 8 - 2^(b-1);
  2 and 3-bit codes sit inside the 4-bit range, so they too are exact;
- asymmetric b <= 4 bits -> Q4_1 with u = q, d = scale, m = minimum;
- symmetric 8 bits -> Q8_0 with x = q - 128;
- W8A8 layers (int8 codes x, one scale per row) -> Q8_0 with that scale in
  every block of the row (llama.cpp then quantizes activations its own way).

These blocks are built from the stored codes, scales and minimums -- nothing is
rounded again -- so `gguf.quants.dequantize` of the written tensor equals
`QuantLinear.dequantized_weight()` bit for bit (tests check it). Other packed
layers (8-bit asymmetric, groups not a multiple of 32, float32 scales, nf4,
fp8, ...) and float 2-D tensors (token embeddings, an untied head, float linear layers) are
quantized to `--type`: q8_0 by default, as llama.cpp's converter offers;
f32/f16/bf16/q4_0/q4_1 too, through `gguf.quants`, and the K-quants q4_k/q6_k
through effspec.export.kquants (rows that are not a multiple of 256 fall back
to q5_0/q8_0, as llama.cpp's quantizer does). Rows that are not a multiple of
32 are written f16, as the converter does. 1-D tensors (norms,
biases) stay float32.

Names, metadata and layout follow llama.cpp's `convert_hf_to_gguf.py`
(`LlamaModel`, `Qwen2Model`): tensor names from gguf-py's `TensorNameMap`; for
llama, q_proj/k_proj rows (weights and biases) are permuted from HF's
rotate-half RoPE layout to llama.cpp's interleaved one,

    W.reshape(n_head, 2, rows / n_head / 2, ...).swapaxes(1, 2).reshape(W.shape)

with n_head = num_key_value_heads for k_proj -- the inverse of the
`_reverse_permute_weights` transformers' GGUF loader applies. A permutation of
rows moves whole blocks, so it keeps the exact blocks exact. The tied head is
not written (llama.cpp then reuses token_embd). The tokenizer: a model that came
from a GGUF (the builtin smollm2-135m) gets that file's `tokenizer.*` metadata
back unchanged; any other byte-level BPE tokenizer is written as llama.cpp's
converter writes a gpt2-style one (tokens, token types, merges, special ids),
with pre-tokenizer "gpt-2" when its tokenizer.json splits with GPT-2's regex
or has no merges (effspec's byte tokenizer), else "default" with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections import Counter
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn
from gguf import GGMLQuantizationType as T

from effspec.errors import UserError
from effspec.export import ExportReport, float_state, kquants, split_layers
from effspec.fsutil import temp_file_beside
from effspec.layers import QuantLinear

log = logging.getLogger(__name__)

FLOAT_TYPES = {"q8_0": T.Q8_0, "f16": T.F16, "f32": T.F32, "bf16": T.BF16, "q4_0": T.Q4_0, "q4_1": T.Q4_1,
               "q4_k": T.Q4_K, "q6_k": T.Q6_K}
DEFAULT_FLOAT_TYPE = "q8_0"  # the most compact of llama.cpp converter's usual --outtype choices (f32 f16 bf16 q8_0)
ARCHS = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}
FILE_TYPES = {T.F32: gguf.LlamaFileType.ALL_F32, T.F16: gguf.LlamaFileType.MOSTLY_F16,
              T.BF16: gguf.LlamaFileType.MOSTLY_BF16, T.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
              T.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1, T.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
              T.Q4_K: gguf.LlamaFileType.MOSTLY_Q4_K_S, T.Q6_K: gguf.LlamaFileType.MOSTLY_Q6_K,
              T.Q5_0: gguf.LlamaFileType.MOSTLY_Q5_0}
MARKER_KEY = "effspec.export_version"  # lets --force recognize a file effspec wrote
QK = 32  # GGML block length of Q4_0 / Q4_1 / Q8_0


# ---- exact blocks from codes ------------------------------------------------------------------
def exact_form(layer) -> tuple[T, torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """(GGML type, block codes u (out, in) uint8, d (out, in/32) fp16, m or None) if the layer maps exactly."""
    if layer.in_features % QK:
        return None
    if getattr(layer, "kind", None) == "w8a8":  # int8 codes, one scale per row: Q8_0 with that scale in every block
        d = layer.scales.float().half()
        if layer.qweight.dtype != torch.int8 or not torch.equal(d.float(), layer.scales.float()):
            return None
        return T.Q8_0, layer.qweight.view(torch.uint8), d[:, None].repeat(1, layer.in_features // QK), None
    if not isinstance(layer, QuantLinear):  # sparse-quant too: its dense codes
        return None
    g = layer.grid
    if layer.group % QK:
        return None
    s = layer.scales.float()
    d = s.half()
    if not torch.equal(d.float(), s):  # float32-stored scale outside float16's range
        return None
    reps = layer.group // QK
    d = d.repeat_interleave(reps, 1)
    q = layer.codes()
    if g.bits <= 4 and g.symmetric:
        return T.Q4_0, q + (8 - 2 ** (g.bits - 1)), d, None
    if g.bits <= 4:
        m = layer.mins.float().half()
        if not torch.equal(m.float(), layer.mins.float()):
            return None
        return T.Q4_1, q, d, m.repeat_interleave(reps, 1)
    if g.bits == 8 and g.symmetric:
        return T.Q8_0, (q.to(torch.int16) - 128).to(torch.int8).view(torch.uint8), d, None
    return None  # 8-bit asymmetric: Q8_0 has no offset


def ggml_blocks(qtype: T, u: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None) -> np.ndarray:
    """Serialize GGML blocks row-major: (out, in) codes and (out, in/32) fp16 scales -> (out, row bytes) uint8."""
    out, n = u.shape
    nb = n // QK
    ub = u.reshape(out, nb, QK).numpy()
    parts = [d.contiguous().numpy().view(np.uint8).reshape(out, nb, 2)]
    if qtype == T.Q4_1:
        assert m is not None
        parts.append(m.contiguous().numpy().view(np.uint8).reshape(out, nb, 2))
    if qtype in (T.Q4_0, T.Q4_1):  # byte j holds weights j (low nibble) and j + 16 (high nibble)
        parts.append(ub[..., : QK // 2] | (ub[..., QK // 2 :] << 4))
    else:
        parts.append(ub)
    return np.concatenate(parts, axis=-1).reshape(out, -1)


def llama_permute(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row permutation (HF rotate-half -> interleaved RoPE) on a tensor whose rows are outputs."""
    return t.reshape(n_head, 2, t.shape[0] // n_head // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


# ---- metadata ------------------------------------------------------------------------------------
def _rope_theta(cfg) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    kind = params.get("rope_type", "default")
    if kind != "default" or getattr(cfg, "rope_scaling", None) not in (None, {}, params):
        raise UserError(f"gguf export: rope type '{kind}' is not supported (only plain RoPE)")
    return float(params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


def add_hparams(w: gguf.GGUFWriter, cfg) -> None:
    """The llama/qwen2 hyperparameters llama.cpp's converter writes (TextModel + LlamaModel.set_gguf_parameters)."""
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise UserError(f"gguf export: activation '{cfg.hidden_act}' is not supported ({cfg.model_type} in llama.cpp is SiLU)")
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(getattr(cfg, "num_key_value_heads", None) or heads)
    w.add_rope_freq_base(_rope_theta(cfg))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if head_dim != cfg.hidden_size // heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if cfg.model_type == "llama":
        w.add_vocab_size(cfg.vocab_size)
        w.add_rope_dimension_count(head_dim)


# ---- tokenizer -----------------------------------------------------------------------------------
def _source_gguf(loaded) -> Path | None:
    """The GGUF file the model came from, if any (its tokenizer metadata is reused as is)."""
    from effspec.models import smollm2_gguf_path

    for spec in (loaded.spec, loaded.meta.get("source_model")):
        if spec == "smollm2-135m":
            return smollm2_gguf_path()
        if isinstance(spec, str) and spec.endswith(".gguf") and Path(spec).is_file():
            return Path(spec)
    return None


_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9  # GGUF metadata value types (gguf.GGUFValueType)


def read_metadata(path: Path, prefix: str) -> dict[str, tuple[object, int, int | None]]:
    """GGUF metadata keys starting with `prefix`: {key: (value, value type, array element type)}.

    A direct walk of the key/value section (GGUF v2/v3 layout): gguf-py's
    GGUFReader maps every string of a 49k-token vocabulary separately and
    takes ~40 s on smollm2's file; this takes a fraction of a second.
    """
    import mmap
    import struct

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF" or struct.unpack_from("<I", buf, 4)[0] not in (2, 3):
            raise UserError(f"{path}: not a GGUF v2/v3 file")
        n_kv = struct.unpack_from("<Q", buf, 16)[0]
        pos = 24

        def string() -> str:
            nonlocal pos
            n = struct.unpack_from("<Q", buf, pos)[0]
            pos += 8 + n
            return buf[pos - n:pos].decode("utf-8")

        def value(vtype: int) -> object:
            nonlocal pos
            if vtype == _STRING:
                return string()
            fmt = _SCALAR[vtype]
            pos += struct.calcsize(fmt)
            return struct.unpack_from(fmt, buf, pos - struct.calcsize(fmt))[0]

        found: dict[str, tuple[object, int, int | None]] = {}
        for _ in range(n_kv):
            key = string()
            vtype = struct.unpack_from("<I", buf, pos)[0]
            pos += 4
            if vtype == _ARRAY:
                sub, n = struct.unpack_from("<IQ", buf, pos)
                pos += 12
                found[key] = ([value(sub) for _ in range(n)], vtype, sub)
            else:
                found[key] = (value(vtype), vtype, None)
    return {k: v for k, v in found.items() if k.startswith(prefix)}


def copy_tokenizer(w: gguf.GGUFWriter, path: Path, n_vocab: int) -> bool:
    """Copy every `tokenizer.*` key of the GGUF at `path`, types kept; False if its vocabulary size differs."""
    keys = read_metadata(path, "tokenizer.")
    tokens = keys.get(gguf.Keys.Tokenizer.LIST)
    if tokens is None or len(tokens[0]) != n_vocab:  # type: ignore[arg-type]
        return False
    for key, (val, vtype, sub) in keys.items():
        w.add_key_value(key, val, gguf.GGUFValueType(vtype), None if sub is None else gguf.GGUFValueType(sub))
    return True


def write_hf_tokenizer(w: gguf.GGUFWriter, tokenizer, n_vocab: int) -> None:
    """A byte-level BPE tokenizer the way convert_hf_to_gguf's `_set_vocab_gpt2` writes it."""
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= n_vocab:
        raise UserError(f"gguf export: the tokenizer has ids up to {max(vocab.values())} but the model only {n_vocab} embeddings")
    with tempfile.TemporaryDirectory() as tmp:  # gguf-py's SpecialVocab reads a saved tokenizer directory
        tokenizer.save_pretrained(tmp)
        tj = json.loads((Path(tmp) / "tokenizer.json").read_text()) if (Path(tmp) / "tokenizer.json").is_file() else {}
        if tj.get("model", {}).get("type") != "BPE":
            raise UserError("gguf export: only byte-level BPE (gpt2-style tokenizer.json) tokenizers are supported")
        has_merges = bool(tj["model"].get("merges"))
        special = gguf.SpecialVocab(tmp, load_merges=has_merges, n_vocab=n_vocab)
    by_id = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    pre = tj.get("pre_tokenizer") or {}
    gpt2_split = pre.get("type") == "ByteLevel" and (pre.get("use_regex", True) or not special.merges)
    if not gpt2_split:
        log.warning("gguf export: unknown pre-tokenizer %s; llama.cpp will split text with its 'default' rules",
                    pre.get("type"))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2" if gpt2_split else "default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    special.add_to_gguf(w, quiet=True)
    if not special.merges:  # llama.cpp requires the key; gguf-py's writer refuses empty arrays
        w.add_key_value(gguf.Keys.Tokenizer.MERGES, [], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING)


class _Writer(gguf.GGUFWriter):
    """GGUFWriter that can also write an empty array (valid GGUF; llama.cpp reads it as zero merges)."""

    def _pack_val(self, val, vtype, add_vtype, sub_type=None):
        if vtype == gguf.GGUFValueType.ARRAY and sub_type is not None and len(val) == 0:
            return (self._pack("I", vtype) if add_vtype else b"") + self._pack("I", sub_type) + self._pack("Q", 0)
        return super()._pack_val(val, vtype, add_vtype, sub_type)


# ---- tensors -------------------------------------------------------------------------------------
def _float_tensor(data: torch.Tensor, qtype: T) -> tuple[np.ndarray, T]:
    """A float tensor in `qtype` via gguf.quants or effspec.export.kquants (1-D: float32; rows that are not whole
    K-quant super-blocks: llama.cpp's fallback type; rows not a multiple of 32: float16)."""
    arr = data.detach().float().contiguous().numpy()
    if arr.ndim == 1 or qtype == T.F32:
        return arr, T.F32
    if qtype == T.F16:
        return arr.astype(np.float16), T.F16
    if qtype in kquants.ENCODERS:
        try:
            return kquants.quantize(arr, qtype), qtype
        except ValueError:
            log.debug("gguf export: row length %d is not a multiple of %d; writing %s instead of %s", arr.shape[-1],
                     kquants.QK_K, kquants.FALLBACK[qtype].name, qtype.name)
            qtype = kquants.FALLBACK[qtype]
    try:
        return gguf.quants.quantize(arr, qtype), qtype
    except (gguf.quants.QuantError, ValueError):
        log.info("gguf export: row length %d is not a multiple of %s's block; writing f16", arr.shape[-1], qtype.name)
        return arr.astype(np.float16), T.F16


class TensorNames:
    """llama.cpp's name for a transformers tensor, and the row order it stores q/k projections in."""

    def __init__(self, cfg):
        self.cfg, self.arch = cfg, ARCHS[cfg.model_type]
        self.names = gguf.get_tensor_name_map(self.arch, cfg.num_hidden_layers)
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads

    def name(self, hf: str) -> str:
        name = self.names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"gguf export: tensor '{hf}' has no llama.cpp name for {self.cfg.model_type}")
        return name

    def permute(self, hf: str, t: torch.Tensor) -> torch.Tensor:
        if self.cfg.model_type != "llama":
            return t
        if ".q_proj." in hf:
            return llama_permute(t, self.heads)
        if ".k_proj." in hf:
            return llama_permute(t, self.kv_heads)
        return t


def check_arch(cfg) -> None:
    if cfg.model_type not in ARCHS:
        raise UserError(f"gguf export: architecture '{cfg.model_type}' is not supported (supported: {', '.join(ARCHS)})")


def write_file(w: gguf.GGUFWriter, out: Path) -> None:
    """Write `w` to `out` through a temporary file in the same directory, renamed when complete."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file_beside(out)
    os.close(fd)
    try:
        w.write_header_to_file(Path(tmp))
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_gguf_adapter(model: nn.Module, layers: dict, out: Path) -> int:
    """llama.cpp's LoRA adapter GGUF for `layers` (see `effspec.export.adapter`); its bytes."""
    from effspec.export.adapter import add_gguf_adapter

    check_arch(model.config)
    names = TensorNames(model.config)
    w = _Writer(path=None, arch=gguf.MODEL_ARCH_NAMES[names.arch])
    add_gguf_adapter(w, layers, names.name, names.permute)
    w.add_uint32(MARKER_KEY, 1)
    write_file(w, out)
    return Path(out).stat().st_size


def write_gguf(loaded, out: Path, float_type: str = DEFAULT_FLOAT_TYPE, adapter: dict | None = None) -> ExportReport:
    """Write `loaded.model` to the GGUF file `out` (through a temporary file renamed when complete);
    `adapter`: LoRA layers by name, written beside it as llama.cpp's LoRA GGUF (`effspec.export.adapter`)."""
    model, cfg = loaded.model, loaded.model.config
    if float_type not in FLOAT_TYPES:
        raise UserError(f"--type {float_type}: expected one of {', '.join(FLOAT_TYPES)}")
    check_arch(cfg)
    names = TensorNames(cfg)
    qfloat = FLOAT_TYPES[float_type]
    w = _Writer(path=None, arch=gguf.MODEL_ARCH_NAMES[names.arch])
    add_hparams(w, cfg)
    gguf_name, permute = names.name, names.permute

    report = ExportReport("gguf", str(out))
    packed, other = split_layers(model)
    types: Counter = Counter()
    weight_types: Counter = Counter()
    for hf, t in float_state(model, {**packed, **other}).items():
        arr, qtype = _float_tensor(permute(hf, t), qfloat)
        w.add_tensor(gguf_name(hf), arr, raw_dtype=qtype if arr.dtype == np.uint8 else None)
        types[qtype.name] += 1
        if t.ndim == 2:
            weight_types[qtype] += 1
            if qtype != T.F32:
                report.converted[hf] = qtype.name
    for name, layer in {**packed, **other}.items():
        hf = f"{name}.weight"
        form = exact_form(layer)
        if form is not None:
            qtype, u, d, m = form
            u, d = permute(hf, u), permute(hf, d)
            m = permute(hf, m) if m is not None else None
            arr = ggml_blocks(qtype, u, d, m)
            report.exact.append(name)
        else:  # no GGML type holds this grid or format: requantize its float weight
            arr, qtype = _float_tensor(permute(hf, layer.weight), qfloat)
            report.converted[name] = qtype.name
            log.warning("gguf export: %s (%s) has no exact GGML type; requantized to %s", name,
                        layer.extra_repr() if name in packed else layer.kind, qtype.name)
        w.add_tensor(gguf_name(hf), arr, raw_dtype=qtype if arr.dtype == np.uint8 else None)
        types[qtype.name] += 1
        weight_types[qtype] += 1
    for name, layer in {**packed, **other}.items():
        if getattr(layer, "bias", None) is not None:
            w.add_tensor(gguf_name(f"{name}.bias"), permute(f"{name}.bias", layer.bias.detach().float()).numpy())
            types["F32"] += 1
    report.tensor_types = dict(types)

    w.add_name(Path(str(loaded.spec)).name or cfg.model_type)
    w.add_file_type(FILE_TYPES[weight_types.most_common(1)[0][0]] if weight_types else gguf.LlamaFileType.ALL_F32)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_uint32(MARKER_KEY, 1)
    w.add_string("effspec.source_model", str(loaded.spec))
    source = _source_gguf(loaded)
    if source is None or not copy_tokenizer(w, source, cfg.vocab_size):
        write_hf_tokenizer(w, loaded.tokenizer, cfg.vocab_size)

    out = Path(out)
    write_file(w, out)
    report.bytes = out.stat().st_size
    if adapter:
        from effspec.export.adapter import gguf_adapter_path

        try:
            report.bytes += write_gguf_adapter(model, adapter, gguf_adapter_path(out))
        except BaseException:
            out.unlink(missing_ok=True)  # the base alone is not the model
            raise
        report.adapter = str(gguf_adapter_path(out))
    converted = Counter(report.converted.values())
    log.info("gguf: %d packed layers exact, %d tensors converted (%s), %s", len(report.exact), len(report.converted),
             ", ".join(f"{n} {t.lower()}" for t, n in converted.most_common()) or float_type, out)
    return report
