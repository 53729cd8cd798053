"""Hooks for the local_* lm-eval tasks (bench/tasks.py copies this file beside the YAMLs it runs).

Each function does what lm-eval's official task of the same name does to its
hub dataset, applied to the field names bench/tasks.py writes from
../shared/data (see the YAMLs). Loaded by lm-eval in its own virtual environment.
"""

import re


def _hellaswag_clean(text):
    # lm-eval hellaswag/utils.py `preprocess`: WikiHow bracket artifacts out, one pass of double spaces.
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_process_docs(dataset):
    # lm-eval hellaswag/utils.py `process_docs`, unchanged: the converted file has the hub's fields
    def one(doc):
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {"query": _hellaswag_clean(doc["activity_label"] + ": " + ctx),
                "choices": [_hellaswag_clean(e) for e in doc["endings"]],
                "gold": int(doc["label"])}

    return dataset.map(one)


def winogrande_doc_to_text(doc):
    # the option that fills the blank is the context; the index of the right one is the "text"
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_doc_to_target(doc):
    # what follows the blank, scored after each filled-in prefix
    return doc["sentence"][doc["sentence"].index("_") + 1:].strip()


def winogrande_doc_to_choice(doc):
    head = doc["sentence"][:doc["sentence"].index("_")]
    return [head + doc["option1"], head + doc["option2"]]


def wikitext_doc_to_target(doc):
    # lm-eval's own wikitext detokenizer, imported from the lm-eval installed beside this file's runner
    from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer

    return wikitext_detokenizer(doc)


def wikitext_process_results(doc, results):
    # lm-eval's own wikitext word and byte counts (of the page before detokenization)
    from lm_eval.tasks.wikitext.preprocess_wikitext import process_results

    return process_results(doc, results)
