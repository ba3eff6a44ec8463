"""Scores a chat model's greedy answers to the checkable held-out questions of data/instruct/eval.jsonl.

Each question is rendered in the Mixtral-Instruct format (`mixtral.text.encode_chat`, ending with
`[/INST]`), decoded greedily until EOS, a newline or `max_new_tokens`, and only the first line of
the answer counts. `answer_matches` compares it with the expected answer after normalising: strip,
casefold, trailing punctuation and a spelled-out EOS removed. Per task: `math` compares the whole
answer with whitespace around operators and commas ignored; `count` the first token; `code_name`
ignores a trailing `()`; the others compare the whole normalised line.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

import torch

from mixtral.data.corpus import iter_jsonl
from mixtral.errors import DataError
from mixtral.eval.mode import eval_mode
from mixtral.inference import GenerationConfig, generate_ids
from mixtral.model import Transformer
from mixtral.text import Tokenizer, encode_chat

_EOS_TEXT = ("</s>", "<|endoftext|>", "<eos>")
_TRAILING = ".,;:!?"
N_EXAMPLES = 8


def _normalise(text: str) -> str:
    text = text.strip().split("\n", 1)[0] if text.strip() else ""
    for eos in _EOS_TEXT:
        text = text.split(eos, 1)[0]
    return " ".join(text.split()).casefold().rstrip(_TRAILING).strip()


def answer_matches(task: str, predicted: str, answer: str) -> bool:
    """Whether the first line of `predicted` gives `answer` (see the module docstring for the rules)."""
    pred, gold = _normalise(predicted), _normalise(answer)
    if not pred:
        return False
    if task == "math":
        spaces = re.compile(r"\s*([-+*/,=])\s*")
        return spaces.sub(r"\1", pred) == spaces.sub(r"\1", gold)
    if task == "count" or re.fullmatch(r"-?\d+", gold):
        return pred.split()[0].rstrip(_TRAILING) == gold
    if task == "code_name":
        pred = pred.removesuffix("()")
    return pred.strip("\"'`“”«»") == gold


def load_eval(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The eval items of a JSONL file: each `{"messages": [user message], "answer": str, "task": str}`."""
    items = []
    for where, item in iter_jsonl(path):
        if not {"messages", "answer", "task"} <= set(item):
            raise DataError(f"{where}: expected an object with messages, answer and task")
        if not isinstance(item["answer"], str) or not isinstance(item["messages"], list):
            raise DataError(f"{where}: answer must be a string and messages a list")
        items.append(item)
    return items


def newline_ids(tok: Tokenizer) -> frozenset[int]:
    """Token ids whose text contains a newline: a row's generation stops there (first line only)."""
    return frozenset(i for i in range(tok.vocab_size) if "\n" in tok.decode([i]))


@torch.no_grad()
def greedy_answers(
    model: Transformer,
    tok: Tokenizer,
    conversations: Sequence[Sequence[dict]],
    max_new_tokens: int = 24,
    newline: frozenset[int] | None = None,
) -> list[str]:
    """Greedy completions of a batch of conversations (each ending with a user turn), first line each.

    `newline` is `newline_ids(tok)`, computed here if not given. Ids beyond the tokenizer's
    vocabulary (a model with a larger embedding) are dropped from the text.
    """
    prompts = [encode_chat(tok, messages) for messages in conversations]
    rows: list[list[int]] = [[] for _ in prompts]
    newline = newline_ids(tok) if newline is None else newline
    config = GenerationConfig(max_new_tokens=max_new_tokens)  # greedy
    steps = generate_ids(model, prompts, config, eos_id=tok.eos_id, should_stop=lambda b, t: t in newline)
    for step in steps:
        for b, t in enumerate(step):
            if t is not None and t != tok.eos_id and t < tok.vocab_size:
                rows[b].append(t)
    return [tok.decode(ids).strip().split("\n", 1)[0] if ids else "" for ids in rows]


def evaluate_accuracy(
    model: Transformer,
    tok: Tokenizer,
    items: Sequence[dict[str, Any]],
    max_new_tokens: int = 24,
    batch_size: int = 16,
    progress: bool = False,
) -> dict[str, Any]:
    """Accuracy of greedy answers to `items` (from `load_eval`): overall, per task, and a few examples.

    Returns `{"accuracy", "per_task": {task: accuracy}, "per_task_n": {task: n}, "n", "examples":
    [{"question", "expected", "predicted", "correct"}] (the first few items)}`.
    """
    # Similar prompt lengths batch together (less left padding); results go back in item order.
    order = sorted(range(len(items)), key=lambda i: len(items[i]["messages"][-1]["content"]))
    predicted: list[str] = [""] * len(items)
    newline = newline_ids(tok)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="instruct eval", unit="batch")
    with eval_mode(model):
        for batch in batches:
            answers = greedy_answers(
                model, tok, [items[i]["messages"] for i in batch], max_new_tokens, newline
            )
            for i, answer in zip(batch, answers, strict=True):
                predicted[i] = answer
    correct = [answer_matches(it["task"], p, it["answer"]) for it, p in zip(items, predicted, strict=True)]
    per_task: dict[str, list[bool]] = {}
    for it, ok in zip(items, correct, strict=True):
        per_task.setdefault(it["task"], []).append(ok)
    examples = [
        {"question": it["messages"][-1]["content"], "expected": it["answer"], "predicted": p, "correct": ok}
        for it, p, ok in list(zip(items, predicted, correct, strict=True))[:N_EXAMPLES]
    ]
    return {
        "accuracy": sum(correct) / len(correct) if correct else 0.0,
        "per_task": {t: sum(v) / len(v) for t, v in sorted(per_task.items())},
        "per_task_n": {t: len(v) for t, v in sorted(per_task.items())},
        "n": len(items),
        "examples": examples,
    }
