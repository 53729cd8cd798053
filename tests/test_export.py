"""Exporters: GGUF blocks written from the packed codes (bit-exact), compressed-tensors through its own package,
both loaded back by transformers with the logits of effspec's model; and the `effspec export` command."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

from effspec.cli import main
from effspec.errors import UserError
from effspec.export import export
from effspec.export.gguf import llama_permute, read_metadata, write_gguf
from effspec.fsutil import atomic_dir, current_umask
from effspec.layers import QuantLinear, kernels
from effspec.models import load_model, save_model
from effspec.registry import get_step

IDS = torch.randint(0, 256, (1, 48), generator=torch.Generator().manual_seed(0))
HEADS = {"num_attention_heads": 4, "num_key_value_heads": 2}  # tiny-llama's
needs_ct = pytest.mark.skipif(not __import__("importlib").util.find_spec("compressed_tensors"),
                              reason="compressed-tensors not installed (pip install -e '.[export]')")


@pytest.fixture(autouse=True)
def _quiet():
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def quantized(spec: str = "tiny-llama", **grid):
    loaded = load_model(spec)
    if grid:
        rtn = get_step("rtn")
        rtn.apply(loaded.model, rtn.config(**grid))
    return loaded


def logits(model) -> torch.Tensor:
    with torch.no_grad(), kernels(False):  # the exact path: the exported files hold the exact weights
        return model(IDS).logits


def max_diff(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> float:
    diff = (ours - theirs).abs().max().item()
    print(f"{what}: max |logit diff| {diff:.3g} (max |logit| {ours.abs().max().item():.3g})")
    return diff


def packed(model) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def gguf_tensors(path: Path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


# ---- GGUF ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits,group,symmetric,qtype", [
    (4, 32, True, "Q4_0"), (4, 32, False, "Q4_1"), (8, 0, True, "Q8_0"), (3, 64, True, "Q4_0"), (2, 32, False, "Q4_1")])
def test_gguf_blocks_are_the_packed_codes_bit_for_bit(tmp_path, bits, group, symmetric, qtype):
    loaded = quantized(bits=bits, group_size=group, symmetric=symmetric)
    report = write_gguf(loaded, tmp_path / "m.gguf", "f32")
    layers = packed(loaded.model)
    assert sorted(report.exact) == sorted(layers) and not report.converted
    tensors = gguf_tensors(tmp_path / "m.gguf")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    undo = LlamaTensorProcessor(config=HEADS)  # the loader's inverse
    for name, layer in layers.items():
        t = tensors[names.get_name(f"{name}.weight", try_suffixes=(".weight",))]
        assert t.tensor_type.name == qtype, name
        W = gguf.quants.dequantize(t.data, t.tensor_type)  # gguf-py's own reading of the blocks
        W = undo.process(W, t.name).weights  # q/k rows back from llama.cpp's RoPE layout
        assert np.array_equal(W, layer.dequantized_weight().numpy()), name


def test_llama_permutation_is_the_one_transformers_undoes():
    W = torch.randn(64, 8)
    undo = LlamaTensorProcessor(config=HEADS)
    for tensor, heads in (("blk.0.attn_q.weight", 4), ("blk.0.attn_k.weight", 2)):
        P = llama_permute(W, heads)
        assert not torch.equal(P, W)
        assert np.array_equal(undo.process(P.numpy(), tensor).weights, W.numpy())


@pytest.mark.parametrize("spec,bits,group,symmetric", [
    ("tiny-llama", 4, 32, True), ("tiny-llama", 4, 32, False), ("tiny-llama", 8, 0, True), ("tiny-qwen2", 4, 32, True)])
def test_gguf_reloads_in_transformers_with_the_same_logits(tmp_path, spec, bits, group, symmetric):
    loaded = quantized(spec, bits=bits, group_size=group, symmetric=symmetric)
    write_gguf(loaded, tmp_path / "m.gguf", "f32")  # float tensors as they are: only the packed layers are compared
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32)
    ours = logits(loaded.model)
    assert max_diff(ours, logits(back), f"gguf {spec} w{bits} g{group} {'sym' if symmetric else 'asym'}") \
        <= 1e-5 * ours.abs().max().item()


def test_sparse_packed_layers_export_as_their_dense_codes(tmp_path):
    loaded = load_model("tiny-llama")
    sparsegpt = get_step("sparsegpt")  # joint pruning and 4-bit: SparseQuantLinear (mask + kept codes)
    sparsegpt.apply(loaded.model, sparsegpt.config(sparsity=0.5, bits=4, group_size=32, block_size=32), IDS[:, :32])
    layers = packed(loaded.model)
    assert {m.kind for m in layers.values()} == {"sparse-quant"}
    report = write_gguf(loaded, tmp_path / "m.gguf", "f32")
    assert sorted(report.exact) == sorted(layers) and not report.converted
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32)
    ours = logits(loaded.model)
    assert max_diff(ours, logits(back), "gguf sparsegpt 50% w4 g32") <= 1e-5 * ours.abs().max().item()


def test_gguf_requantizes_what_has_no_block_type_and_the_embeddings(tmp_path):
    loaded = quantized(bits=8, group_size=32, symmetric=False)  # Q8_0 has no offset
    report = write_gguf(loaded, tmp_path / "m.gguf")  # default --type q8_0
    layers = packed(loaded.model)
    assert not report.exact and report.converted == {**{n: "Q8_0" for n in layers}, "model.embed_tokens.weight": "Q8_0"}
    tensors = gguf_tensors(tmp_path / "m.gguf")
    expected = gguf.quants.quantize(llama_permute(layers["model.layers.1.self_attn.k_proj"].dequantized_weight(), 2)
                                    .numpy(), gguf.GGMLQuantizationType.Q8_0)
    assert np.array_equal(tensors["blk.1.attn_k.weight"].data, expected)
    assert tensors["token_embd.weight"].tensor_type.name == "Q8_0" and "output.weight" not in tensors  # tied head
    assert tensors["output_norm.weight"].tensor_type.name == "F32"
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32)
    ours = logits(loaded.model)
    diff = max_diff(ours, logits(back), "gguf w8 g32 asym requantized to q8_0")
    assert 0 < diff < 0.05 * ours.abs().max().item()  # a second rounding: close, not equal


# ---- K-quants (effspec.export.kquants writes them; gguf-py, the reference here, only reads them) ------------------
def on_k_grid(qtype: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """n rows of 256 weights that a `qtype` block holds exactly: float16 super-scales times integer sub-scales times
    codes, each sub-block reaching both ends of its code range and each super-block its largest sub-scale."""
    d = rng.uniform(1e-3, 1e-2, (n, 1, 1)).astype(np.float16).astype(np.float32)
    if qtype == "Q4_K":
        dmin = rng.uniform(1e-3, 1e-2, (n, 1, 1)).astype(np.float16).astype(np.float32)
        sc, mn = rng.integers(1, 64, (n, 8, 1)), rng.integers(0, 64, (n, 8, 1))
        sc[:, 0], mn[:, 1] = 63, 63
        q = rng.integers(0, 16, (n, 8, 32))
        q[..., 0], q[..., 1] = 0, 15
        w = d * sc * q - dmin * mn
    else:
        sc = rng.integers(-127, 128, (n, 16, 1))
        sc[:, 0] = 127
        q = rng.integers(-32, 32, (n, 16, 16))
        q[..., 0] = -32
        w = d * sc * q
    return w.astype(np.float32).reshape(n, 256)


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
def test_kquant_blocks_hold_weights_on_their_grid_exactly(qtype):
    from effspec.export import kquants

    t = gguf.GGMLQuantizationType[qtype]
    W = on_k_grid(qtype, 6, np.random.default_rng(0))
    blocks = kquants.quantize(W, t)
    assert blocks.shape == (6, gguf.GGML_QUANT_SIZES[t][1]) and blocks.dtype == np.uint8
    assert np.array_equal(gguf.quants.dequantize(blocks, t), W)
    with pytest.raises(ValueError):
        kquants.quantize(W[:, :192], t)  # not whole super-blocks


def test_kquants_beat_the_simpler_blocks_of_their_size():
    """Q4_K (4.5 bits a weight) against Q4_0 (4.5) and Q4_1 (5.0); Q6_K (6.56) against Q5_0 (5.5) and within the error
    of a plain 6-bit grid with one float scale per 16 weights (written here), which its int8 sub-scales approximate."""
    from effspec.export import kquants

    rng = np.random.default_rng(1)
    W = rng.standard_normal((32, 1024)).astype(np.float32)
    W[:, 7] *= 10  # an outlier column, as real layers have
    T = gguf.GGMLQuantizationType

    def err(t):
        blocks = kquants.quantize(W, t) if t in kquants.ENCODERS else gguf.quants.quantize(W, t)
        return float(((gguf.quants.dequantize(blocks, t) - W) ** 2).mean())

    assert err(T.Q4_K) < min(err(T.Q4_0), err(T.Q4_1))
    assert err(T.Q6_K) < err(T.Q5_0)
    sub = W.reshape(-1, 16)
    peak = np.take_along_axis(sub, np.abs(sub).argmax(1)[:, None], 1)
    s = peak / -32
    plain6 = float(((np.clip(np.rint(sub / s), -32, 31) * s - sub) ** 2).mean())
    assert err(T.Q6_K) < 1.1 * plain6


def test_gguf_k_type_export_falls_back_on_short_rows_and_reloads(tmp_path):
    cfg = transformers.LlamaConfig(vocab_size=257, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                   eos_token_id=256, pad_token_id=256, bos_token_id=256)
    base = load_model("tiny-llama")
    torch.manual_seed(0)
    base.model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    report = write_gguf(base, tmp_path / "m.gguf", "q6_k")
    assert (tmp_path / "m.gguf").stat().st_mode & 0o777 == 0o666 & ~current_umask()  # not mkstemp's 0600
    tensors = gguf_tensors(tmp_path / "m.gguf")
    assert tensors["blk.0.ffn_down.weight"].tensor_type.name == "Q6_K"  # rows of 256: one super-block
    assert tensors["blk.0.ffn_up.weight"].tensor_type.name == "Q8_0"  # rows of 64: llama.cpp's fallback for Q6_K
    assert report.converted["model.layers.1.mlp.down_proj.weight"] == "Q6_K"
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32)
    ours = logits(base.model)
    assert 0 < max_diff(ours, logits(back), "gguf float model as q6_k / q8_0") < 0.05 * ours.abs().max().item()


def test_gguf_tokenizer_for_the_byte_tokenizer(tmp_path):
    loaded = quantized()
    write_gguf(loaded, tmp_path / "m.gguf")
    fields = gguf.GGUFReader(str(tmp_path / "m.gguf")).fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["tokenizer.ggml.model"].contents() == "gpt2" and fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    tokens = fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == 257 and tokens[256] == "<|endoftext|>"
    assert fields["tokenizer.ggml.token_type"].contents()[256] == gguf.TokenType.CONTROL
    assert fields["tokenizer.ggml.eos_token_id"].contents() == 256
    assert fields["tokenizer.ggml.merges"].contents() == []  # llama.cpp requires the key even with no merges
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    text = "Hello wörld, naïve 123!\n<|endoftext|>"
    assert tok(text)["input_ids"] == loaded.tokenizer(text)["input_ids"]


def test_gguf_tokenizer_metadata_is_copied_from_the_source_gguf(tmp_path):
    loaded = quantized()
    write_gguf(loaded, tmp_path / "source.gguf")
    loaded.meta = {"source_model": str(tmp_path / "source.gguf")}  # as for the builtin smollm2-135m
    write_gguf(loaded, tmp_path / "m.gguf")
    source, copy = (gguf.GGUFReader(str(tmp_path / n)).fields for n in ("source.gguf", "m.gguf"))
    keys = [k for k in source if k.startswith("tokenizer.")]
    assert sorted(keys) == sorted(k for k in copy if k.startswith("tokenizer."))
    for k in keys:
        assert (copy[k].types, copy[k].contents()) == (source[k].types, source[k].contents()), k
    assert read_metadata(tmp_path / "m.gguf", "tokenizer.ggml.eos")["tokenizer.ggml.eos_token_id"] == (
        256, gguf.GGUFValueType.UINT32, None)


# ---- compressed-tensors --------------------------------------------------------------------------
@needs_ct
@pytest.mark.parametrize("bits,group", [(4, 32), (8, 0), (3, 64), (2, 32)])
def test_compressed_tensors_reloads_with_the_same_logits(tmp_path, bits, group):
    loaded = quantized(bits=bits, group_size=group, symmetric=True)
    report = export(loaded, "compressed-tensors", tmp_path / "ct")
    assert len(report.exact) == 14 and report.dense == ["lm_head"]
    q = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "pack-quantized" and q["ignore"] == ["lm_head"]
    assert q["quantization_status"] == "compressed"
    w = q["config_groups"]["group_0"]["weights"]
    assert (w["num_bits"], w["symmetric"], w["strategy"], w["group_size"]) == (
        bits, True, "group" if group else "channel", group or None)
    with safe_open(str(tmp_path / "ct" / "model.safetensors"), "pt") as f:
        assert f.get_slice("model.layers.0.mlp.up_proj.weight_packed").get_dtype() == "I32"
        assert "model.layers.0.mlp.up_proj.weight" not in f.keys()
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ct"), dtype=torch.float32)
    ours = logits(loaded.model)
    theirs = logits(back)  # transformers decompresses to dense weights on the first forward
    assert torch.equal(back.model.layers[1].self_attn.k_proj.weight,
                       loaded.model.model.layers[1].self_attn.k_proj.dequantized_weight())
    assert max_diff(ours, theirs, f"compressed-tensors w{bits} g{group} sym") <= 1e-5 * ours.abs().max().item()


@needs_ct
def test_compressed_tensors_asymmetric_only_when_the_zero_points_are_integers(tmp_path):
    loaded = quantized(bits=4, group_size=32, symmetric=False)
    with pytest.raises(UserError, match=r"model\.layers\.0\.self_attn\.q_proj: asymmetric 4-bit .* integer zero points"):
        export(loaded, "compressed-tensors", tmp_path / "ct")
    assert list(tmp_path.iterdir()) == []  # nothing half-written
    for layer in packed(loaded.model).values():  # put every minimum on the grid: power-of-two scales, integer offsets
        s = torch.exp2(torch.round(torch.log2(layer.scales.float())))
        k = torch.round(-layer.mins.float() / s).clamp(0, 15)
        layer.scales.copy_(s)
        layer.mins.copy_(-k * s)
        layer._kernel = None
    report = export(loaded, "compressed-tensors", tmp_path / "ct")
    assert len(report.exact) == 14
    # transformers 5.23 with compressed-tensors 0.20 cannot load any asymmetric pack-quantized checkpoint (its
    # meta-device layout keeps zero points unpacked), so the package's own decompressor reads the files back
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    q = QuantizationConfig.model_validate(json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"])
    scheme = q.config_groups["group_0"]
    assert scheme.weights.symmetric is False and q.format == "pack-quantized"
    with safe_open(str(tmp_path / "ct" / "model.safetensors"), "pt") as f:
        for name, layer in packed(loaded.model).items():
            state = {k.removeprefix(f"{name}."): f.get_tensor(k) for k in f.keys() if k.startswith(f"{name}.weight")}
            assert state["weight_zero_point"].dtype == torch.int32  # packed, as llm-compressor writes it
            W = BaseCompressor.get_value_from_registry("pack-quantized").decompress(state, scheme)["weight"]
            assert torch.equal(W.float(), layer.dequantized_weight()), name


@needs_ct
def test_compressed_tensors_of_a_float_model_is_a_plain_checkpoint(tmp_path):
    loaded = quantized()
    report = export(loaded, "compressed-tensors", tmp_path / "ct")
    assert not report.exact and "quantization_config" not in json.loads((tmp_path / "ct" / "config.json").read_text())
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ct"), dtype=torch.float32)
    assert torch.equal(logits(loaded.model), logits(back))


def test_w8a8_layers_export_exactly_to_both_formats(tmp_path):
    from effspec.registry import all_steps

    if "w8a8" not in all_steps():
        pytest.skip("no w8a8 step registered")
    loaded = load_model("tiny-llama")
    w8a8 = get_step("w8a8")
    w8a8.apply(loaded.model, w8a8.config())
    layer = loaded.model.model.layers[1].mlp.down_proj
    report = write_gguf(loaded, tmp_path / "m.gguf", "f32")
    assert len(report.exact) == 14 and not report.converted
    t = gguf_tensors(tmp_path / "m.gguf")["blk.1.ffn_down.weight"]
    assert t.tensor_type.name == "Q8_0"
    assert np.array_equal(gguf.quants.dequantize(t.data, t.tensor_type), layer.weight.numpy())
    if __import__("importlib").util.find_spec("compressed_tensors"):
        export(loaded, "compressed-tensors", tmp_path / "ct")
        group = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
        assert group["format"] == "int-quantized" and group["input_activations"]["strategy"] == "token"
        back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ct"), dtype=torch.float32)
        ours, theirs = logits(loaded.model), logits(back)  # transformers decompresses on the first forward
        assert torch.equal(back.model.layers[1].mlp.down_proj.weight, layer.weight)
        # activations: per-token int8 on both sides, rounded a little differently
        assert max_diff(ours, theirs, "compressed-tensors w8a8") < 0.03 * ours.abs().max().item()


def test_packed_kinds_without_a_form_are_converted_and_rotations_refused(tmp_path):
    from effspec.registry import all_steps

    if not {"nf4", "rotate"} <= set(all_steps()):
        pytest.skip("nf4/rotate steps not registered")
    loaded = load_model("tiny-llama")
    nf4 = get_step("nf4")
    nf4.apply(loaded.model, nf4.config())
    report = write_gguf(loaded, tmp_path / "m.gguf")  # no GGML type for NF4: requantized to q8_0, and said so
    assert not report.exact and report.converted["model.layers.0.mlp.up_proj"] == "Q8_0"
    if __import__("importlib").util.find_spec("compressed_tensors"):
        report = export(loaded, "compressed-tensors", tmp_path / "ct")
        assert "model.layers.0.mlp.up_proj" in report.dense
        back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ct"), dtype=torch.float32)
        assert torch.equal(logits(loaded.model), logits(back))  # dense float weights: the same function
    rotated = load_model("tiny-llama")
    rotate = get_step("rotate")
    rotate.apply(rotated.model, rotate.config())
    with pytest.raises(UserError, match="wrapped by 'rotated_"):
        export(rotated, "gguf", tmp_path / "r.gguf")


# ---- LoRA adapters kept beside a packed base (QLoRA) -------------------------------------------------
LORA_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")


def with_lora(spec: str = "tiny-llama", r: int = 4, scaling: float = 1.5):
    """A w4 g32 packed model whose attention and down projections carry random LoRA adapters (QLoRA's result)."""
    from effspec.steps.tune.lora import LoRALinear
    from effspec.surgery import replace_module

    loaded = quantized(spec, bits=4, group_size=32, symmetric=True)
    g = torch.Generator().manual_seed(1)
    for name, m in list(loaded.model.named_modules()):
        if name.endswith(LORA_TARGETS):
            layer = LoRALinear(m, r, scaling)
            with torch.no_grad():
                layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.2)
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.2)
            replace_module(loaded.model, name, layer)
    return loaded


@needs_ct
def test_qlora_exports_as_a_compressed_tensors_base_and_a_peft_adapter(tmp_path):
    import peft

    loaded = with_lora()
    ours = logits(loaded.model)
    report = export(loaded, "compressed-tensors", tmp_path / "ct")
    assert report.adapter_layers == 8 and report.adapter == str(tmp_path / "ct" / "lora")
    assert len(report.exact) == 14  # the packed bases, LoRA-wrapped or not, are exact
    assert torch.equal(logits(loaded.model), ours)  # the model keeps its adapters
    base = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ct"), dtype=torch.float32)
    without = logits(base)
    back = peft.PeftModel.from_pretrained(base, str(tmp_path / "ct" / "lora"))
    theirs = logits(back)
    assert (ours - without).abs().max() > 0.1  # the adapter matters ...
    assert max_diff(ours, theirs, "compressed-tensors + peft adapter") <= 1e-5 * ours.abs().max().item()  # ... and is it


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-qwen2"])
def test_qlora_exports_as_a_gguf_base_and_a_llama_cpp_lora_gguf(tmp_path, spec):
    loaded = with_lora(spec, r=4, scaling=1.5)
    report = export(loaded, "gguf", tmp_path / "m.gguf", "f32")
    adapter = tmp_path / "m.lora.gguf"
    assert report.adapter == str(adapter) and report.adapter_layers == 8 and len(report.exact) == 14
    reader = gguf.GGUFReader(str(adapter))
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert field("general.type") == "adapter" and field("adapter.type") == "lora"
    assert field("general.architecture") == {"tiny-llama": "llama", "tiny-qwen2": "qwen2"}[spec]
    alpha = field("adapter.lora.alpha")
    tensors = gguf_tensors(adapter)
    assert len(tensors) == 16
    heads = loaded.model.config.num_attention_heads, loaded.model.config.num_key_value_heads
    for i, block in enumerate(loaded.model.model.layers):
        for gname, layer, n_head in (("attn_q", block.self_attn.q_proj, heads[0]), ("attn_k", block.self_attn.k_proj, heads[1]),
                                     ("attn_v", block.self_attn.v_proj, None), ("ffn_down", block.mlp.down_proj, None)):
            a, b = tensors[f"blk.{i}.{gname}.weight.lora_a"].data, tensors[f"blk.{i}.{gname}.weight.lora_b"].data
            want_b = layer.lora_B.detach()
            if n_head and spec == "tiny-llama":  # rows in llama.cpp's q/k order, as the base's
                want_b = llama_permute(want_b, n_head)
            assert np.array_equal(a, layer.lora_A.detach().numpy()) and np.array_equal(b, want_b.numpy())
            assert alpha / a.shape[0] == pytest.approx(layer.scaling)  # llama.cpp's scale: alpha / rank(lora_a)
    # the base file is the packed model without adapters: transformers' GGUF loader gives the base's logits
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32)
    from effspec.export.adapter import base_only, lora_layers

    with base_only(loaded.model, lora_layers(loaded.model)):
        base = logits(loaded.model)
    assert max_diff(base, logits(back), f"gguf base of {spec}") <= 1e-5 * base.abs().max().item()


def test_adapters_of_different_ranks_are_refused_before_writing(tmp_path, capsys):
    from effspec.steps.tune.lora import LoRALinear
    from effspec.surgery import replace_module

    loaded = with_lora()
    m = loaded.model.model.layers[0].mlp.up_proj
    replace_module(loaded.model, "model.layers.0.mlp.up_proj", LoRALinear(m, 8, 1.5))
    with pytest.raises(UserError, match="differ in rank or scaling"):
        export(loaded, "gguf", tmp_path / "m.gguf")
    assert not list(tmp_path.iterdir())
    (tmp_path / "m.lora.gguf").write_text("the user's")
    loaded = with_lora()
    with pytest.raises(UserError, match="not written by effspec"):
        export(loaded, "gguf", tmp_path / "m.gguf", force=True)
    assert (tmp_path / "m.lora.gguf").read_text() == "the user's" and not (tmp_path / "m.gguf").exists()


# ---- the command -----------------------------------------------------------------------------------
def run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def error(capsys, *argv) -> str:
    """Run a command that must fail: its one-line message (exit 2, no traceback)."""
    code, _, err = run(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("effspec: error: "), err
    return lines[0]


def test_cli_export(tmp_path, capsys):
    loaded = quantized(bits=4, group_size=32, symmetric=True)
    with atomic_dir(tmp_path / "model") as d:
        save_model(loaded.model, loaded.tokenizer, d, {"source_model": "tiny-llama"})
    model, out = tmp_path / "model", tmp_path / "m.gguf"
    code, stdout, _ = run(capsys, "export", model, "--format", "gguf", "--out", out, "--json")
    record = json.loads(stdout.strip().splitlines()[-1])
    assert code == 0 and record["exact_layers"] == 14 and record["tensor_types"]["Q4_0"] == 14 and out.is_file()
    first = out.read_bytes()
    assert "already exists" in error(capsys, "export", model, "--format", "gguf", "--out", out)
    code, _, _ = run(capsys, "export", model, "--format", "gguf", "--out", out, "--type", "f16", "--force")
    assert code == 0 and out.read_bytes() != first  # replaced: its own earlier output
    user = tmp_path / "user.gguf"
    user.write_text("not effspec's")
    assert "not written by effspec" in error(capsys, "export", model, "--format", "gguf", "--out", user, "--force")
    assert user.read_text() == "not effspec's"
    for argv, message in (
            (("--format", "ggml", "--out", tmp_path / "x"), "expected one of compressed-tensors, gguf"),
            (("--format", "gguf", "--out", tmp_path / "x.bin"), "ends in .gguf"),
            (("--format", "gguf", "--out", out, "--type", "q5_k", "--force"), "--type q5_k: expected one of"),
            (("--format", "compressed-tensors", "--out", tmp_path / "ct", "--type", "f16"), "gguf only"),
            (("--format", "compressed-tensors", "--out", model), "holds an effspec model output")):
        assert message in error(capsys, "export", model, *argv)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    if __import__("importlib").util.find_spec("compressed_tensors"):
        code, stdout, _ = run(capsys, "export", model, "--format", "compressed-tensors", "--out", tmp_path / "ct", "--json")
        assert code == 0 and json.loads(stdout.strip().splitlines()[-1])["tensor_types"]["pack-quantized"] == 14
        assert json.loads((tmp_path / "ct" / "effspec.json").read_text())["kind"] == "export"
