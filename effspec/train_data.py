"""Training examples and the batches of each optimizer step, as a pure function of (seed, step).

Two kinds of examples, both `(input_ids, labels)` with label -100 where no loss is taken:

- language modelling: token ids cut into rows of `seqlen`, every token a target;
- instructions in the Alpaca layout (`instruction`, optional `input`, `output`;
  JSON list or JSON Lines): the prompt is formatted with the usual
  "### Instruction / ### Input / ### Response" headers, or in the tokenizer's
  chat template, and masked out, so the loss is on the response (and the
  end-of-text token) only.

`StepBatches(examples, cfg)` maps optimizer step s to its micro-batches: the
examples are visited in a seeded random order, epoch after epoch, so a resumed
run sees exactly the batches the uninterrupted run would have.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from effspec.errors import UserError

Example = tuple[torch.Tensor, torch.Tensor]  # input_ids (L,), labels (L,)
IGNORE = -100


def lm_examples(ids: torch.Tensor, seqlen: int) -> list[Example]:
    """Rows of `seqlen` tokens from 1-D ids, or from (n, L) sequences re-cut to `seqlen`; every token a target."""
    flat = ids.reshape(-1)
    n = flat.numel() // seqlen
    if n == 0:
        raise UserError(f"training text has {flat.numel()} tokens, fewer than one sequence of {seqlen}")
    rows = flat[: n * seqlen].view(n, seqlen)
    return [(r, r.clone()) for r in rows]


def _prompt(record: dict) -> str:
    extra = record.get("input") or ""
    body = f"### Instruction:\n{record['instruction']}\n\n"
    if extra:
        body += f"### Input:\n{extra}\n\n"
    return body + "### Response:\n"


def read_instructions(path: str | Path) -> list[dict]:
    """Alpaca-layout records from a JSON list or JSON Lines file; errors name the file and record."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read instruction data ({e})") from None
    try:
        records = json.loads(text) if text.lstrip().startswith("[") else [json.loads(l) for l in text.splitlines() if l.strip()]
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not JSON or JSON Lines ({e})") from None
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not isinstance(r.get("instruction"), str) or not isinstance(r.get("output"), str):
            raise UserError(f"{path}: record {i} needs string fields 'instruction' and 'output' (and optional 'input')")
    if not records:
        raise UserError(f"{path}: no instruction records")
    return records


TEMPLATES = ("alpaca", "chat")


def _chat_ids(tokenizer, messages: list[dict], open_turn: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=open_turn, tokenize=True, return_dict=False)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def chat_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of `text` as a user turn in the tokenizer's chat template, the assistant's turn opened: what a
    chat model is prompted with."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("this tokenizer has no chat template")
    return _chat_ids(tokenizer, [{"role": "user", "content": text}], True)


def _prompt_and_answer(record: dict, tokenizer, template: str) -> tuple[list[int], list[int]]:
    """Token ids of the prompt (no loss) and of the response that follows it (the loss)."""
    if template == "alpaca":
        eos = tokenizer.eos_token_id
        prompt = tokenizer(_prompt(record), add_special_tokens=False)["input_ids"]
        answer = tokenizer(record["output"], add_special_tokens=False)["input_ids"]
        return prompt, answer + ([eos] if eos is not None else [])
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("template: chat needs a tokenizer with a chat template; this one has none (use alpaca)")
    user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    prompt = _chat_ids(tokenizer, [{"role": "user", "content": user}], True)
    turns = [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
    full = _chat_ids(tokenizer, turns, False)
    if full[: len(prompt)] != prompt:
        raise UserError("template: chat: this chat template does not continue the prompt with the response")
    return prompt, full[len(prompt):]


def instruction_examples(records: list[dict], tokenizer, seqlen: int, template: str = "alpaca") -> list[Example]:
    """Prompt + response, truncated to `seqlen` tokens; labels only on the response. `template`: alpaca's
    "### Instruction" headers with end-of-text after the response, or the tokenizer's chat template (a user
    turn, then the assistant's), the layout a chat model is prompted in."""
    out = []
    for r in records:
        prompt, answer = _prompt_and_answer(r, tokenizer, template)
        ids = (prompt + answer)[:seqlen]
        labels = ([IGNORE] * len(prompt) + answer)[:seqlen]
        if len(ids) >= 2 and any(t != IGNORE for t in labels[1:]):  # a prompt filling the window teaches nothing
            out.append((torch.tensor(ids), torch.tensor(labels)))
    if not out:
        raise UserError(f"no instruction fits in seqlen={seqlen} tokens with room for its response")
    return out


def own_answers(model, tokenizer, records: list[dict], max_new_tokens: int, template: str = "chat",
                batch_size: int = 16) -> list[torch.Tensor]:
    """Prompt + the model's own greedy answer, as 1-D token ids, for each record (its `output` is not read).

    Self-distillation data for a draft (Medusa-2, Sec. 2.3.2; DistillSpec): a draft is judged by how often it
    predicts what the target generates, and the target's own answers are that text, where a dataset's human
    answers are not. Measured on smollm2-135m (README, "Speculative decoding"): on their own they trained a
    slightly worse EAGLE head than the dataset's answers, alongside them a better one, so `effspec train-draft
    --own-answers` adds them. Prompts are batched by length, so little of each batch is padding; an answer ends
    at the end-of-text token (kept) or after `max_new_tokens`."""
    from effspec.generate import generate_batch
    from effspec.progress import track

    prompts = [_prompt_and_answer(r, tokenizer, template)[0] for r in records]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[torch.Tensor] = [torch.empty(0, dtype=torch.long)] * len(prompts)
    starts = range(0, len(order), batch_size)
    for s in track(starts, "answering", total=len(starts)):
        chunk = order[s:s + batch_size]
        gens = generate_batch(model, [torch.tensor(prompts[i]) for i in chunk], max_new_tokens,
                              eos_token_id=tokenizer.eos_token_id)
        for i, g in zip(chunk, gens):
            out[i] = torch.cat((torch.tensor(prompts[i]), g.tokens))
    return out


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: padding is masked out of attention and loss."""
    L = max(x.numel() for x, _ in examples)
    ids = torch.full((len(examples), L), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), L), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), L), dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        ids[i, : x.numel()], labels[i, : y.numel()], mask[i, : x.numel()] = x, y, 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class StepBatches:
    """Optimizer step -> its micro-batches; the order is seeded and independent of where a run resumed."""

    def __init__(self, examples: list[Example], batch_size: int, micro_batch: int, seed: int, pad_id: int = 0):
        self.examples, self.batch_size, self.micro_batch, self.seed, self.pad_id = examples, batch_size, micro_batch, seed, pad_id
        self._orders: dict[int, list[int]] = {}

    def _index(self, k: int) -> int:
        """The k-th example visited: epoch k // n in its own seeded shuffle."""
        n = len(self.examples)
        epoch = k // n
        if epoch not in self._orders:
            order = list(range(n))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._orders = {epoch: order}  # only the current epoch is kept
        return self._orders[epoch][k % n]

    def __call__(self, step: int) -> list[dict[str, torch.Tensor]]:
        first = step * self.batch_size
        picked = [self.examples[self._index(first + j)] for j in range(self.batch_size)]
        return [collate(picked[i : i + self.micro_batch], self.pad_id) for i in range(0, len(picked), self.micro_batch)]

    def tokens_per_step(self) -> int:
        return self.batch_size * max(x.numel() for x, _ in self.examples)
