"""effspec's GGUF exports run in llama.cpp: its next-token distributions against effspec's own, setting by setting.

An export is only as good as what the serving tool computes from it. For each
setting this script builds the model in effspec (smollm2-135m, float32
activations), exports it with `effspec export --format gguf --type f32`
(packed layers as their exact GGML blocks, every other tensor as it is), loads
the file in llama.cpp (node-llama-cpp's prebuilt CPU binaries, as
bench/quantize.py's llama.cpp row; installed into `--llamacpp-dir` on first use)
and scores the same `--tokens` WikiText-2 test tokens on both sides, teacher
forced. llama.cpp returns, per position, its top-`--top` raw logits and the sum
of exp(logit - max) over the whole vocabulary, hence exact log-probabilities of
those tokens. Printed per setting:

- top-1 agreement: llama.cpp's argmax equals effspec's;
- top-k KL: sum over llama.cpp's top-k tokens of p_llama (log p_llama - log
  p_effspec), the KL divergence restricted to the tokens that carry nearly all
  of the mass (`mass` says how much);
- max |d log p| of llama.cpp's top-1 token;
- for scale, the same figures between effspec's float model and the setting
  (what the quantization itself changes).

Settings: `float` (f32 throughout), `rtn-w4-g32` (symmetric: Q4_0 blocks),
`rtn-w4-g32-asym` (Q4_1), `rtn-w8-g32` (Q8_0), `qlora-w4-g32` (rtn-w4-g32 with
random rank-16 LoRA adapters on every projection of every block, kept beside
the packed base as QLoRA leaves them: exported as `model.lora.gguf`, which
llama.cpp applies with `--lora`; also scored without the adapter, to show it
is applied), `float-q4_k` and `float-q6_k` (the float model exported with
`--type q4_k` / `q6_k`: the K-quant blocks effspec.export.kquants encodes,
with llama.cpp's fallback types on rows that are not a multiple of 256) and
`float-q8_0` (`--type q8_0`, gguf-py's own encoder: the control for those two).
For these three the effspec side is the file read back by transformers' GGUF
loader, i.e. gguf-py's decoding of the same bytes. llama.cpp's Q4/Q8 matmuls
round the activations to 8 bits (per 256 columns against Q4_K and Q6_K), so
packed settings cannot agree to float precision; the float row shows the
floor of the comparison itself.

    python bench/llamacpp_export.py                 # all settings, 256 tokens, 2 threads
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

from quantize import DEFAULT_LLAMACPP_DIR, ensure_llamacpp, run_worker

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "wikitext-2-raw"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "llamacpp_export.json"
MODEL = "smollm2-135m"
SETTINGS = {  # name -> (rtn fields or None, LoRA adapters or not, --type of the export)
    "float": (None, False, "f32"),
    "rtn-w4-g32": ({"bits": 4, "group_size": 32, "symmetric": True}, False, "f32"),
    "rtn-w4-g32-asym": ({"bits": 4, "group_size": 32, "symmetric": False}, False, "f32"),
    "rtn-w8-g32": ({"bits": 8, "group_size": 32, "symmetric": True}, False, "f32"),
    "qlora-w4-g32": ({"bits": 4, "group_size": 32, "symmetric": True}, True, "f32"),
    "float-q4_k": (None, False, "q4_k"),
    "float-q6_k": (None, False, "q6_k"),
    "float-q8_0": (None, False, "q8_0"),  # the control for the two above: gguf-py's own encoder, the same reading
}
LORA_RANK, LORA_SCALING, LORA_STD = 16, 2.0, 0.04

log = logging.getLogger("bench.llamacpp_export")

LLAMACPP_SCORE_JS = r"""
import {createRequire} from "module";
import {readFileSync, writeFileSync} from "fs";
const spec = JSON.parse(readFileSync(process.argv[2], "utf8"));
const require = createRequire(spec.prefix + "/");
const {getLlama} = await import(require.resolve("node-llama-cpp"));
const llama = await getLlama({gpu: false, build: "never", logLevel: "error", maxThreads: spec.threads});
const model = await llama.loadModel({modelPath: spec.gguf});
const options = {contextSize: spec.tokens.length + 16, threads: spec.threads, batchSize: spec.tokens.length};
if (spec.lora) options.lora = {adapters: [{filePath: spec.lora, scale: 1}]};
const context = await model.createContext(options);
const sequence = context.getSequence();
const next = {logits: {filter: {tokens: [], includeTop: spec.top}}, totalLogitWeight: true};
const results = await sequence.controlledEvaluate(spec.tokens.map((t) => [t, {generateNext: next}]));
const rows = results.map((r) => ({ids: [...r.next.logits.keys()], logits: [...r.next.logits.values()],
                                  total: r.next.totalLogitWeight}));
writeFileSync(spec.out, JSON.stringify({rows, threads: spec.threads, build: llama.buildType,
  "llama.cpp": llama.llamaCppRelease?.release}));
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated subset of {', '.join(SETTINGS)}")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="WikiText-2 raw directory (wiki.test.raw)")
    p.add_argument("--tokens", type=int, default=256, help="scored tokens (default 256)")
    p.add_argument("--top", type=int, default=64, help="llama.cpp's top logits per position (default 64)")
    p.add_argument("--threads", type=int, default=2, help="threads on both sides (default 2)")
    p.add_argument("--llamacpp-dir", type=Path, default=DEFAULT_LLAMACPP_DIR, help="node-llama-cpp's npm prefix")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON rows (default bench/results/llamacpp_export.json)")
    args = p.parse_args(argv)
    args.settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in args.settings if s not in SETTINGS]
    if unknown:
        p.error(f"unknown setting(s) {', '.join(unknown)}; choose from {', '.join(SETTINGS)}")
    if args.tokens < 2 or args.top < 1:
        p.error("--tokens must be at least 2 and --top at least 1")
    return args


def build(name: str):
    """The setting's effspec model (a LoadedModel)."""
    import torch

    from effspec.models import load_model
    from effspec.registry import get_step
    from effspec.steps.tune.lora import LoRALinear
    from effspec.surgery import replace_module

    grid, lora, _ = SETTINGS[name]
    loaded = load_model(MODEL)
    if grid is not None:
        rtn = get_step("rtn")
        rtn.apply(loaded.model, rtn.config(**grid))
    if lora:  # random adapters, large enough to move the distributions visibly
        g = torch.Generator().manual_seed(0)
        for layer_name, m in list(loaded.model.model.layers.named_modules(prefix="model.layers")):
            if layer_name.endswith("_proj") and hasattr(m, "in_features"):
                wrapped = LoRALinear(m, LORA_RANK, LORA_SCALING)
                with torch.no_grad():
                    wrapped.lora_A.copy_(torch.randn(wrapped.lora_A.shape, generator=g) * LORA_STD)
                    wrapped.lora_B.copy_(torch.randn(wrapped.lora_B.shape, generator=g) * LORA_STD)
                replace_module(loaded.model, layer_name, wrapped)
    return loaded


def log_probs(model, ids):
    """effspec's exact next-token log-probabilities: packed layers dequantized, float32 activations."""
    import torch

    from effspec.layers import kernels

    with torch.no_grad(), kernels(False):
        return torch.log_softmax(model(ids[None]).logits[0].float(), dim=-1)


def compare(reference, rows: list[dict]) -> dict:
    """Figures of llama.cpp's rows (top logits + normalizer per position) against `reference` log-probs (L, V)."""
    import torch

    agree, kl, mass, top1 = 0, [], [], []
    for pos, r in enumerate(rows):
        ids = torch.tensor(r["ids"])
        logits = torch.tensor(r["logits"], dtype=torch.float64)
        lp = logits - logits.max() - torch.log(torch.tensor(r["total"], dtype=torch.float64))  # exact log p, top tokens
        ref = reference[pos, ids].double()
        agree += int(ids[0]) == int(reference[pos].argmax())
        kl.append(float((lp.exp() * (lp - ref)).sum()))
        mass.append(float(lp.exp().sum()))
        top1.append(abs(float(lp[0] - ref[0])))
    n = len(rows)
    return {"top1_agreement": agree / n, "topk_kl_mean": sum(kl) / n, "topk_kl_max": max(kl),
            "topk_mass_mean": sum(mass) / n, "top1_logp_absdiff_max": max(top1)}


def internal(reference, other) -> dict:
    """The same figures between two effspec log-prob tables (full KL, not restricted)."""
    kl = (reference.exp() * (reference - other)).sum(-1)
    return {"top1_agreement": float((reference.argmax(-1) == other.argmax(-1)).float().mean()),
            "kl_mean": float(kl.mean()), "kl_max": float(kl.max())}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    import torch

    from effspec.export import export
    from effspec.export.adapter import gguf_adapter_path
    from effspec.models import load_model

    torch.set_num_threads(args.threads)
    prefix = ensure_llamacpp(args.llamacpp_dir.resolve())
    float_model = load_model(MODEL)
    text = (args.data / "wiki.test.raw").read_text(encoding="utf-8")
    ids = float_model.tokenizer(text[:20000], return_tensors="pt")["input_ids"][0][: args.tokens]
    if len(ids) < args.tokens:
        raise SystemExit(f"only {len(ids)} tokens in the first 20,000 characters of {args.data / 'wiki.test.raw'}")
    float_lp = log_probs(float_model.model, ids)
    del float_model
    rows, t_start = [], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="effspec-llamacpp-export-") as tmp:
        work = Path(tmp)
        script = work / "score.mjs"
        script.write_text(LLAMACPP_SCORE_JS)
        for name in args.settings:
            log.info("%s: building, exporting, scoring", name)
            loaded = build(name)
            ours = log_probs(loaded.model, ids)
            gguf_path = work / f"{name}.gguf"
            gguf_type = SETTINGS[name][2]
            report = export(loaded, "gguf", gguf_path, gguf_type)
            if gguf_type != "f32":  # requantized: effspec's side is the file as transformers (gguf-py) reads it
                import transformers

                back = transformers.AutoModelForCausalLM.from_pretrained(str(work), gguf_file=gguf_path.name,
                                                                         dtype=torch.float32)
                ours = log_probs(back, ids)
                del back
            row = {"setting": name, "gguf_bytes": report.bytes, "exact_layers": len(report.exact),
                   "tensor_types": report.tensor_types, "adapter_layers": report.adapter_layers,
                   "effspec_vs_float": internal(float_lp, ours)}
            spec = {"prefix": str(prefix), "gguf": str(gguf_path), "tokens": ids.tolist(), "top": args.top,
                    "threads": args.threads, "lora": str(gguf_adapter_path(gguf_path)) if report.adapter else None}
            result = run_worker(["node", str(script)], spec, work, name, args.threads, work)
            if "error" in result:
                row["error"] = result["error"]
            else:
                row["llamacpp_vs_effspec"] = compare(ours, result["rows"])
                row["llamacpp_build"], row["llamacpp_release"] = result.get("build"), result.get("llama.cpp")
            if report.adapter and "error" not in result:  # the base alone: the adapter must matter
                base = run_worker(["node", str(script)], {**spec, "lora": None}, work, f"{name}-base", args.threads, work)
                if "error" not in base:
                    row["llamacpp_base_only_vs_effspec"] = compare(ours, base["rows"])
            rows.append(row)
            Path(gguf_path).unlink(missing_ok=True)
            gguf_adapter_path(gguf_path).unlink(missing_ok=True)
    out = {"benchmark": "llamacpp_export", "model": MODEL, "tokens": args.tokens, "top": args.top,
           "threads": args.threads, "seconds": time.perf_counter() - t_start, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(table(rows, args))
    return 0


def table(rows: list[dict], args) -> str:
    lines = [f"llama.cpp against effspec on {args.tokens} WikiText-2 test tokens of {MODEL} (top-{args.top} logits, "
             f"{args.threads} threads)", "",
             f"{'setting':<26} {'exact':>5} {'top-1 agree':>11} {'top-k KL':>10} {'KL max':>9} {'mass':>6} "
             f"{'|dlogp| max':>11} | {'effspec vs float: top-1':>23} {'KL':>8}"]
    for r in rows:
        e = r["effspec_vs_float"]
        if "error" in r:
            lines.append(f"{r['setting']:<26} error: {r['error']}")
            continue
        for label, key in (("", "llamacpp_vs_effspec"), (" (base only)", "llamacpp_base_only_vs_effspec")):
            if key not in r:
                continue
            c = r[key]
            tail = f" | {e['top1_agreement']:>23.4f} {e['kl_mean']:>8.5f}" if not label else ""
            lines.append(f"{(r['setting'] + label):<26} {r['exact_layers']:>5} {c['top1_agreement']:>11.4f} "
                         f"{c['topk_kl_mean']:>10.6f} {c['topk_kl_max']:>9.5f} {c['topk_mass_mean']:>6.3f} "
                         f"{c['top1_logp_absdiff_max']:>11.4f}{tail}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
