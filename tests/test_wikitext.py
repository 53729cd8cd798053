"""lm-eval's wikitext task: document split, detokenizer, rolling windows, and the figures against a plain reference."""

import math
import re
from pathlib import Path

import pytest
import torch

from effspec.errors import UserError
from effspec.measure import wikitext
from effspec.measure.tasks import evaluate_tasks
from effspec.measure.wikitext import detokenize, documents, evaluate_wikitext, rolling_windows
from effspec.models import load_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

RAW = (" \n = Alpha = \n \n Alpha is a letter @-@ like sign , used in 1 @,@ 000 places . \n \n"
       " = = History = = \n \n It came ( first ) from \" Greece \" . \n"
       " = Beta = \n \n Beta 's shape is 2 @.@ 5 times wider ; maybe . \n \n")


def test_documents_split_at_level_one_headings():
    pages = documents(RAW)
    assert len(pages) == 2  # "= = History = =" is a section, not a new page
    assert pages[0].startswith(" = Alpha = \n") and "= = History = =" in pages[0]
    assert pages[1].startswith(" = Beta = \n") and pages[1].endswith("maybe . \n \n")
    assert " \n" + "\n".join(pages) == RAW  # only the blank page before the first heading is dropped


def test_documents_of_the_real_test_split():
    path = DATA / wikitext.FILE
    if not path.is_file():
        pytest.skip(f"{path} is not here")
    pages = documents(path.read_text(encoding="utf-8"))
    assert len(pages) == 62  # EleutherAI/wikitext_document_level, wikitext-2-raw-v1, test
    assert pages[0].startswith(" = Robert Boulter = \n")


def test_detokenize_undoes_wikitext_spacing():
    assert detokenize(" = = History = = \n It came ( first ) from \" Greece \" , 1 @,@ 000 @-@ odd ; 2 @.@ 5 . \n") == \
        " == History ==\nIt came (first) from \"Greece\", 1,000-odd; 2.5.\n"
    assert detokenize("at 5 \u00b0 C the dogs ' bowls") == "at 5\u00b0C the dogs' bowls"
    assert detokenize("a ' quoted ' word , and Beta 's") == "a 'quoted' word, and Beta's"


@pytest.mark.parametrize("n", [1, 5, 8, 9, 17, 30])
def test_rolling_windows_predict_every_token_once_with_the_longest_context(n):
    tokens, m, prefix = list(range(100, 100 + n)), 8, -1
    seen = []
    for inputs, k in rolling_windows(tokens, prefix, m):
        assert 1 <= k <= len(inputs) <= m
        for j in range(len(inputs) - k, len(inputs)):  # position j predicts the token after inputs[:j + 1]
            target = len(seen)
            seen.append(target)
            want = ([prefix] + tokens[:target])[-(j + 1):]
            assert inputs[: j + 1] == want, (n, target)
    assert seen == list(range(n))


def _reference_ll(model, tokens, prefix, m):
    """Block by block: block [s, e) is read from one forward of the m prefixed tokens that end at e."""
    prefixed, total = [prefix] + tokens, 0.0
    for s in range(0, len(tokens), m):
        e = min(s + m, len(tokens))
        x = torch.tensor(prefixed[max(0, e - m) : e])[None]
        with torch.no_grad():
            logp = torch.log_softmax(model(x).logits[0].double(), -1)
        for t in range(s, e):
            total += logp[x.shape[1] - (e - t), tokens[t]].item()
    return total


def test_evaluate_wikitext_matches_reference(tmp_path, monkeypatch):
    loaded = load_model("tiny-llama")
    model, tok = loaded.model, loaded.tokenizer
    model.config.max_position_embeddings = 48  # several windows per page
    monkeypatch.setattr(wikitext, "HEAD_CHUNK", 7)  # the head in uneven chunks
    (tmp_path / "wikitext-2-raw").mkdir()
    (tmp_path / wikitext.FILE).write_text(RAW, encoding="utf-8")
    r = evaluate_wikitext(model, tok, tmp_path)
    pages = documents(RAW)
    prefix = tok.eos_token_id  # tiny-llama has no BOS: lm-eval falls back to EOS
    want = sum(_reference_ll(model, list(tok(detokenize(p))["input_ids"]), prefix, 48) for p in pages)
    assert r.documents == 2 and r.tokens == sum(len(tok(detokenize(p))["input_ids"]) for p in pages)
    assert r.loglikelihood == pytest.approx(want, rel=1e-5)
    words = sum(len(re.split(r"\s+", p)) for p in pages)
    size = sum(len(p.encode("utf-8")) for p in pages)
    assert (r.words, r.bytes) == (words, size)
    assert r.word_perplexity == pytest.approx(math.exp(-want / words), rel=1e-5)
    assert r.bits_per_byte == pytest.approx(-want / size / math.log(2), rel=1e-5)
    assert r.byte_perplexity == pytest.approx(2 ** r.bits_per_byte, rel=1e-9)

    results = evaluate_tasks(model, tok, ["wikitext"], tmp_path)  # the task name routes here
    assert results["wikitext"].word_perplexity == pytest.approx(r.word_perplexity, rel=1e-9)
    assert results["wikitext"].acc is None and results["wikitext"].n == 2


def test_missing_wikitext_file_is_a_user_error(tmp_path):
    loaded = load_model("tiny-llama")
    with pytest.raises(UserError, match="wiki.test.raw"):
        evaluate_wikitext(loaded.model, loaded.tokenizer, tmp_path)


def test_cli_eval_reports_wikitext_apart_from_accuracy(tmp_path, capsys):
    import json

    from effspec.cli import main

    (tmp_path / "wikitext-2-raw").mkdir()
    (tmp_path / wikitext.FILE).write_text(RAW, encoding="utf-8")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("abc def ghi jkl\n" * 60)
    code = main(["eval", "tiny-llama", "--data", str(corpus), "--windows", "1", "--seqlen", "32", "--measure",
                 "perplexity", "--tasks", "wikitext", "--tasks-dir", str(tmp_path), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    rec = json.loads(out.strip().splitlines()[-1])
    assert rec["wikitext_n"] == 2 and rec["wikitext_word_perplexity"] > 1
    assert rec["wikitext_byte_perplexity"] == pytest.approx(2 ** rec["wikitext_bits_per_byte"])
    assert "tasks_avg_acc" not in rec and "acc_wikitext" not in rec  # no accuracy to average
