"""Tuning: the shared loop, LoRA/DoRA/IA3/prompt/prefix through peft, QLoRA on packed bases, distillation."""

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from effspec.config import config_from_dict
from effspec.errors import UserError
from effspec.frozen import frozen_linear
from effspec.models import load_model, save_model
from effspec.objectives import Loss, Objective, kl_divergence, lm_loss
from effspec.registry import get_step
from effspec.steps.tune.lora import AdapterConfig, LoRALinear, attach, detach, save_adapter, train_adapter
from effspec.train import TrainConfig, learning_rate_factor, train
from effspec.generate import greedy
from effspec.train_data import (IGNORE, StepBatches, _prompt_and_answer, chat_prompt, instruction_examples,
                                  lm_examples, own_answers, read_instructions)

ALPACA = Path(__file__).resolve().parents[2] / "shared" / "data" / "instruct" / "alpaca_en_demo.json"
FAST = {"steps": 4, "batch_size": 2, "seqlen": 32, "warmup": 1, "grad_checkpointing": False, "bf16": False}


def tiny():
    return load_model("tiny-llama")


def ids(n=8, length=64, seed=0):
    return torch.randint(0, 257, (n, length), generator=torch.Generator().manual_seed(seed))


def batch_loss(model, tokens):
    with torch.no_grad():
        return float(lm_loss(model(tokens).logits, tokens))


def config(name, **fields):
    return config_from_dict(get_step(name).config, {**FAST, **fields})


# ---- LoRA --------------------------------------------------------------------------------------
def test_lora_step_trains_only_adapters_and_lowers_the_loss():
    loaded = tiny()
    fixed = ids(2, 32)
    cfg = config("lora", steps=30, lr=1e-2, warmup=0, dropout=0.0, batch_size=2)
    pm = attach(loaded.model, cfg)
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    loss_before = batch_loss(pm, fixed)
    from effspec.tuning import fit

    fit(pm, cfg, fixed, loaded.tokenizer)  # train on the fixed batch itself
    changed = {n for n, p in pm.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert any("lora_B" in n for n in changed)  # B starts at zero: it must have moved for the output to
    assert batch_loss(pm, fixed) < loss_before - 0.1


def test_merged_and_unmerged_adapters_give_the_same_logits():
    loaded = tiny()
    cfg = config("lora", r=4, steps=3, lr=1e-2)
    pm, _ = train_adapter(loaded.model, cfg, ids())
    x = ids(2, 20, seed=1)
    with torch.no_grad():
        unmerged = pm(input_ids=x).logits
    merged = detach(pm, cfg)
    assert all(type(m) is not LoRALinear for m in merged.modules())  # float bases: merged into W
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, unmerged, atol=1e-5, rtol=1e-5)


def test_lora_update_is_the_papers_formula():
    """h = W x + (alpha / r) B A x, with alpha / sqrt(r) under rsLoRA."""
    for rslora in (False, True):
        cfg = AdapterConfig(r=4, alpha=8.0, rslora=rslora, merge=False, targets=("*.layers.0.self_attn.q_proj",))
        model = tiny().model
        W = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
        pm = attach(model, cfg).eval()
        layer = pm.base_model.model.model.layers[0].self_attn.q_proj
        with torch.no_grad():
            layer.lora_B["default"].weight.normal_()
        A, B = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
        x = torch.randn(3, W.shape[1])
        scale = 8.0 / (2.0 if rslora else 4.0)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), x @ W.T + scale * (x @ A.T) @ B.T)
            kept = detach(pm, cfg).model.layers[0].self_attn.q_proj  # merge: false keeps it beside W
        assert isinstance(kept, LoRALinear)
        with torch.no_grad():
            torch.testing.assert_close(kept(x), x @ W.T + scale * (x @ A.T) @ B.T)


@pytest.mark.parametrize("method", ["dora", "ia3"])
def test_dora_and_ia3_train_and_merge(method):
    loaded = tiny()
    cfg = config("lora", method=method, steps=3, lr=1e-2)
    pm, log = train_adapter(loaded.model, cfg, ids())
    assert len(log.losses) == 3 and all(math.isfinite(v) for v in log.losses)
    x = ids(2, 20, seed=1)
    with torch.no_grad():
        unmerged = pm(input_ids=x).logits
        merged = detach(pm, cfg)(x).logits
    torch.testing.assert_close(merged, unmerged, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_prompt_and_prefix_tuning_learn_virtual_tokens(method, tmp_path):
    loaded = tiny()
    fixed = ids(2, 32)
    cfg = config("lora", method=method, virtual_tokens=4, steps=15, lr=3e-2, warmup=0)
    pm, log = train_adapter(loaded.model, cfg, fixed)
    assert log.losses[-1] < log.losses[0]
    assert all(not p.requires_grad for p in loaded.model.parameters())  # the base never learns
    save_adapter(pm, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    with pytest.raises(UserError, match="cannot merge"):
        get_step("lora").apply(tiny().model, cfg, fixed)


def test_adapter_saves_in_peft_format_and_loads_with_peftmodel(tmp_path):
    import peft

    cfg = config("lora", r=4, steps=3, lr=1e-2, save_adapter=str(tmp_path / "adapter"))
    merged = get_step("lora").apply(tiny().model, cfg, ids())
    loaded = peft.PeftModel.from_pretrained(tiny().model, str(tmp_path / "adapter"))
    x = ids(2, 20, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, merged(x).logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(UserError, match="already exists"):  # never written over
        get_step("lora").apply(tiny().model, cfg, ids())


# ---- QLoRA ------------------------------------------------------------------------------------
def packed_bytes(model):
    return {n: b.clone() for n, b in model.state_dict().items() if b.dtype == torch.uint8}


@pytest.mark.parametrize("base", ["rtn", "nf4"])
def test_qlora_keeps_the_base_packed_while_training(base, tmp_path):
    loaded = tiny()
    model = get_step(base).apply(loaded.model, get_step(base).config(), None)
    before = packed_bytes(model)
    fixed = ids(2, 32)
    loss_before = batch_loss(model, fixed)
    cfg = config("lora", steps=20, lr=1e-2, warmup=0, dropout=0.0)
    out = get_step("lora").apply(model, cfg, fixed)
    after = packed_bytes(out)
    assert before and {n.replace(".base.", ".") for n in after} == set(before)
    assert all(torch.equal(after[n], before[n.replace(".base.", ".")]) for n in after)  # codes untouched
    kept = [m for m in out.modules() if isinstance(m, LoRALinear)]
    assert len(kept) == 14 and all(type(m.base).__name__ in ("QuantLinear", "NF4Linear") for m in kept)
    assert batch_loss(out, fixed) < loss_before - 0.1
    # the packed + adapter model saves and reloads with the same logits
    save_model(out, loaded.tokenizer, tmp_path, {"recipe": "qlora"})
    again = load_model(str(tmp_path)).model
    with torch.no_grad():
        torch.testing.assert_close(again(fixed).logits, out(fixed).logits)


def test_frozen_linear_gradient_matches_the_dequantized_linear():
    model = get_step("rtn").apply(tiny().model, get_step("rtn").config(bits=4, group_size=32), None)
    layer = model.model.layers[0].mlp.down_proj
    x = torch.randn(5, layer.in_features, requires_grad=True)
    y = frozen_linear(x, layer)
    (g,) = torch.autograd.grad((y ** 2).sum(), x)
    x2 = x.detach().clone().requires_grad_(True)
    (g2,) = torch.autograd.grad((F.linear(x2, layer.dequantized_weight()) ** 2).sum(), x2)
    torch.testing.assert_close(g, g2)
    assert layer(x).grad_fn is not None  # the packed layer routes to it whenever its input needs gradients


@pytest.mark.parametrize("base", ["rtn", "nf4"])
def test_attaching_lora_to_a_packed_base_dequantizes_nothing(base, monkeypatch):
    """peft places adapters by reading the base's `weight`; on a packed layer that would dequantize every matrix."""
    model = get_step(base).apply(tiny().model, get_step(base).config(), None)
    packed = type(model.model.layers[0].mlp.down_proj)
    calls = []
    real = packed.dequantized_weight
    monkeypatch.setattr(packed, "dequantized_weight", lambda self: calls.append(1) or real(self))
    pm = attach(model, config("lora"))
    assert calls == []
    adapters = [p for n, p in pm.named_parameters() if "lora_" in n]
    assert len(adapters) == 28 and all(p.dtype == torch.float32 and p.requires_grad for p in adapters)
    pm(ids(1, 8)).logits.sum().backward()  # and the layer still computes its weight where training needs it
    assert calls


def test_adapters_attach_inside_the_block_cache(monkeypatch):
    """DoRA's initial weight norms make weight-size temporaries; outside the cache glibc kept their holes."""
    from effspec import block_cache
    from effspec.steps.tune import lora

    depth = []
    real = lora.attach
    monkeypatch.setattr(lora, "attach", lambda model, cfg: depth.append(block_cache._depth) or real(model, cfg))
    lora.train_adapter(tiny().model, config("lora", method="dora", steps=1), ids())
    assert depth == [1]


# ---- distillation ---------------------------------------------------------------------------
def test_kl_matches_a_reference_loop():
    torch.manual_seed(0)
    s, t = torch.randn(6, 11), torch.randn(6, 11)
    mask = torch.tensor([True, False, True, True, False, True])
    T = 2.0
    ref_f = ref_r = 0.0
    for i in range(6):
        if mask[i]:
            p, q = torch.softmax(t[i] / T, -1), torch.softmax(s[i] / T, -1)
            ref_f += float((p * (p / q).log()).sum())
            ref_r += float((q * (q / p).log()).sum())
    n = int(mask.sum())
    assert kl_divergence(s, t, mask, "forward", T).item() == pytest.approx(ref_f / n * T * T, rel=1e-5)
    assert kl_divergence(s, t, mask, "reverse", T).item() == pytest.approx(ref_r / n * T * T, rel=1e-5)


@pytest.mark.parametrize("kl", ["forward", "reverse"])
def test_distillation_of_a_model_into_itself_has_zero_loss(kl):
    model = tiny().model
    loss = Loss(Objective(objective="distill", kl=kl, hidden_weight=1.0), teacher=tiny().model)
    x = ids(2, 32)
    batch = {"input_ids": x, "labels": x, "attention_mask": torch.ones_like(x)}
    assert abs(float(loss(model, batch).detach())) < 1e-6


def test_distill_moves_a_damaged_student_toward_its_teacher():
    teacher = tiny().model
    student = tiny().model
    with torch.no_grad():
        for p in student.model.layers[1].parameters():
            p.mul_(0.5)
    x = ids(4, 32, seed=3)

    def kl_to_teacher():
        with torch.no_grad():
            return float(kl_divergence(student(x).logits.flatten(0, 1), teacher(x).logits.flatten(0, 1),
                                       torch.ones(x.numel(), dtype=torch.bool)))

    before = kl_to_teacher()
    get_step("distill").apply(student, config("distill", steps=20, lr=3e-3, warmup=0, batch_size=4), x,
                              teacher=teacher)
    assert kl_to_teacher() < 0.5 * before


def test_on_policy_distillation_trains_on_student_samples():
    student, teacher = tiny().model, tiny().model
    with torch.no_grad():
        student.model.layers[0].mlp.down_proj.weight.mul_(0.5)
    import effspec.objectives as objectives

    sampled = []
    real = objectives.student_sequences

    def spy(model, batch, rng):
        out = real(model, batch, rng)
        sampled.append((batch["input_ids"], out))
        return out
    objectives.student_sequences = spy
    try:
        w0 = student.model.layers[0].mlp.down_proj.weight.detach().clone()
        cfg = config("distill", steps=2, on_policy=1.0, seqlen=16, lr=1e-2)
        get_step("distill").apply(student, cfg, ids(4, 16), teacher=teacher)
    finally:
        objectives.student_sequences = real
    assert len(sampled) == 4  # every micro-batch of both steps came from the student
    for given, out in sampled:  # the first quarter kept, the rest sampled and the only targets
        assert torch.equal(out["input_ids"][:, :4], given[:, :4]) and out["input_ids"].shape == given.shape
        assert (out["labels"][:, :4] == IGNORE).all() and (out["labels"][:, 4:] != IGNORE).all()
    assert not torch.equal(student.model.layers[0].mlp.down_proj.weight, w0)


# ---- the loop: accumulation, schedule, resume ----------------------------------------------------
def test_accumulation_gives_the_full_batch_gradient():
    x = ids(4, 16)
    grads = []
    for micro in (4, 1):
        model = tiny().model
        model.requires_grad_(False)
        model.model.layers[0].mlp.up_proj.weight.requires_grad_(True)
        cfg = TrainConfig(steps=1, batch_size=4, micro_batch=micro, lr=1.0, warmup=0, max_grad_norm=0, bf16=False,
                          grad_checkpointing=False, schedule="constant")
        batches = StepBatches(lm_examples(x, 16), 4, micro, seed=0)
        seen = []  # the accumulated gradient after each backward; the last is what the optimizer sees
        model.model.layers[0].mlp.up_proj.weight.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad.clone()))
        train(model, batches, Loss(Objective()), cfg)
        assert len(seen) == 4 // micro
        grads.append(seen[-1])
    torch.testing.assert_close(grads[0], grads[1], atol=1e-7, rtol=1e-4)


def test_learning_rate_schedule():
    cfg = TrainConfig(steps=10, warmup=2, schedule="cosine")
    f = [learning_rate_factor(s, cfg) for s in range(10)]
    assert f[0] == pytest.approx(1 / 3) and f[1] == pytest.approx(2 / 3) and f[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[2:], f[3:])) and f[-1] > 0
    lin = TrainConfig(steps=10, warmup=0, schedule="linear")
    assert learning_rate_factor(5, lin) == pytest.approx(0.5)


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    x = ids(8, 32)
    base = dict(FAST, steps=6, batch_size=2, micro_batch=1, lr=1e-2, dropout=0.1)

    def run(ckpt, steps=6):
        cfg = config("lora", **{**base, "steps": 6, "checkpoint_every": 2 if ckpt else 0,
                                "checkpoint_dir": str(ckpt) if ckpt else None})
        pm = attach(tiny().model, cfg)
        from effspec.tuning import fit
        from effspec import train as train_mod

        if steps < 6:  # kill mid-run: stop right after the step-`steps` checkpoint is written
            real = train_mod._save_checkpoint

            def save_then_die(path, step, *a):
                real(path, step, *a)
                if step == steps:
                    raise KeyboardInterrupt
            train_mod._save_checkpoint = save_then_die
            try:
                with pytest.raises(KeyboardInterrupt):
                    fit(pm, cfg, x)
            finally:
                train_mod._save_checkpoint = real
            return None, None
        log = fit(pm, cfg, x)
        return log, pm

    full, pm_full = run(None)
    run(tmp_path / "ck", steps=4)
    resumed, pm_resumed = run(tmp_path / "ck")
    assert resumed.resumed_from == 4
    assert resumed.losses == pytest.approx(full.losses, abs=1e-5)
    for (n, a), (_, b) in zip(pm_full.named_parameters(), pm_resumed.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    other = config("lora", **{**base, "lr": 1e-3, "checkpoint_every": 2, "checkpoint_dir": str(tmp_path / "ck")})
    with pytest.raises(UserError, match="other settings"):
        train_adapter(tiny().model, other, x)


# ---- data ------------------------------------------------------------------------------------
@pytest.mark.skipif(not ALPACA.is_file(), reason="shared Alpaca data not present")
def test_instruction_examples_take_the_loss_on_the_response_only():
    tok = load_model("tiny-llama").tokenizer
    records = read_instructions(ALPACA)
    assert len(records) > 100 and all("instruction" in r and "output" in r for r in records[:5])
    ex = instruction_examples(records[:20], tok, 512)
    for (x, y), r in zip(ex, records[:20]):
        targets = y[y != IGNORE]
        assert tok.decode(targets[:-1]) == r["output"][: len(tok.decode(targets[:-1]))]
        first = int((y != IGNORE).nonzero()[0])
        assert tok.decode(x[:first]).endswith("### Response:\n") and r["instruction"] in tok.decode(x[:first])


def test_chat_template_examples_put_the_loss_on_the_assistant_turn():
    tok = copy.deepcopy(load_model("tiny-llama").tokenizer)
    records = [{"instruction": "Name a colour.", "output": "Blue."},
               {"instruction": "Add these.", "input": "2 and 3", "output": "Five."}]
    with pytest.raises(UserError, match="chat template"):
        instruction_examples(records, tok, 512, template="chat")
    with pytest.raises(UserError, match="no chat template"):
        chat_prompt(tok, "Hi there")
    tok.chat_template = ("{% for m in messages %}[{{ m.role }}]{{ m.content }}[end]{% endfor %}"
                         "{% if add_generation_prompt %}[assistant]{% endif %}")
    assert tok.decode(chat_prompt(tok, "Hi there")) == "[user]Hi there[end][assistant]"  # `generate --chat`'s
    ex = instruction_examples(records, tok, 512, template="chat")
    for (x, y), r in zip(ex, records):
        first = int((y != IGNORE).nonzero()[0])
        user = r["instruction"] + (f"\n\n{r['input']}" if "input" in r else "")
        assert tok.decode(x[:first]) == f"[user]{user}[end][assistant]"
        assert tok.decode(y[first:]) == f"{r['output']}[end]"  # the turn's end is learned, as eos is in alpaca


def test_own_answers_are_the_prompt_and_the_models_own_greedy_answer():
    loaded = load_model("tiny-llama")
    records = [{"instruction": w, "output": "never read"} for w in ("Name a colour.", "Add two and three, please.",
                                                                     "Hi", "Count from one to five.", "Why?")]
    seqs = own_answers(loaded.model, loaded.tokenizer, records, 6, template="alpaca", batch_size=2)
    for seq, r in zip(seqs, records):  # batched by length, answered one by one in the reference
        prompt = _prompt_and_answer(r, loaded.tokenizer, "alpaca")[0]
        answer = greedy(loaded.model, torch.tensor(prompt), 6, eos_token_id=loaded.tokenizer.eos_token_id).tokens
        assert seq.tolist() == prompt + answer.tolist() and "never read" not in loaded.tokenizer.decode(seq)


def test_bad_instruction_files_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "x"}]))
    with pytest.raises(UserError, match="record 0"):
        read_instructions(bad)
    with pytest.raises(UserError, match="cannot read"):
        read_instructions(tmp_path / "missing.json")


def test_step_batches_are_a_pure_function_of_the_step():
    ex = lm_examples(ids(5, 16), 16)
    a, b = StepBatches(ex, 2, 1, seed=3), StepBatches(ex, 2, 1, seed=3)
    for s in (4, 0, 7, 2):
        assert all(torch.equal(p["input_ids"], q["input_ids"]) for p, q in zip(a(s), b(s)))
    seen = torch.cat([a(s)[0]["input_ids"] for s in range(0, 5)] + [a(s)[1]["input_ids"] for s in range(0, 5)])
    assert len({tuple(r.tolist()) for r in seen}) == 5  # two epochs visit every example


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=3, micro_batch=2)
    with pytest.raises(ValueError, match="method"):
        AdapterConfig(method="vera")
    with pytest.raises(ValueError, match="kd_weight"):
        Objective(kd_weight=2.0)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        TrainConfig(checkpoint_every=5)


# ---- recipes and the command line ------------------------------------------------------------
@pytest.fixture
def cli(capsys, tmp_path, monkeypatch):
    from effspec.cli import main

    monkeypatch.setenv("EFFSPEC_CACHE", str(tmp_path / "cache"))

    def run(*argv):
        capsys.readouterr()
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err
    return run


MEASURE = ["--windows", "2", "--seqlen", "64", "--prompt-tokens", "8", "--new-tokens", "4", "--prefill-tokens", "32",
           "--runs", "1"]


def test_recipe_distills_from_the_model_before_its_steps(cli, tmp_path, monkeypatch):
    import effspec.objectives as objectives

    teachers = []
    real = objectives.Loss.__init__

    def spy(self, cfg, teacher=None, seed=0):
        teachers.append(teacher)
        real(self, cfg, teacher, seed)
    monkeypatch.setattr(objectives.Loss, "__init__", spy)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("calibration: {samples: 8, seqlen: 64}\nsteps:\n  - drop-layers: {n: 1, keep_first: false}\n"
                      "  - distill: {steps: 3, batch_size: 2, seqlen: 32, bf16: false}\n")
    text = tmp_path / "text.txt"
    text.write_text("Pack my box with five dozen liquor jugs. " * 60)
    code, out, err = cli("run", recipe, "--model", "tiny-llama", "--data", text, "--out", tmp_path / "m",
                         "--json", *MEASURE)
    assert code == 0, err
    row = json.loads(out.strip().splitlines()[-1])
    assert math.isfinite(row["perplexity"]) and "distill(" in row["steps"]
    assert len(teachers) == 1 and teachers[0].config.num_hidden_layers == 2  # the original, not the 1-block student
    assert load_model(str(tmp_path / "m")).model.config.num_hidden_layers == 1


def test_tune_command_saves_adapters_and_models(cli, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    common = ["--data", text, "--train-seqlen", "32", "--batch-size", "2", "--set", "bf16=false", "--json"]
    code, out, err = cli("tune", "tiny-llama", "--out", tmp_path / "ad", "--steps", "3", *common)
    assert code == 0, err
    rec = json.loads(out.strip().splitlines()[-1])
    assert rec["kind"] == "adapter" and rec["steps"] == 3 and rec["tokens"] == 3 * 2 * 31
    assert (tmp_path / "ad" / "adapter_config.json").is_file() and not (tmp_path / "ad.ckpt").exists()
    merged = load_model(str(tmp_path / "ad")).model  # an adapter directory loads as its base with the adapter merged
    assert all(type(m).__name__ == "Linear" for n, m in merged.named_modules() if n.endswith("q_proj"))
    code, out, err = cli("tune", "tiny-llama", "--out", tmp_path / "full", "--method", "full", "--steps", "2", *common)
    assert code == 0 and (tmp_path / "full" / "config.json").is_file(), err
    # an existing output is never replaced without --force; bad fields and impossible merges are one-line errors
    code, _, err = cli("tune", "tiny-llama", "--out", tmp_path / "ad", "--steps", "3", *common)
    assert code == 2 and "already exists" in err
    code, out, err = cli("tune", "tiny-llama", "--out", tmp_path / "bad", "--set", "r=0", *common)
    assert code == 2 and "r: got 0" in err and len(err.strip().splitlines()) == 1
    code, out, err = cli("tune", "tiny-llama", "--out", tmp_path / "p", "--method", "prompt", "--merge", *common)
    assert code == 2 and "cannot merge" in err


OBJECTIVES = [Objective(), Objective(objective="distill", kd_weight=0.5, temperature=2.0),
              Objective(objective="distill", kl="reverse", kd_weight=0.7, temperature=1.5)]


@pytest.mark.parametrize("path", ["fused", "chunked"])
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_head_loss_equals_the_full_logits_loss(objective, path, monkeypatch):
    """Fused head + loss (bare linear heads) and checkpointed chunks (others): value and gradients of the plain formula."""
    import effspec.head_loss as head_loss
    import effspec.objectives as objectives

    monkeypatch.setattr(head_loss, "ROWS", 7)  # several chunks, the last one short
    monkeypatch.setattr(objectives, "CHUNK", 7)
    if path == "chunked":
        monkeypatch.setattr(objectives, "_plain", lambda head: False)
    x = ids(2, 40, seed=5)
    labels = x.clone()
    labels[0, :10] = IGNORE  # a masked prompt
    batch = {"input_ids": x, "labels": labels, "attention_mask": torch.ones_like(x)}
    teacher = tiny().model
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
    grads = []
    for reference in (False, True):
        model = tiny().model.train()
        if not reference:
            loss = Loss(objective, teacher if objective.needs_teacher else None)(model, batch)
        else:  # the whole logits, the formulas written out
            logits = model(x).logits[:, :-1]
            m = labels[:, 1:] != IGNORE
            loss = F.cross_entropy(logits[m], labels[:, 1:][m])
            if objective.needs_teacher:
                T, w = objective.temperature, objective.kd_weight
                with torch.no_grad():
                    log_t = torch.log_softmax(teacher(x).logits[:, :-1][m] / T, -1)
                log_s = torch.log_softmax(logits[m] / T, -1)
                p, q = (log_t, log_s) if objective.kl == "forward" else (log_s, log_t)
                kl = (p.exp() * (p - q)).sum(-1).mean() * T * T
                loss = w * kl + (1 - w) * loss
        loss.backward()
        grads.append((float(loss.detach()), model.model.layers[1].mlp.down_proj.weight.grad.clone(), model.lm_head.weight.grad.clone()))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-5)
    torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(grads[0][2], grads[1][2], atol=1e-6, rtol=1e-4)
    assert type(tiny().model.lm_head) is nn.Linear  # the head is put back


def test_fused_head_loss_under_bf16_autocast_matches_the_autocast_linear():
    """Under CPU autocast the fused loss runs the head in bf16 as nn.Linear would: same value and gradients."""
    from effspec.head_loss import head_loss

    g = torch.Generator().manual_seed(0)
    h0, w0 = torch.randn(300, 32, generator=g), torch.randn(500, 32, generator=g) * 0.3
    y = torch.randint(0, 500, (300,), generator=g)
    out = []
    for fused in (True, False):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = head_loss(h, w, y) if fused else F.cross_entropy(F.linear(h, w).float(), y, reduction="sum")
        loss.backward()
        out.append((float(loss.detach()), h.grad, w.grad))
    assert out[0][0] == pytest.approx(out[1][0], rel=1e-4)
    torch.testing.assert_close(out[0][1], out[1][1], atol=2e-3, rtol=2e-2)
    torch.testing.assert_close(out[0][2], out[1][2], atol=2e-2, rtol=2e-2)
    assert out[0][1].dtype == torch.float32 and out[0][2].dtype == torch.float32


def test_fast_dropout_keeps_dropouts_rule():
    from effspec.steps.tune.lora import FastDropout

    torch.manual_seed(0)
    d = FastDropout(0.1).train()
    x = torch.randn(400, 500)
    y = d(x)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 0.1) < 0.005
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / (1 - round(0.1 * 32768) / 32768))
    assert torch.equal(d.eval()(x), x)
    pm = attach(tiny().model, AdapterConfig(dropout=0.1))
    assert any(isinstance(m, FastDropout) for m in pm.modules()) and not any(type(m) is nn.Dropout for m in pm.modules())


def test_qlora_model_decodes_on_the_lean_decoder():
    from effspec import decoder

    model = get_step("rtn").apply(tiny().model, get_step("rtn").config(bits=4, group_size=32), None)
    model = get_step("lora").apply(model, config("lora", steps=3, lr=1e-2), ids())
    assert decoder.supported(model)
    x = ids(1, 12, seed=9)[0]
    with torch.no_grad():
        expected = model(x[None]).logits[0]
        got = decoder.LeanDecoder(model, 16).forward(x, last_only=False)
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)  # decode kernels round activations to int8
