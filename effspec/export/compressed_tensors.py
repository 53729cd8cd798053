"""Write an effspec model as a compressed-tensors checkpoint (the llm-compressor layout transformers and vLLM load).

compressed-tensors dequantizes a weight-only integer layer as

    W = (q' - z) * s,   q' in [-2^(b-1), 2^(b-1))  (signed codes),  z an integer zero point (0 if symmetric)

per group of `group_size` input columns (strategy "group") or per output row
(strategy "channel"), and stores the codes of every 1-8 bit weight-only layer
densely packed into int32 words (`pack-quantized`; `PackedQuantizationCompressor`,
which the package's own `infer_module_format` picks for such a scheme, 8 bits
included -- the W8A16 layout vLLM runs; `int-quantized` is its W8A8 format).

Mapping our grid (effspec.quant, `w = q * scale + minimum`, q in [0, 2^b)):

- symmetric: minimum = -2^(b-1) * scale, so q' = q - 2^(b-1), s = scale, no
  zero point. Exact for 2, 3, 4 and 8 bits.
- asymmetric: q' = q - 2^(b-1) and z = -2^(b-1) - minimum / scale. The
  package packs z as a b-bit integer, but our minimum is a float (GGML Q4_1
  style), so z is an integer only by accident. Decision: export exactly when
  every group's z is an integer in range (checked on the dequantized weights,
  bit for bit); otherwise refuse with a one-line error naming the layer and how
  far rounding z would move its weights -- never a silent second rounding.
  `--format gguf` holds asymmetric 2-4 bit grids exactly (Q4_1). (Our min/max
  grid gives integer zero points only by construction, and transformers 5.23
  with compressed-tensors 0.20 cannot load any asymmetric pack-quantized
  checkpoint, llm-compressor's included: its meta-device layout expects the
  zero points unpacked. The files follow llm-compressor's layout, packed zero
  points, which is what vLLM reads.)
- W8A8 layers (`effspec.steps.quantize.w8a8`: int8 codes and a scale per
  output row, int8 activations per token at run time) are llm-compressor's W8A8
  scheme: `int-quantized` int8 weights, channel scales, dynamic per-token input
  activations. The weights are exact; the runtime's activation rounding is its
  own (compressed-tensors divides by 127.5, effspec by 127).
- float layers (e.g. the untied `lm_head`) and packed kinds the format has no
  scheme for (nf4, fp8, outlier W8A8) are written dense from their float
  weight and listed in the config's `ignore`, each one reported; a model with
  no such packed layer at all becomes a plain transformers checkpoint with no
  `quantization_config`.

Scales keep their stored values (float16 unless out of range); transformers
creates the scale parameters in the model's dtype and casts on load, so its
dequantized weights equal `QuantLinear.dequantized_weight()` bit for bit.
The codes go through the package's compressor (`compress` on the dequantized
weight with our scale and zero point, which reproduces our codes exactly since
w / s is an exact integer) and are checked against ours afterwards.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from effspec.errors import UserError
from effspec.export import EXPORT_KIND, ExportReport, float_state, split_layers
from effspec.fsutil import MARKER, atomic_dir
from effspec.layers import QuantLinear

log = logging.getLogger(__name__)

INSTALL = "pip install 'compressed-tensors>=0.20,<0.21'"  # the [export] extra; torch 2.13 already satisfies it


def _require_package():
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise UserError(f"--format compressed-tensors needs the compressed-tensors package: run `{INSTALL}`") from None


def signature(layer) -> tuple | None:
    """What compressed-tensors scheme holds this packed layer exactly, as a hashable key; None if none does."""
    if isinstance(layer, QuantLinear):  # sparse-quant too: written as its dense codes
        g = layer.grid
        return ("weight-only", g.bits, g.group_size, g.symmetric)
    codes, scales = getattr(layer, "qweight", None), getattr(layer, "scales", None)
    if getattr(layer, "kind", None) == "w8a8" and isinstance(codes, torch.Tensor) and codes.dtype == torch.int8 \
            and isinstance(scales, torch.Tensor) and scales.dim() == 1:
        return ("w8a8",)  # effspec.steps.quantize.w8a8: int8 codes per channel, int8 activations per token
    return None


def scheme_for(sig: tuple | None, targets: list[str]):
    """The compressed-tensors QuantizationScheme of a signature: weight-only integer grid, or llm-compressor's W8A8."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    assert sig is not None  # callers pass only layers with a signature
    if sig[0] == "w8a8":
        weights = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel")
        tokens = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
        return QuantizationScheme(targets=targets, weights=weights, input_activations=tokens)
    _, bits, group_size, symmetric = sig
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric,
                            strategy="group" if group_size else "channel", group_size=group_size or None)
    return QuantizationScheme(targets=targets, weights=args)


def zero_point(scale: torch.Tensor, minimum: torch.Tensor, bits: int, where: str) -> torch.Tensor:
    """Integer zero points z with (q' - z) s == q s + minimum exactly, or a UserError (see module docstring)."""
    half = 2 ** (bits - 1)
    z_float = -half - minimum.double() / scale.double()  # (out, groups)
    z = torch.round(z_float)
    in_range = bool(((z >= -half) & (z < half)).all())
    exact = in_range and bool((((-half - z) * scale.double()).float() == minimum).all())
    if not exact:
        shift = float(((z_float - z).abs() * scale.double()).max())
        raise UserError(f"{where}: asymmetric {bits}-bit grid has float minimums that compressed-tensors' integer "
                        f"zero points cannot hold (rounding them would move weights by up to {shift:.3g}); "
                        f"quantize with symmetric: true, or export --format gguf")
    return z.to(torch.int8)


def compress_layer(layer, scheme, fmt: str, where: str) -> dict[str, torch.Tensor]:
    """The layer's tensors as the package's compressor writes them (local names: weight_packed, ...).

    The compressor quantizes the dequantized weight with our scale (and zero
    point); w / s is an exact integer, so it re-derives our codes, which is
    checked against the stored ones.
    """
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    if isinstance(layer, QuantLinear):
        bits, s = layer.grid.bits, layer.scales.float()
        state = {"weight": layer.dequantized_weight(), "weight_scale": s}
        if not layer.grid.symmetric:
            state["weight_zero_point"] = zero_point(s, layer.mins.float(), bits, where)
        signed = layer.codes().to(torch.int16) - 2 ** (bits - 1)  # q' (out, in)
    else:  # W8A8: codes are already signed, one scale per output row
        bits, signed = 8, layer.qweight.to(torch.int16)
        state = {"weight": layer.weight.float(), "weight_scale": layer.scales.float()[:, None]}
    out = BaseCompressor.get_value_from_registry(fmt).compress(state, scheme)
    written = unpack_from_int32(out["weight_packed"], bits, signed.shape) if "weight_packed" in out else out["weight"]
    if not torch.equal(written.to(torch.int16), signed):  # the compressor must reproduce our codes
        raise RuntimeError(f"{where}: compressed-tensors re-derived different codes; export would not be exact")
    out["weight_scale"] = layer.scales.detach().clone().reshape(state["weight_scale"].shape)  # stored dtype
    if layer.bias is not None:
        out["bias"] = layer.bias.detach().float()
    return out


def fmt_name(scheme) -> str:
    return getattr(scheme.format, "value", scheme.format)


def quantization_config(packed: dict, dense: list[str]) -> tuple[object, dict[str, object], str]:
    """(QuantizationConfig, scheme per packed layer, format); `dense` linear layers go to `ignore`."""
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    by_sig: dict[tuple | None, list[str]] = {}
    for name, layer in packed.items():
        by_sig.setdefault(signature(layer), []).append(name)
    if len(by_sig) == 1:  # llm-compressor's usual form: every Linear, minus the dense ones
        (sig,) = by_sig
        groups = {"group_0": scheme_for(sig, ["Linear"])}
        per_layer = {name: groups["group_0"] for name in packed}
    else:  # mixed schemes: each group names its layers
        groups, per_layer = {}, {}
        for i, (sig, names) in enumerate(by_sig.items()):
            groups[f"group_{i}"] = scheme_for(sig, names)
            per_layer.update({n: groups[f"group_{i}"] for n in names})
    for s in groups.values():  # the package's choice: pack-quantized (weight-only 1-8 bits), int-quantized (W8A8)
        s.format = infer_module_format(nn.Linear, s)
    formats = {fmt_name(s) for s in groups.values()}
    fmt = formats.pop() if len(formats) == 1 else "mixed-precision"
    config = QuantizationConfig(config_groups=groups, format=fmt, ignore=dense,
                                quantization_status=QuantizationStatus.COMPRESSED)
    return config, per_layer, fmt


def write_compressed_tensors(loaded, out: Path, adapter: dict | None = None) -> ExportReport:
    """Write `loaded.model` into the directory `out` (built under a temporary name, renamed when complete);
    `adapter`: LoRA layers by name, written as a peft adapter in `out/lora` (`effspec.export.adapter`)."""
    from safetensors.torch import save_file

    model = loaded.model
    packed, other = split_layers(model)
    packed.update({n: m for n, m in other.items() if signature(m) is not None})
    other = {n: m for n, m in other.items() if n not in packed}
    report = ExportReport("compressed-tensors", str(out))
    state = {k: v.detach().contiguous() for k, v in float_state(model, {**packed, **other}).items()}
    for name, layer in other.items():  # no compressed-tensors form: their float weight, dense
        state[f"{name}.weight"] = layer.weight.detach().float().contiguous()
        if getattr(layer, "bias", None) is not None:
            state[f"{name}.bias"] = layer.bias.detach().float()
        report.converted[name] = f"dense (from {layer.kind})"
        log.warning("compressed-tensors export: %s (%s) has no compressed-tensors form; written dense", name, layer.kind)
    report.dense = [name for name, m in model.named_modules() if type(m) is nn.Linear] + list(other)
    config = None
    if packed:
        _require_package()
        config, per_layer, fmt = quantization_config(packed, report.dense)
        for name, layer in packed.items():
            scheme = per_layer[name]
            for key, t in compress_layer(layer, scheme, fmt_name(scheme), name).items():
                state[f"{name}.{key}"] = t.contiguous()
            report.exact.append(name)
        report.tensor_types = dict(Counter(fmt_name(per_layer[n]) for n in packed), dense=len(report.dense))
    else:
        log.info("no packed integer-grid layers: writing a dense transformers checkpoint")
        report.tensor_types = {"dense": len(report.dense)}
    with atomic_dir(out) as tmp:
        model.config.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if config is not None:
            from compressed_tensors.compressors import ModelCompressor

            ModelCompressor(quantization_config=config).update_config(str(tmp))  # the package writes config.json's block
        if adapter:
            from effspec.export.adapter import PEFT_DIR, write_peft_adapter

            write_peft_adapter(adapter, tmp / PEFT_DIR)
            report.adapter = str(Path(out) / PEFT_DIR)
        (tmp / MARKER).write_text(json.dumps({"kind": EXPORT_KIND, "format": "compressed-tensors",
                                              "source_model": loaded.spec, "exact_layers": report.exact}, indent=2))
    report.bytes = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file())
    log.info("compressed-tensors: %d packed layers exact, %d dense linear layers, %s", len(report.exact),
             len(report.dense), out)
    return report
