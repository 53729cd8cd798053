"""One setting of bench/quantize.py through llm-compressor, run inside its own venv (bench/.venv-llmc).

Not importable from effspec's environment (llm-compressor pins another
transformers): bench/quantize.py writes a JSON spec and runs

    bench/.venv-llmc/bin/python bench/llmc_worker.py SPEC.json

once per setting, in a fresh process, so the peak resident set and the times
are that setting's alone. The worker

1. loads effspec's cached float32 directory of the model (`model_dir`) with
   transformers, float32;
2. runs `oneshot` with the setting's modifiers (`modifiers`: [class name,
   keyword arguments] in order) on the calibration token ids of the shared
   tokens file, given as a dataset of `input_ids` (no re-tokenization, no
   shuffling) — timed alone, and the process's peak RSS (VmHWM) read right after
   (on a machine without an accelerator, one page-locking call of its AWQ that
   raises there is made a no-op first: `allow_cpu_only`);
3. scores the model oneshot returned, in memory: perplexity on the same eval
   windows with the rule of effspec.measure.perplexity (batch 1, NLL of every
   predicted token, summed in float64). This is the algorithm's result even
   where its checkpoint does not reload faithfully (measured here: SpinQuant's
   rotated checkpoints reload broken in transformers 5.17);
4. saves it compressed (`save_compressed=True`), counts the bytes of the
   tensors its safetensors files hold, and loads that checkpoint back the way a
   user would (`AutoModelForCausalLM.from_pretrained`);
5. on the reloaded model: the first window's perplexity again
   (`first_window_ppl_reloaded` against `first_window_ppl_in_memory`: does the
   checkpoint reload to what oneshot produced?), then decode speed as
   effspec.measure.speed does it (128-token prompt, greedy, DynamicCache, one
   warm-up, median of `runs`) — the speed of the artifact a user deploys;
   with `"prefill": true` in the spec (both benches ask), also prefill tokens/s
   of the tokens file's `prefill` window, as effspec.measure.speed times it.

It writes `out` (JSON). An exception is caught and written as {"error": ...}
with its last line, so the caller can print llm-compressor's own message.
"""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import statistics
import struct
import sys
import time
import traceback
from pathlib import Path


def vm_hwm() -> int:
    """Peak resident set of this process so far (bytes), from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def safetensors_bytes(directory: Path) -> tuple[int, int]:
    """(bytes of tensor data, number of tensors) over every *.safetensors file, from the files' headers."""
    total = count = 0
    for path in sorted(directory.glob("*.safetensors")):
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for key, info in header.items():
            if key != "__metadata__":
                start, end = info["data_offsets"]
                total += end - start
                count += 1
    return total, count


def build_modifiers(spec: list) -> list:
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform import AWQModifier, SmoothQuantModifier, SpinQuantModifier

    known = {c.__name__: c for c in (GPTQModifier, QuantizationModifier, AWQModifier, SmoothQuantModifier,
                                     SpinQuantModifier, SparseGPTModifier, WandaPruningModifier)}
    return [known[name](**kwargs) for name, kwargs in spec]


def allow_cpu_only() -> str | None:
    """Work around llm-compressor 0.14 failing on a machine without an accelerator; what was changed, if anything.

    Its AWQ pins the cached block inputs in host memory before each grid search
    (`IntermediatesCache.pin_memory`), and `Tensor.pin_memory()` raises
    "Cannot access accelerator device when none is available" when there is none.
    Pinning only speeds host-to-device copies, which a CPU run never makes.
    """
    import torch

    if torch.accelerator.is_available():
        return None
    from llmcompressor.pipelines.cache import IntermediatesCache

    # deviation: a no-op in place of page-locking on a CPU-only machine; results are unchanged
    IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
    return "IntermediatesCache.pin_memory disabled (no accelerator: pinning raises; it only speeds host-to-device copies)"


def perplexity(model, windows) -> tuple[float, int, float]:
    """exp(mean next-token NLL) over (n, L) windows (the rule of effspec.measure.perplexity), tokens scored,
    and the first window's own perplexity."""
    import torch
    import torch.nn.functional as F

    nll = []
    with torch.inference_mode():
        for window in windows:
            logits = model(window[None], use_cache=False).logits[0, :-1].float()
            nll.append(F.cross_entropy(logits, window[1:], reduction="sum").double().item())
    per_window = windows.shape[1] - 1
    count = per_window * len(nll)
    return math.exp(sum(nll) / count), count, math.exp(nll[0] / per_window)


def greedy_decode(model, prompt, new_tokens: int) -> float:
    """Decode tokens/s of one greedy generation: prefill the prompt, then one token at a time (effspec.generate)."""
    import torch
    from transformers import DynamicCache

    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        logits = model(prompt[None], past_key_values=cache, use_cache=True).logits[:, -1]
        token = int(logits.argmax(-1))
        t0 = time.perf_counter()
        for _ in range(new_tokens - 1):
            logits = model(torch.tensor([[token]]), past_key_values=cache, use_cache=True).logits[:, -1]
            token = int(logits.argmax(-1))
        return (new_tokens - 1) / (time.perf_counter() - t0)


def prefill_speed(model, window, runs: int) -> tuple[float, list[float]]:
    """Median prefill tokens/s of one (L,) window and the runs: one forward without a cache, logits of the last
    position only, after a short warm-up (the rule of effspec.measure.speed)."""
    import torch

    with torch.inference_mode():
        model(window[None, :16], use_cache=False)  # warm-up
        rates = []
        for _ in range(runs):
            t0 = time.perf_counter()
            model(window[None], use_cache=False, logits_to_keep=1)
            rates.append(window.numel() / (time.perf_counter() - t0))
    return statistics.median(rates), rates


def run(spec: dict) -> dict:
    t_start = time.perf_counter()
    import torch

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.set_verbosity_error()
    tokens = torch.load(spec["tokens"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    model.eval()
    seen: set[int] = set()
    model_bytes = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            model_bytes += t.numel() * t.element_size()
    out: dict = {"model_bytes": model_bytes, "load_seconds": time.perf_counter() - t_start}

    import llmcompressor

    out["versions"] = {"llmcompressor": llmcompressor.__version__, "transformers": transformers.__version__,
                       "torch": torch.__version__}
    if spec["modifiers"]:
        from datasets import Dataset
        from llmcompressor import oneshot

        calib = tokens["calib"]
        dataset = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
        recipe = build_modifiers(spec["modifiers"])
        if (patch := allow_cpu_only()) is not None:
            out["workaround"] = patch
        t0 = time.perf_counter()
        model = oneshot(model=model, dataset=dataset, recipe=recipe, num_calibration_samples=calib.shape[0],
                        max_seq_length=calib.shape[1], shuffle_calibration_samples=False)
        out["compress_seconds"] = time.perf_counter() - t0
    else:
        out["compress_seconds"] = 0.0
    out["peak_rss_bytes"] = vm_hwm()

    t0 = time.perf_counter()
    out["perplexity"], out["eval_tokens"], out["first_window_ppl_in_memory"] = perplexity(model, tokens["windows"])
    out["eval_seconds"] = time.perf_counter() - t0
    save_dir = Path(spec["save_dir"])
    shutil.rmtree(save_dir, ignore_errors=True)
    t0 = time.perf_counter()
    model.save_pretrained(save_dir, save_compressed=True)
    out["save_seconds"] = time.perf_counter() - t0
    out["stored_bytes"], out["stored_tensors"] = safetensors_bytes(save_dir)
    del model
    gc.collect()
    model = AutoModelForCausalLM.from_pretrained(save_dir, dtype=torch.float32)
    model.eval()
    if not spec.get("keep_checkpoint"):
        shutil.rmtree(save_dir, ignore_errors=True)

    out["first_window_ppl_reloaded"] = perplexity(model, tokens["windows"][:1])[0]
    greedy_decode(model, tokens["prompt"], spec["new_tokens"])  # warm-up
    runs = [greedy_decode(model, tokens["prompt"], spec["new_tokens"]) for _ in range(spec["runs"])]
    out.update(decode_tokens_per_s=statistics.median(runs), decode_runs=runs, threads=torch.get_num_threads(),
               peak_rss_end_bytes=vm_hwm(), worker_seconds=time.perf_counter() - t_start)
    if spec.get("prefill"):  # asked for by bench/quantize.py and bench/prune.py
        out["prefill_tokens_per_s"], out["prefill_runs"] = prefill_speed(model, tokens["prefill"], spec["runs"])
        out["prefill_tokens"] = int(tokens["prefill"].numel())
        out["worker_seconds"] = time.perf_counter() - t_start
    return out


def main() -> int:
    spec_path = Path(sys.argv[1])
    spec = json.loads(spec_path.read_text())
    try:
        out = run(spec)
        code = 0
    except Exception as e:  # noqa: BLE001 -- reported to the caller verbatim, the run goes on with other settings
        traceback.print_exc()
        lines = [line for line in f"{type(e).__name__}: {e}".strip().splitlines() if line.strip()]
        out = {"error": " ".join(lines)[:600]}
        code = 1
    tmp = Path(spec["out"] + ".tmp")
    tmp.write_text(json.dumps(out))
    os.replace(tmp, spec["out"])
    return code


if __name__ == "__main__":
    sys.exit(main())
