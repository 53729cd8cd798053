"""End to end on the real builtin model: GGUF -> float32 -> cached; the model's own grid is lossless.

smollm2-135m's weights came from a Q4_1 GGUF (4-bit, asymmetric, blocks of 32),
so rtn w4 g32 asymmetric must reproduce the float model's perplexity; anything
more means grouping or packing is wrong (shared/FACTS.md).
"""

import json
from pathlib import Path

import pytest

from effspec.cli import main

WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw"
FLAGS = ["--windows", "2", "--seqlen", "256", "--prompt-tokens", "16", "--new-tokens", "4",
         "--prefill-tokens", "64", "--runs", "1", "--json"]


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.slow
def test_smollm2_end_to_end(tmp_path, capsys):
    pytest.importorskip("gguf")
    from effspec.models import smollm2_gguf_path

    smollm2_gguf_path()  # a clear error if the package is missing (the set-up installs it)
    data = str(WIKITEXT) if WIKITEXT.is_dir() else "stdlib-docs"
    assert main(["load-check", "smollm2-135m", "--json"]) == 0
    info = _last_json(capsys)
    assert (info["params"], info["layers"], info["hidden_size"]) == (134515008, 30, 576)
    assert main(["eval", "smollm2-135m", "--data", data, "--measure", "perplexity,size", *FLAGS]) == 0
    base = _last_json(capsys)
    assert 5 < base["perplexity"] < 200 and base["stored_bytes"] == 4 * 134515008
    assert main(["run", "rtn-w4-g32-asym", "--model", "smollm2-135m", "--data", data,
                 "--out", str(tmp_path / "w4"), *FLAGS]) == 0
    w4 = _last_json(capsys)
    assert abs(w4["perplexity"] / base["perplexity"] - 1) < 0.005
    assert w4["linear_bits_per_param"] == pytest.approx(5.0)
    assert main(["eval", str(tmp_path / "w4"), "--data", data, "--measure", "perplexity", *FLAGS]) == 0
    assert _last_json(capsys)["perplexity"] == pytest.approx(w4["perplexity"], rel=1e-6)
