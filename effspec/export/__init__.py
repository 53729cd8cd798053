"""Exporters: write an effspec model in the formats deployment tools load, from the packed tensors themselves.

- `compressed_tensors.write_compressed_tensors`: a Hugging Face directory in
  the compressed-tensors layout (what llm-compressor writes; transformers and
  vLLM load it), packed layers as `pack-quantized` int32 words.
- `gguf.write_gguf`: one llama.cpp GGUF file; packed layers whose grid fits a
  GGML block type (Q4_0, Q4_1, Q8_0) are written block for block from their
  codes and scales, everything else is quantized with `gguf.quants`.

Both read the same codes, scales and minimums `effspec.layers.QuantLinear`
stores (DESIGN.md: "let exporters read those same tensors"); neither rounds
a packed layer again where its format can hold it exactly, and each says
which layers it had to convert.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from effspec.errors import UserError

FORMATS = ("compressed-tensors", "gguf")
EXPORT_KIND = "export"  # the effspec.json marker kind of a compressed-tensors export directory


@dataclass
class ExportReport:
    """What an exporter wrote: the path, its bytes, and how each packed layer got there."""

    format: str
    out: str
    bytes: int = 0
    exact: list[str] = field(default_factory=list)  # packed layers written from their codes, bit-exact
    converted: dict[str, str] = field(default_factory=dict)  # tensor -> what it was (re)quantized to
    dense: list[str] = field(default_factory=list)  # float linear layers written unquantized
    tensor_types: dict[str, int] = field(default_factory=dict)  # storage type -> number of tensors
    adapter: str | None = None  # the LoRA adapter written beside the base, if the model keeps one
    adapter_layers: int = 0

    def record(self) -> dict:
        return {"format": self.format, "out": self.out, "bytes": self.bytes, "exact_layers": len(self.exact),
                "converted_tensors": len(self.converted), "converted": self.converted,
                "dense_layers": len(self.dense), "tensor_types": self.tensor_types,
                "adapter": self.adapter, "adapter_layers": self.adapter_layers}


def split_layers(model: nn.Module) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
    """(QuantLinear layers, other packed layers) by name; the others are exported through their float `weight`.

    Modules that wrap another and change what it computes (online rotations)
    have no form in either format, so they are refused.
    """
    from effspec.layers import QuantLinear

    grid: dict[str, nn.Module] = {}
    other: dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        if hasattr(m, "manifest") and hasattr(m, "wrap"):
            kind = m.manifest().get("kind", type(m).__name__)
            raise UserError(f"{name}: wrapped by '{kind}', which neither compressed-tensors nor GGUF can express; "
                            f"export a model without that step")
        if isinstance(m, QuantLinear):  # sparse-quant too: exported as its dense codes
            grid[name] = m
        elif hasattr(m, "manifest") and hasattr(m, "kind"):
            if not isinstance(getattr(m, "weight", None), torch.Tensor):
                raise UserError(f"{name}: packed layer kind '{m.kind}' has no float weight to export")
            other[name] = m
    return grid, other


def float_state(model: nn.Module, skip_modules) -> dict[str, torch.Tensor]:
    """Persistent tensors outside `skip_modules`, tied copies (same storage) kept once, first name wins."""
    state, seen = {}, set()
    prefixes = tuple(f"{name}." for name in skip_modules)
    for key, t in model.state_dict().items():
        if key.startswith(prefixes):
            continue
        ptr = t.data_ptr()
        if t.numel() and ptr in seen:
            continue
        seen.add(ptr)
        state[key] = t
    return state


def check_request(fmt: str, out: Path, gguf_type: str | None = None, force: bool = False,
                  adapter: bool = False) -> None:
    """Refuse a bad format/type or an output path that is not effspec's to replace (before any work is done)."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    out = Path(out)
    if fmt == "compressed-tensors":
        if gguf_type is not None:
            raise UserError("--type applies to --format gguf only (compressed-tensors keeps each layer's own grid)")
        from effspec.fsutil import check_output_dir

        check_output_dir(out, force, kind=EXPORT_KIND)
        return
    from effspec.export.gguf import FLOAT_TYPES

    if gguf_type is not None and gguf_type not in FLOAT_TYPES:
        raise UserError(f"--type {gguf_type}: expected one of {', '.join(FLOAT_TYPES)}")
    if out.suffix != ".gguf":
        raise UserError(f"--out {out}: a GGUF output is one file whose name ends in .gguf")
    check_gguf_file(out, force)
    if adapter:
        from effspec.export.adapter import gguf_adapter_path

        check_gguf_file(gguf_adapter_path(out), force)


def check_gguf_file(out: Path, force: bool) -> None:
    """Refuse to replace a file unless it is effspec's own GGUF and `force` is given."""
    from effspec.export.gguf import MARKER_KEY, read_metadata

    if not out.exists():
        return
    if not out.is_file():
        raise UserError(f"{out}: exists and is not a file; choose another --out")
    if not force:
        raise UserError(f"{out}: already exists; pass --force to replace it or choose another --out")
    try:
        ours = MARKER_KEY in read_metadata(out, "effspec.")
    except Exception:  # not a readable GGUF at all (empty, truncated, another format)
        ours = False
    if not ours:
        raise UserError(f"{out}: exists and was not written by effspec export; choose another --out")


def export(loaded, fmt: str, out: Path, gguf_type: str | None = None, force: bool = False) -> ExportReport:
    """Write `loaded` (an effspec LoadedModel) to `out` in format `fmt`, replacing only effspec's own output.

    LoRA adapters kept beside a packed base (QLoRA) are written as the adapter files the
    serving tools load over the base (`effspec.export.adapter`), the base without them.
    """
    from effspec.export.adapter import base_only, lora_layers, rank_and_alpha

    layers = lora_layers(loaded.model)
    check_request(fmt, out, gguf_type, force, adapter=bool(layers))
    if layers:
        rank_and_alpha(layers)  # one rank and scaling, or a clear error before any work
    out = Path(out)
    with base_only(loaded.model, layers):
        if fmt == "compressed-tensors":
            from effspec.export.compressed_tensors import write_compressed_tensors

            report = write_compressed_tensors(loaded, out, adapter=layers)
        else:
            from effspec.export.gguf import DEFAULT_FLOAT_TYPE, write_gguf

            report = write_gguf(loaded, out, gguf_type or DEFAULT_FLOAT_TYPE, adapter=layers)
    report.adapter_layers = len(layers)
    return report
