"""Zero-shot tasks: lm-eval's prompts on real records, scoring against a plain reference loop, metrics by hand."""

import json
import math
from pathlib import Path

import pytest
import torch

from effspec.errors import UserError
from effspec.measure import tasks
from effspec.measure.tasks import Example, evaluate_tasks, load_task, score_choices, score_examples
from effspec.models import load_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def data() -> Path:
    if not (DATA / "MANIFEST.md").is_file():
        pytest.skip(f"{DATA} (the shared task data) is not here")
    return DATA


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama")


def _same(choices, ex: Example):
    return list(zip(ex.contexts, ex.continuations)) == choices


# ---- loaders on real records (what lm-eval 0.4.x feeds the model for them) ----------------------
def test_hellaswag_renders_like_lm_eval(data):
    examples = load_task("hellaswag", data)
    assert len(examples) == 10042
    first = examples[0]  # ActivityNet: ctx_b "he" capitalized, as lm-eval's process_docs does
    ctx = "Roof shingle removal: A man is sitting on a roof. He"
    assert _same([(ctx, " is using wrap to wrap a pair of skis."), (ctx, " is ripping level tiles off."),
                  (ctx, " is holding a rubik's cube."), (ctx, " starts pulling up roofing on a roof.")], first)
    assert first.gold == 3
    wikihow = examples[3243]  # ends a sentence: ctx_b is empty, nothing capitalized
    assert wikihow.contexts[0].startswith("Personal Care and Style: How to become a fashion consultant. Obtain your")
    assert wikihow.contexts[0].endswith("foundational concepts in fashion.") and wikihow.gold == 3
    assert wikihow.continuations[3] == " Earn a bachelor's degree in a fashion-related field. Degrees for the fashion " \
                                       "industry include art, fashion merchandising, and marketing."
    bracket = examples[3505]  # lm-eval drops every [...], here "[www.kiddio.org]"
    assert "Visit a site like to find loads of creative activities" in bracket.contexts[0]
    assert "[" not in bracket.contexts[0] and bracket.gold == 1


def test_piqa_arc_boolq_render_like_lm_eval(data):
    piqa = load_task("piqa", data)
    assert len(piqa) == 1838
    assert piqa[0].contexts == ("Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:",) * 2
    assert piqa[0].continuations[0].startswith(" Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper")
    assert piqa[0].gold == 0
    assert _same([("Question: dresser\nAnswer:", " replace drawer with bobby pin "),  # spaces kept as in the data
                  ("Question: dresser\nAnswer:", " finish, woodgrain with  bobby pin ")], piqa[1])
    assert piqa[1].gold == 1

    arc = load_task("arc_easy", data)
    assert len(arc) == 2376
    q = "Question: Which statement best explains why photosynthesis is the foundation of most food webs?\nAnswer:"
    assert arc[0].contexts == (q,) * 4 and arc[0].gold == 0
    assert arc[0].continuations == (" Sunlight is the source of energy for nearly all ecosystems.",
                                    " Most ecosystems are found on land instead of in water.",
                                    " Carbon dioxide is more available than other gases.",
                                    " The producers in all ecosystems are plants.")
    padded = arc[93]  # MosaicML repeated "decrease" to make 4 choices; lm-eval has 3 and gold moves from 2 to 1
    assert padded.continuations == (" decrease", " increase", " remain the same") and padded.gold == 1

    boolq = load_task("boolq", data)
    assert len(boolq) == 3270
    ctx = boolq[0].contexts[0]
    assert ctx.startswith("Ethanol fuel -- All biomass goes through at least some of these steps")  # SuperGLUE's title --
    assert ctx.endswith("than producing gasoline.\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert boolq[0].continuations == (" no", " yes") and boolq[0].gold == 0


def test_winogrande_and_lambada_render_like_lm_eval(data):
    wino = load_task("winogrande", data)
    assert len(wino) == 1267
    assert wino[0].contexts == ("Sarah was a much better surgeon than Maria so Sarah",
                                "Sarah was a much better surgeon than Maria so Maria")
    assert wino[0].continuations == (" always got the easier cases.",) * 2 and wino[0].gold == 1  # answer "2"

    lam = load_task("lambada_openai", data)
    assert len(lam) == 5153
    assert lam[0].contexts[0].endswith("his mouth curved in a confident grin, I don't care about")
    assert lam[0].continuations == (" signs",) and lam[0].gold == 0
    # lm-eval splits the text on " " only, so a last "word" may start with newlines
    assert lam[4462].contexts[0].endswith("She raised her brows when she returned and saw the")
    assert lam[4462].continuations == (" \n\nrecorder",)


def test_hub_records_render_like_lm_eval(monkeypatch):
    wikihow = {  # a raw hub record: lm-eval's process_docs strips first, so a leading tag leaves a space
        "activity_label": "Education and Communications",
        "ctx_a": "[header] How to make a liquid into a solid [title] Place a small open container of water in the freezer. "
                 "[title] Remove from the freezer and note what has occurred.",
        "ctx_b": "", "label": "0",
        "endings": ["[step] Water changes state from liquid to solid.", "It boils. [substeps] Be careful.", "x", "y"]}
    rows = {"Rowan/hellaswag": [wikihow],
            "aps/super_glue": [{"question": "is it", "passage": "Title -- Text.", "idx": 0, "label": 1}],
            "EleutherAI/lambada_openai": [{"text": "one two  three"}]}
    fake = type("datasets", (), {"load_dataset": staticmethod(lambda path, name=None, split=None: rows[path])})
    monkeypatch.setitem(__import__("sys").modules, "datasets", fake)
    monkeypatch.delenv(tasks.TASKS_DIR_ENV, raising=False)
    ex = load_task("hellaswag")[0]
    assert ex.contexts[0] == ("Education and Communications: How to make a liquid into a solid. Place a small open "
                              "container of water in the freezer.. Remove from the freezer and note what has occurred.")
    assert ex.continuations[:2] == ("  Water changes state from liquid to solid.", " It boils. Be careful.")
    assert load_task("boolq")[0] == Example(("Title -- Text.\nQuestion: is it?\nAnswer:",) * 2, (" no", " yes"), 1)
    assert load_task("lambada_openai")[0] == Example(("one two ",), (" three",), 0)  # split on single spaces


def test_split_ctx_recovers_ctx_b():
    assert tasks.split_ctx("A man is sitting on a roof. he") == ("A man is sitting on a roof.", "he")
    assert tasks.split_ctx("He waves. The man then") == ("He waves.", "The man then")
    assert tasks.split_ctx("Wash the dog. Dry it.") == ("Wash the dog. Dry it.", "")
    assert tasks.split_ctx("the man") == ("", "the man")


def test_limit_is_a_fixed_seeded_subset(data):
    full = load_task("winogrande", data)
    a, b = load_task("winogrande", data, limit=20), load_task("winogrande", data, limit=20)
    assert a == b and len(a) == 20
    other = load_task("winogrande", data, limit=20, seed=1)
    assert other != a and len(other) == 20
    idx = tasks.subset(len(full), 20)
    assert idx == sorted(idx) and [full[i] for i in idx] == a
    assert load_task("winogrande", data, limit=10**6) == full


# ---- scoring against a plain reference ----------------------------------------------------------
def reference(model, tokenizer, ex: Example) -> list[tuple[float, bool]]:
    """Each choice alone: one full forward of context + continuation, no cache, no packing."""
    out = []
    for context, continuation in zip(ex.contexts, ex.continuations):
        ctx_ids, cont_ids = tasks.encode_pair(tokenizer, context, continuation)
        ids = torch.tensor([ctx_ids + cont_ids])
        with torch.no_grad():
            logits = model(ids[:, :-1], use_cache=False).logits[0, -len(cont_ids):]
        logp = torch.log_softmax(logits.double(), -1)
        target = torch.tensor(cont_ids)
        out.append((logp[torch.arange(len(cont_ids)), target].sum().item(), bool((logits.argmax(-1) == target).all())))
    return out


SYNTHETIC = [
    Example(("The cat sat on the",) * 3, (" mat.", " hat", " moon and the stars"), 0),
    Example(("Ann gave Bob a book so Ann", "Ann gave Bob a book so Bob"), (" was kind.",) * 2, 0),  # contexts differ
    Example(("Question: 2+2?\nAnswer: ",) * 2, (" 4", "four"), 1),  # a trailing space moves to the continuation
    Example(("",), (" Hello world",), 0),  # empty context: conditioned on the EOS/BOS token
    Example(("Answer:",) * 2, (" yes", " yes please"), 1),  # one continuation is a prefix of the other
]


def test_score_choices_matches_reference(tiny):
    for ex in SYNTHETIC:
        got, want = score_choices(tiny.model, tiny.tokenizer, ex), reference(tiny.model, tiny.tokenizer, ex)
        assert [g for _, g in got] == [g for _, g in want]
        for (a, _), (b, _) in zip(got, want):
            assert a == pytest.approx(b, abs=1e-4)


def test_batched_examples_match_reference(tiny):
    for batch in (0, 64, 4096):  # one example per forward, a few (left-padded), all at once
        got = score_examples(tiny.model, tiny.tokenizer, SYNTHETIC, batch_tokens=batch)
        for ex, scores in zip(SYNTHETIC, got):
            want = reference(tiny.model, tiny.tokenizer, ex)
            assert [s[0] for s in scores] == pytest.approx([s[0] for s in want], abs=1e-4)
            assert [s[1] for s in scores] == [s[1] for s in want]


def test_encode_pair_follows_lm_eval(tiny):
    tok = tiny.tokenizer  # bytes: one token per character
    assert tasks.encode_pair(tok, "ab ", "c") == ([97, 98], [32, 99])
    assert tasks.encode_pair(tok, "", "hi") == ([tok.eos_token_id], [104, 105])


class _BosTokenizer:
    """A Llama-style tokenizer in miniature: one id per byte, BOS (id 1) first unless told not to."""

    bos_token, bos_token_id, eos_token_id = "<s>", 1, 2

    def __call__(self, text, add_special_tokens=True):
        if text.startswith(self.bos_token):
            ids, text = [self.bos_token_id], text[len(self.bos_token):]
        else:
            ids = [self.bos_token_id] if add_special_tokens else []
        return {"input_ids": ids + list(text.encode())}


def test_encode_keeps_the_tokenizers_bos_as_lm_eval_does():
    tok = _BosTokenizer()
    # lm-eval's tok_encode uses the tokenizer's default: the context starts with BOS, the continuation does not
    assert tasks.encode_pair(tok, "ab ", "c") == ([1, 97, 98], [32, 99])
    assert tasks.encode_pair(tok, "", "hi") == ([1], [1, 104, 105])  # empty context: the prefix token, then tok_encode
    assert tasks.encode(tok, "<s>ab") == [1, 97, 98]  # already starts with BOS: not added twice


def _write_piqa(root: Path, rows: list[tuple[str, str, str, int]]):
    (root / "piqa").mkdir(parents=True)
    with (root / "piqa" / "valid.jsonl").open("w") as f:
        for goal, s1, s2, _ in rows:
            f.write(json.dumps({"goal": goal, "sol1": s1, "sol2": s2}) + "\n")
    (root / "piqa" / "valid-labels.lst").write_text("".join(f"{y}\n" for *_, y in rows))


def test_evaluate_tasks_acc_and_acc_norm_by_hand(tiny, tmp_path):
    rows = [("Boil water", "use a pot", "use a very large sieve made of paper", 0),
            ("Cut bread", "knife", "spoon", 0), ("Dry hair", "towel", "use a wet sponge", 1),
            ("Open a jar", "twist the lid", "x", 1), ("Light a room", "lamp", "a bright lamp on", 0)]
    _write_piqa(tmp_path, rows)
    acc = acc_norm = 0
    for goal, s1, s2, gold in rows:
        lls = [ll for ll, _ in reference(tiny.model, tiny.tokenizer, tasks._piqa({"goal": goal, "sol1": s1, "sol2": s2, "label": gold}))]
        acc += int(max(range(2), key=lambda i: lls[i]) == gold)
        acc_norm += int(max(range(2), key=lambda i: lls[i] / len((s1, s2)[i])) == gold)  # per character of the choice
    result = evaluate_tasks(tiny.model, tiny.tokenizer, ["piqa"], tmp_path)["piqa"]
    assert (result.task, result.n) == ("piqa", 5) and result.perplexity is None
    assert result.acc == pytest.approx(acc / 5) and result.acc_norm == pytest.approx(acc_norm / 5)
    assert result.seconds > 0


def test_lambada_acc_is_greedy_match_and_perplexity(tiny, tmp_path):
    texts = [("The quick brown fox jumps over the lazy", "dog"), ("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "a")]
    (tmp_path / "lambada_openai").mkdir()
    (tmp_path / "lambada_openai" / "lambada_openai.jsonl").write_text(
        "".join(json.dumps({"context": c, "continuation": w}) + "\n" for c, w in texts))
    scores = [reference(tiny.model, tiny.tokenizer, Example((c,), (" " + w,), 0))[0] for c, w in texts]
    result = evaluate_tasks(tiny.model, tiny.tokenizer, ["lambada_openai"], tmp_path)["lambada_openai"]
    assert result.acc == pytest.approx(sum(g for _, g in scores) / 2) and result.acc_norm is None
    assert result.perplexity == pytest.approx(math.exp(-sum(ll for ll, _ in scores) / 2), rel=1e-5)


def test_metrics_by_hand():
    exs = [Example(("q",) * 2, (" a", " bbbb"), 1), Example(("q",) * 2, (" a", " bbbb"), 0), Example(("q",) * 2, (" aa", " b"), 0)]
    scores = [[(-1.0, True), (-2.0, False)], [(-1.0, True), (-2.0, False)], [(-3.0, False), (-2.0, True)]]
    # acc: argmax ll = 0, 0, 1 -> right on ex 2 only; acc_norm: ll/len = (-1, -0.5), (-1, -0.5), (-1.5, -2) -> 1, 1, 0
    assert tasks.metrics("piqa", exs, scores) == (pytest.approx(1 / 3), pytest.approx(2 / 3), None)
    assert tasks.metrics("winogrande", exs, scores)[1] is None  # lm-eval reports acc only there


# ---- errors -------------------------------------------------------------------------------------
def test_unknown_task_and_missing_inputs(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="unknown task 'mmlu'.*hellaswag"):
        load_task("mmlu", tmp_path)
    with pytest.raises(UserError, match="unknown task"):
        evaluate_tasks(None, None, ["piqa", "nope"], tmp_path)
    with pytest.raises(UserError, match="tasks directory not found"):
        load_task("piqa", tmp_path / "missing")
    with pytest.raises(UserError, match=r"valid\.jsonl: file not found"):
        load_task("piqa", tmp_path)
    monkeypatch.delenv(tasks.TASKS_DIR_ENV, raising=False)
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)  # as if not installed
    with pytest.raises(UserError, match="--tasks-dir"):
        load_task("boolq")


def test_malformed_files_name_file_and_line(tmp_path, monkeypatch):
    (tmp_path / "boolq").mkdir()
    (tmp_path / "boolq" / "dev.jsonl").write_text('{"question": "q", "title": "t", "passage": "p", "answer": true}\n{oops\n')
    with pytest.raises(UserError, match=r"dev\.jsonl:2: not valid JSON"):
        load_task("boolq", tmp_path)
    (tmp_path / "boolq" / "dev.jsonl").write_text('{"question": "q", "title": "t", "passage": "p", "answer": "yes"}\n')
    with pytest.raises(UserError, match=r"dev\.jsonl:1: expected .*'answer': bool"):
        load_task("boolq", tmp_path)
    _write_piqa(tmp_path, [("g", "a", "b", 0), ("g", "a", "b", 1)])
    (tmp_path / "piqa" / "valid-labels.lst").write_text("0\n")
    with pytest.raises(UserError, match="1 labels for 2 records"):
        load_task("piqa", tmp_path)
    monkeypatch.setenv(tasks.TASKS_DIR_ENV, str(tmp_path))  # the environment variable stands in for tasks_dir
    (tmp_path / "piqa" / "valid-labels.lst").write_text("0\n1\n")
    assert [ex.gold for ex in load_task("piqa")] == [0, 1]
