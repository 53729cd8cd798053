"""The CLI end to end, in process, on tiny-llama: DESIGN.md's "Recipe and CLI contract"."""

from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path

import pytest

from effspec.cli import main
from effspec.errors import UserError
from effspec.store import Store

TINY = ["--windows", "2", "--seqlen", "64", "--prompt-tokens", "8", "--new-tokens", "4", "--prefill-tokens", "32",
        "--runs", "1"]
MEASURED = ("perplexity", "stored_bytes", "bits_per_param", "decode_tokens_per_s", "prefill_tokens_per_s", "peak_rss_bytes")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFSPEC_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def text(tmp_path: Path) -> str:
    rng = random.Random(0)
    path = tmp_path / "corpus.txt"
    path.write_text("".join(rng.choice("abcdefghij klmnop\n") for _ in range(1500)))
    return str(path)


@pytest.fixture
def cli(capsys):
    """Run `effspec ARGS` in process: (exit code, stdout, stderr)."""

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def assert_user_error(code: int, err: str) -> str:
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("effspec: error: ")
    return lines[0]


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    """Temporary siblings an interrupted or refused write would leave behind."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# ---- listing and loading --------------------------------------------------------------------------
def test_models_lists_the_builtins(cli) -> None:
    code, out, _ = cli("models", "--json")
    assert code == 0
    assert {"tiny-llama", "tiny-qwen2", "smollm2-135m"} <= set(last_json(out)["models"])
    assert any(line.startswith("tiny-llama ") for line in out.splitlines())


def test_steps_lists_the_registry_with_defaults(cli) -> None:
    from effspec.registry import all_steps

    code, out, _ = cli("steps", "--json")
    assert code == 0
    steps = last_json(out)
    assert set(steps) == set(all_steps()) and {"rtn", "magnitude"} <= set(steps)
    assert steps["rtn"]["defaults"]["bits"] == 4 and steps["rtn"]["calibration"] is False
    assert steps["magnitude"]["family"] == "prune"


def test_load_check_reports_params(cli) -> None:
    from effspec.models import load_model

    model = load_model("tiny-llama").model
    code, out, _ = cli("load-check", "tiny-llama", "--json")
    assert code == 0
    rec = last_json(out)
    assert rec["params"] == sum(p.numel() for p in model.parameters())
    assert (rec["model_type"], rec["layers"], rec["hidden_size"], rec["packed_layers"]) == ("llama", 2, 64, 0)
    assert rec["stored_bytes"] == 4 * rec["params"] and rec["bits_per_param"] == pytest.approx(32.0)


# ---- eval -----------------------------------------------------------------------------------------
def test_eval_json_has_every_measured_figure(cli, text) -> None:
    code, out, err = cli("eval", "tiny-llama", "--data", text, *TINY, "--json")
    assert code == 0, err
    rec = last_json(out)
    for key in MEASURED:
        assert isinstance(rec[key], (int, float)) and math.isfinite(rec[key]) and rec[key] > 0, key
    # a random model over 257 byte tokens: perplexity near the vocabulary size, not 1 and not astronomical
    assert 20 < rec["perplexity"] < 2000
    assert (rec["eval_windows"], rec["eval_seqlen"], rec["eval_tokens"]) == (2, 64, 2 * 63)
    assert rec["bits_per_param"] == pytest.approx(32.0)
    assert "env" in rec and rec["env"]["torch"]


# ---- run ------------------------------------------------------------------------------------------
def test_run_saves_reuses_refuses_and_replaces(cli, text, tmp_path: Path) -> None:
    out_dir = tmp_path / "w4"
    code, out, err = cli("run", "rtn-w4-g64", "--model", "tiny-llama", "--data", text, "--out", out_dir, *TINY, "--json")
    assert code == 0, err
    first = last_json(out)
    assert first["reused"] is False and first["recipe"] == "rtn-w4-g64"
    assert {"config.json", "model.safetensors", "effspec.json", "results.db"} <= set(p.name for p in out_dir.iterdir())
    assert first["bits_per_param"] < 12 and first["linear_bits_per_param"] == pytest.approx(4.25)  # 4 bits + fp16 scale/64
    assert leftovers(tmp_path) == []

    # the saved directory loads again as a MODEL, with its packed layers
    code, out, err = cli("load-check", out_dir, "--json")
    assert code == 0, err
    loaded = last_json(out)
    assert loaded["packed_layers"] == 14  # 2 blocks x (q, k, v, o, gate, up, down)
    assert loaded["stored_bytes"] == first["stored_bytes"]

    # the same run again: reused, same figures, nothing rewritten
    before = snapshot(out_dir)
    code, out, err = cli("run", "rtn-w4-g64", "--model", "tiny-llama", "--data", text, "--out", out_dir, *TINY, "--json")
    assert code == 0, err
    again = last_json(out)
    assert again["reused"] is True and again["perplexity"] == first["perplexity"] and again["key"] == first["key"]
    assert snapshot(out_dir) == before

    # another recipe into the same directory: refused without --force, directory unchanged
    code, out, err = cli("run", "rtn-w8", "--model", "tiny-llama", "--data", text, "--out", out_dir, *TINY, "--json")
    assert "--force" in assert_user_error(code, err)
    assert snapshot(out_dir) == before

    # with --force: replaced by the new result
    code, out, err = cli("run", "rtn-w8", "--model", "tiny-llama", "--data", text, "--out", out_dir, *TINY, "--json",
                         "--force")
    assert code == 0, err
    forced = last_json(out)
    assert forced["reused"] is False and forced["recipe"] == "rtn-w8"
    assert json.loads((out_dir / "effspec.json").read_text())["recipe"] == "rtn-w8"
    assert [r["recipe"] for r in Store(out_dir / "results.db").rows()] == ["rtn-w8"]
    assert leftovers(tmp_path) == []


def test_run_force_never_replaces_a_directory_effspec_did_not_write(cli, text, tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    (mine / "sub").mkdir()
    (mine / "sub" / "data.bin").write_bytes(b"\x00\x01")
    before = snapshot(mine)
    for extra in ([], ["--force"]):
        code, _, err = cli("run", "rtn-w8", "--model", "tiny-llama", "--data", text, "--out", mine, *TINY, *extra)
        assert_user_error(code, err)
        assert snapshot(mine) == before
    assert leftovers(tmp_path) == []


def test_run_into_a_spectrum_directory_does_not_claim_a_saved_model(cli, text, tmp_path: Path) -> None:
    out_dir = tmp_path / "sweep"
    code, _, err = cli("spectrum", "--recipes", "rtn-w8", "--model", "tiny-llama", "--data", text, "--out", out_dir, *TINY)
    assert code == 0, err
    code, out, err = cli("run", "rtn-w8", "--model", "tiny-llama", "--data", text, "--out", out_dir, *TINY, "--json")
    assert code == 2 or (out_dir / "config.json").is_file(), out


# ---- spectrum -------------------------------------------------------------------------------------
def test_spectrum_writes_the_report_and_resumes(cli, text, tmp_path: Path) -> None:
    out_dir = tmp_path / "spectrum"
    args = ("spectrum", "--recipes", "baseline", "rtn-w8", "magnitude-2of4", "--model", "tiny-llama", "--data", text,
            "--out", out_dir, *TINY, "--json")
    code, out, err = cli(*args)
    assert code == 0, err
    for name in ("report.md", "report.html", "results.csv", "ppl_vs_size.png", "ppl_vs_decode.png", "results.db"):
        assert (out_dir / name).is_file() and (out_dir / name).stat().st_size > 0, name
    assert (out_dir / "ppl_vs_size.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = Store(out_dir / "results.db").rows()
    assert sorted(r["recipe"] for r in rows) == ["baseline", "magnitude-2of4", "rtn-w8"]
    by_name = {r["recipe"]: r for r in rows}
    assert by_name["magnitude-2of4"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert by_name["rtn-w8"]["stored_bytes"] < by_name["baseline"]["stored_bytes"]
    assert "stored" not in err
    with open(out_dir / "results.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert sorted(r["recipe"] for r in csv_rows) == ["baseline", "magnitude-2of4", "rtn-w8"]
    summary = last_json(out)
    assert summary["failed"] == [] and len(summary["rows"]) == 3

    code, out, err = cli(*args)
    assert code == 0, err
    assert err.count("(stored)") == 3
    assert len(Store(out_dir / "results.db").rows()) == 3


def test_spectrum_out_is_a_file(cli, text, tmp_path: Path) -> None:
    target = tmp_path / "results.txt"
    target.write_text("not a directory")
    code, _, err = cli("spectrum", "--recipes", "baseline", "--model", "tiny-llama", "--data", text, "--out", target, *TINY)
    assert_user_error(code, err)
    assert target.read_text() == "not a directory"


def test_spectrum_into_a_saved_model_keeps_it_loadable(cli, text, tmp_path: Path) -> None:
    model_dir = tmp_path / "w8"
    code, _, err = cli("run", "rtn-w8", "--model", "tiny-llama", "--data", text, "--out", model_dir, *TINY)
    assert code == 0, err
    code, out, _ = cli("load-check", model_dir, "--json")
    before = last_json(out)
    assert before["packed_layers"] == 14
    cli("spectrum", "--recipes", "baseline", "--model", "tiny-llama", "--data", text, "--out", model_dir, *TINY)
    code, out, _ = cli("load-check", model_dir, "--json")
    after = last_json(out)
    assert (after["packed_layers"], after["stored_bytes"]) == (before["packed_layers"], before["stored_bytes"])


# ---- generate -------------------------------------------------------------------------------------
def test_generate_json(cli) -> None:
    from effspec.models import load_model

    code, out, err = cli("generate", "tiny-llama", "--prompt", "hi", "--max-new-tokens", "5", "--json")
    assert code == 0, err
    rec = last_json(out)
    assert set(rec) >= {"text", "new_tokens", "decode_tokens_per_s", "kv_cache_bytes", "acceptance_rate"}
    assert rec["new_tokens"] == 5
    assert len(rec["text"].encode()) == 5  # byte tokenizer: one byte per token
    assert out.splitlines()[0] == "hi" + rec["text"]
    assert rec["decode_tokens_per_s"] > 0
    cfg = load_model("tiny-llama").model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    cached = 2 + 5 - 1  # the prompt and every generated token but the last went through the cache
    assert rec["kv_cache_bytes"] == cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * cached * 4


# ---- errors: exit 2, one line, no traceback -------------------------------------------------------
def _recipe(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text(body)
    return str(path)


ERROR_CASES = {
    "unknown-model": (lambda t, d: ["eval", "no-such-model", "--data", d, *TINY], "no-such-model"),
    "unknown-data": (lambda t, d: ["eval", "tiny-llama", "--data", str(t / "missing.txt"), *TINY], "missing.txt"),
    "malformed-recipe": (lambda t, d: ["run", _recipe(t, "bad.yaml", "steps:\n  - rtn: {bits: 4\nmeasure: [size]\n"),
                                       "--model", "tiny-llama", "--data", d, "--out", str(t / "out"), *TINY],
                         "bad.yaml:3: malformed YAML"),
    "bits-5": (lambda t, d: ["run", _recipe(t, "b5.yaml", "name: b5\nsteps:\n  - rtn: {bits: 5}\n"),
                             "--model", "tiny-llama", "--data", d, "--out", str(t / "out"), *TINY],
               "b5.yaml:3: steps[0].rtn.bits"),
    "group-48": (lambda t, d: ["run", _recipe(t, "g48.yaml", "steps:\n  - rtn: {bits: 4, group_size: 48}\n"),
                               "--model", "tiny-llama", "--data", d, "--out", str(t / "out"), *TINY],
                 "group_size=48 does not divide the input width 64"),
    "seqlen-too-long": (lambda t, d: ["eval", "tiny-llama", "--data", d, "--windows", "1", "--seqlen", "2048",
                                      "--prompt-tokens", "8", "--new-tokens", "4", "--prefill-tokens", "32", "--runs", "1"],
                        "1024"),
    "too-many-windows": (lambda t, d: ["eval", "tiny-llama", "--data", d, "--windows", "100", "--seqlen", "64"], "windows"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_user_errors_exit_2_with_one_line(cli, text, tmp_path: Path, case: str) -> None:
    argv, fragment = ERROR_CASES[case]
    code, out, err = cli(*argv(tmp_path, text))
    line = assert_user_error(code, err)
    assert fragment in line
    assert not (tmp_path / "out").exists()  # a failed run leaves no output behind
    assert leftovers(tmp_path) == []


def test_debug_lets_the_error_propagate(cli) -> None:
    with pytest.raises(UserError, match="no-such-model"):
        main(["load-check", "no-such-model", "--debug"])


def test_global_flags_before_the_command_are_honoured(cli) -> None:
    with pytest.raises(UserError, match="no-such-model"):
        main(["--debug", "load-check", "no-such-model"])


def test_calibration_flags_override_the_recipe_and_enter_the_key(tmp_path):
    from effspec.cli import _with_calibration_flags, build_parser
    from effspec.recipe import load_recipe

    rec = load_recipe("gptq-w4-g64")
    args = build_parser().parse_args(["run", "x.yaml", "--model", "m", "--data", "d", "--out", "o",
                                      "--calib-samples", "3", "--calib-seqlen", "64"])
    changed = _with_calibration_flags(rec, args)
    assert (changed.calibration.samples, changed.calibration.seqlen) == (3, 64)
    assert changed.hash != rec.hash
    same = build_parser().parse_args(["run", "x.yaml", "--model", "m", "--data", "d", "--out", "o"])
    assert _with_calibration_flags(rec, same) is rec


@pytest.mark.parametrize("spec", ["lookup", "self:1", "draft:tiny-qwen2"])
def test_generate_speculate_gives_the_plain_greedy_text(cli, spec) -> None:
    args = ("generate", "tiny-llama", "--prompt", "abcabcabc", "--max-new-tokens", "12", "--json")
    code, out, err = cli(*args)
    assert code == 0, err
    plain = last_json(out)
    code, out, err = cli(*args, "--speculate", spec)
    assert code == 0, err
    rec = last_json(out)
    assert rec["text"] == plain["text"] and 0 <= rec["acceptance_rate"] <= 1


@pytest.mark.parametrize("spec", ["self:2", "self:x", "nope", "draft:"])
def test_generate_speculate_rejects_bad_drafts(cli, spec) -> None:
    code, _, err = cli("generate", "tiny-llama", "--prompt", "ab", "--speculate", spec)
    assert code == 2 and "--speculate" in err and len(err.strip().splitlines()) == 1


def test_generate_chat_needs_a_chat_template(cli) -> None:
    code, _, err = cli("generate", "tiny-llama", "--prompt", "ab", "--chat")
    assert "--chat: this tokenizer has no chat template" in assert_user_error(code, err)


def test_generate_with_two_drafts_is_greedy_only(cli) -> None:
    args = ("generate", "tiny-llama", "--prompt", "abcabcabc", "--max-new-tokens", "12", "--json")
    code, out, err = cli(*args)
    plain = last_json(out)
    code, out, err = cli(*args, "--speculate", "lookup", "--speculate", "self:1")
    assert code == 0, err
    assert last_json(out)["text"] == plain["text"]
    for more in (("--temperature", "0.7"), ("--stop", "c")):
        code, _, err = cli(*args, "--speculate", "lookup", "--speculate", "self:1", *more)
        assert "several --speculate drafts" in assert_user_error(code, err)
    code, _, err = cli(*args, "--speculate", "lookup", "--speculate", "self:9")
    assert "--speculate 'self:9'" in assert_user_error(code, err)


def test_generate_with_a_draft_vocabulary_gives_the_plain_greedy_text(cli, tmp_path) -> None:
    text = tmp_path / "words.txt"
    text.write_text("zzzz yyyy xxxx " * 50)  # a vocabulary far from the model's output: proposals mostly wrong
    args = ("generate", "tiny-llama", "--prompt", "abcabcabc", "--max-new-tokens", "12", "--json")
    code, out, err = cli(*args)
    assert code == 0, err
    plain = last_json(out)
    code, out, err = cli(*args, "--speculate", "self:1", "--draft-vocab", "3", "--draft-vocab-data", str(text))
    assert code == 0, err
    assert last_json(out)["text"] == plain["text"]
    for bad in (("--speculate", "lookup", "--draft-vocab", "8"), ("--speculate", "self:1", "--draft-vocab", "-1"),
                ("--draft-vocab", "8")):
        code, _, err = cli("generate", "tiny-llama", "--prompt", "ab", *bad)
        assert code == 2 and "--draft-vocab" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli("generate", "tiny-llama", "--prompt", "ab", "--speculate", "self:1", "--draft-vocab", "8",
                       "--draft-vocab-data", str(tmp_path / "missing.txt"))
    assert code == 2 and len(err.strip().splitlines()) == 1


def _first_change(text: str) -> str:
    """Two characters where the text changes, so a stop string cuts it somewhere in the middle."""
    i = next((i for i in range(len(text) - 1) if text[i] != text[i + 1]), 0)
    return text[i:i + 2]


@pytest.mark.parametrize("speculate", [(), ("--speculate", "lookup")])
def test_generate_streams_and_stops_at_a_stop_string(cli, speculate) -> None:
    args = ("generate", "tiny-llama", "--prompt", "the cat sat", "--max-new-tokens", "20", *speculate)
    code, out, err = cli(*args, "--json")
    assert code == 0, err
    plain = last_json(out)["text"]
    code, out, err = cli(*args)
    assert code == 0, err
    assert out == "the cat sat" + plain + "\n"  # streamed, no JSON line
    stop = _first_change(plain)
    cut = plain[: plain.index(stop)]
    code, out, err = cli(*args, "--stop", stop, "--stop", "never")
    assert code == 0, err
    assert out == "the cat sat" + cut + "\n"
    code, out, err = cli(*args, "--stop", stop, "--json")
    rec = last_json(out)
    assert rec["text"] == cut and rec["new_tokens"] == len(cut.encode()) + 2  # through the stop string's last byte


@pytest.mark.parametrize("speculate", [(), ("--speculate", "self:1")])
def test_generate_sampling_is_seeded(cli, speculate) -> None:
    args = ("generate", "tiny-llama", "--prompt", "the cat sat", "--max-new-tokens", "16", "--json", *speculate)
    runs = []
    for seed in ("1", "1", "2"):
        code, out, err = cli(*args, "--temperature", "1.5", "--top-p", "0.95", "--top-k", "100", "--seed", seed)
        assert code == 0, err
        runs.append(last_json(out))
    assert runs[0]["text"] == runs[1]["text"] != runs[2]["text"]
    if speculate:
        assert 0 <= runs[0]["acceptance_rate"] <= 1
    code, out, err = cli(*args)
    greedy_text = last_json(out)["text"]
    code, out, err = cli(*args, "--temperature", "2", "--top-k", "1", "--seed", "0")
    assert last_json(out)["text"] == greedy_text


@pytest.mark.parametrize("flag, value", [("--temperature", "-1"), ("--temperature", "nan"), ("--top-p", "0"),
                                         ("--top-p", "1.5"), ("--top-k", "-1"), ("--stop", "")])
def test_generate_rejects_bad_sampling_values(cli, flag, value) -> None:
    code, out, err = cli("generate", "tiny-llama", "--prompt", "ab", flag, value)
    line = assert_user_error(code, err)
    assert line.startswith(f"effspec: error: {flag} ") and out == ""


def test_generate_with_a_compressed_kv_cache(cli) -> None:
    code, out, err = cli("generate", "tiny-llama", "--prompt", "hello there", "--max-new-tokens", "12", "--json")
    plain = last_json(out)
    code, out, err = cli("generate", "tiny-llama", "--prompt", "hello there", "--max-new-tokens", "12", "--json",
                         "--kv-cache", "streaming:window=8,sinks=2")
    assert code == 0, err
    rec = last_json(out)
    assert rec["new_tokens"] == 12 and rec["kv_cache_bytes"] < plain["kv_cache_bytes"]
    code, out, err = cli("generate", "tiny-llama", "--prompt", "hello there", "--max-new-tokens", "12", "--json",
                         "--kv-cache", "h2o:1.0")
    assert last_json(out)["text"] == plain["text"]  # a full budget keeps every token: the same greedy text


@pytest.mark.parametrize("argv, message", [
    (["--kv-cache", "lru:4"], "unknown KV cache 'lru'"),
    (["--kv-cache", "kivi:bitz=2"], "unknown parameter 'bitz'"),
    (["--kv-cache", "kivi:4", "--speculate", "lookup"], "cannot be combined"),
])
def test_generate_rejects_bad_kv_caches(cli, argv, message) -> None:
    code, out, err = cli("generate", "tiny-llama", "--prompt", "ab", *argv)
    assert message in assert_user_error(code, err)


def test_long_ppl_compares_caches_with_the_uncompressed_one(cli, text) -> None:
    code, out, err = cli("long-ppl", "tiny-llama", "--data", text, "--tokens", "200", "--chunk", "16",
                         "--kv-cache", "kivi:bits=8,group=8,residual=16", "--kv-cache", "streaming:window=32",
                         "--bin", "100", "--json")
    assert code == 0, err
    rows = last_json(out)["rows"]
    assert [r["cache"] for r in rows] == ["uncompressed", "kivi:bits=8,group=8,residual=16", "streaming:window=32"]
    assert all(r["tokens"] == 199 and len(r["by_position"]) == 2 for r in rows)
    assert abs(rows[1]["ppl_delta_pct"]) < 1 and rows[1]["bytes_ratio"] < 0.6
    assert rows[2]["final_cache_bytes"] < rows[0]["final_cache_bytes"]
    code, out, err = cli("long-ppl", "tiny-llama", "--data", text, "--tokens", "999999")
    assert "fewer than --tokens" in assert_user_error(code, err)


def test_train_draft_then_generate_with_the_eagle_head(cli, text, tmp_path) -> None:
    head = tmp_path / "eagle"
    code, out, err = cli("train-draft", "tiny-llama", "--data", text, "--out", head, "--steps", "3", "--seqlen", "32",
                         "--batch-size", "2", "--vocab", "20", "--json")
    assert code == 0, err
    rec = last_json(out)
    assert rec["steps"] == 3 and (head / "eagle.safetensors").stat().st_size < 1_000_000  # no copy of the model
    args = ("generate", "tiny-llama", "--prompt", "abcabcabc", "--max-new-tokens", "12", "--json")
    code, out, err = cli(*args)
    plain = last_json(out)
    code, out, err = cli(*args, "--speculate", f"eagle:{head}")
    assert code == 0, err
    assert last_json(out)["text"] == plain["text"]
    code, out, err = cli(*args, "--speculate", "lookup", "--speculate", f"eagle:{head}")  # one tree, both drafts
    assert code == 0, err
    assert last_json(out)["text"] == plain["text"]
    before = snapshot(head)
    code, _, err = cli("train-draft", "tiny-llama", "--data", text, "--out", head, "--steps", "2")
    assert "already exists" in assert_user_error(code, err) and snapshot(head) == before
    for bad in (("--steps", "0"), ("--instructions", text), ("--own-answers", "4")):
        code, _, err = cli("train-draft", "tiny-llama", "--data", text, "--out", tmp_path / "x", *bad)
        assert_user_error(code, err)
    for spec in (f"eagle:{tmp_path / 'missing'}", f"eagle:{tmp_path}"):
        code, _, err = cli(*args, "--speculate", spec)
        assert "--speculate eagle:" in assert_user_error(code, err)
    code, _, err = cli("generate", "tiny-qwen2", "--prompt", "ab", "--speculate", f"eagle:{head}")
    assert "model_type" in assert_user_error(code, err)


def test_train_draft_on_the_models_own_answers_too(cli, tmp_path) -> None:
    records = tmp_path / "instr.json"
    records.write_text(json.dumps([{"instruction": f"Say {w} twice.", "output": "x"} for w in ("yes", "no", "hello")]))
    rows = []
    for extra in ((), ("--own-answers", "32")):
        code, out, err = cli("train-draft", "tiny-llama", "--instructions", records, *extra, "--out",
                             tmp_path / f"eagle{len(extra)}", "--steps", "2", "--seqlen", "16", "--batch-size", "2",
                             "--vocab", "0", "--json")
        assert code == 0, err
        rows.append(last_json(out)["rows"])
    assert rows[1] >= rows[0] + 3 * 32 // 16 - 1  # three answers of 32 tokens (no end-of-text from random weights)
    code, _, err = cli("train-draft", "tiny-llama", "--instructions", records, "--own-answers", "-1", "--out",
                       tmp_path / "x")
    assert "--own-answers" in assert_user_error(code, err)
