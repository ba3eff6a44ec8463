"""Instruction data: determinism, held-out hygiene, verifiable preference pairs, the committed files, the evaluator."""

from __future__ import annotations

import ast
import contextlib
import json
import random
from fractions import Fraction
from pathlib import Path

import pytest
from helpers import tiny_config

from mixtral.data import instruct_gen, mathgen
from mixtral.data.corpus import default_corpus_root, sha256_file
from mixtral.eval import instruct as instruct_eval
from mixtral.eval.instruct import answer_matches, evaluate_accuracy, load_eval
from mixtral.model import Transformer
from mixtral.text import encode_chat
from mixtral.text.tokenizer import load_tokenizer

COMMITTED = default_corpus_root().parent / "instruct"
SMALL = {"n_sft_train": 150, "n_sft_valid": 40, "n_pref_train": 150, "n_pref_valid": 60, "n_eval": 50}


def _read(directory: Path) -> dict[str, list[dict]]:
    return {
        name: [json.loads(line) for line in (directory / f"{name}.jsonl").read_text("utf-8").splitlines()]
        for name in instruct_gen.FILES
    }


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("instruct")
    instruct_gen.build_instruct_data(out, seed=3, **SMALL)
    return out


@pytest.fixture(scope="module")
def committed() -> dict[str, list[dict]]:
    return _read(COMMITTED)


def test_same_seed_same_bytes(small, tmp_path):
    instruct_gen.build_instruct_data(tmp_path, seed=3, **SMALL)
    for name in [*instruct_gen.FILES, "MANIFEST"]:
        suffix = ".json" if name == "MANIFEST" else ".jsonl"
        assert (tmp_path / f"{name}{suffix}").read_bytes() == (small / f"{name}{suffix}").read_bytes(), name


def test_counts_and_record_shapes(small):
    data = _read(small)
    manifest = json.loads((small / "MANIFEST.json").read_text("utf-8"))
    assert {n: len(rs) for n, rs in data.items()} == {
        "sft_train": 150, "sft_valid": 40, "pref_train": 150, "pref_valid": 60, "eval": 50,
    }  # fmt: skip
    assert manifest["files"]["eval"]["tasks"] == dict.fromkeys(sorted(instruct_gen.TASKS), 10)
    tok = load_tokenizer(None)
    for r in data["sft_train"] + data["sft_valid"]:
        user, assistant = r["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        assert assistant["content"] == r["meta"]["answer"] and r["meta"]["task"] in instruct_gen.TASKS
    for r in data["sft_valid"][:5]:
        encode_chat(tok, r["messages"], final_assistant="complete")
    for r in data["eval"]:
        assert [m["role"] for m in r["messages"]] == ["user"] and r["task"] in instruct_gen.TASKS
        assert answer_matches(r["task"], r["answer"], r["answer"])


def _prompt(record: dict) -> str:
    return record["prompt"] if "prompt" in record else record["messages"][0]["content"]


def _assert_held_out_unseen(data: dict[str, list[dict]]) -> None:
    train = [_prompt(r) for name in ("sft_train", "pref_train") for r in data[name]]
    train_texts = {p.split("\n\n", 1)[-1] for p in train}
    for name in ("sft_valid", "pref_valid", "eval"):
        for r in data[name]:
            prompt = _prompt(r)
            assert prompt not in train, (name, prompt)
            if "\n\n" in prompt and not prompt.startswith("How many words"):  # a sentence or a function
                assert prompt.split("\n\n", 1)[1] not in train_texts, (name, prompt)


def test_held_out_questions_never_in_train(small, committed):
    _assert_held_out_unseen(_read(small))
    _assert_held_out_unseen(committed)


def _assert_pairs_verifiable(pairs: list[dict]) -> None:
    for p in pairs:
        task = p["meta"]["task"]
        assert p["chosen"] != p["rejected"] and task in instruct_gen.PREF_TASKS
        if task == "code_fix":
            ast.parse(p["chosen"])
            for broken in (p["rejected"], p["prompt"].split("\n\n", 1)[1]):
                with pytest.raises(SyntaxError):
                    ast.parse(broken)
        elif task == "math":
            _, seed, index = p["meta"]["source"].split(":")
            item = mathgen.item_at(int(index), int(seed))
            assert (item.question, item.answer) == (p["prompt"], p["chosen"])
            assert not answer_matches("math", p["rejected"], p["chosen"])
            with contextlib.suppress(ValueError, ZeroDivisionError):  # unless not two numbers
                assert Fraction(p["rejected"]) != Fraction(p["chosen"])
        elif task == "language":
            assert {p["chosen"], p["rejected"]} <= set(instruct_gen.LANGUAGES.values())
        elif task == "count":
            assert abs(int(p["chosen"]) - int(p["rejected"])) == 1
            assert len(p["prompt"].split("\n\n", 1)[1].split(", ")) == int(p["chosen"])


def test_preference_pairs_are_verifiable(small, committed):
    data = _read(small)
    _assert_pairs_verifiable(data["pref_train"] + data["pref_valid"])
    _assert_pairs_verifiable(committed["pref_train"] + committed["pref_valid"])
    assert {p["meta"]["task"] for p in committed["pref_valid"]} == set(instruct_gen.PREF_TASKS)


def test_math_sft_answers_are_mathgen_answers(committed):
    for r in committed["sft_train"] + committed["sft_valid"]:
        if r["meta"]["task"] == "math":
            _, seed, index = r["meta"]["source"].split(":")
            item = mathgen.item_at(int(index), int(seed))
            assert (item.question, item.answer) == (r["messages"][0]["content"], r["messages"][1]["content"])


def test_break_code_and_wrong_answers():
    rng = random.Random(0)
    code = "def f(x, y):\n    if x:\n        return g(x, [y])\n    return {y: x}"
    for _ in range(20):
        assert not instruct_gen.parses(instruct_gen.break_code(code, rng))
    for i in range(60):
        item = mathgen.item_at(i, 5)
        wrong = instruct_gen.wrong_math_answer(item, rng, seed=5)
        assert wrong != item.answer and not answer_matches("math", wrong, item.answer)
    assert instruct_gen.language_of("Der Hund ist nicht in dem Haus und auch nicht im Garten.") == "German"
    assert instruct_gen.language_of("The cat sat on the mat, and it was happy.") == "English"
    assert instruct_gen.allocate(10, {"a": 0.4, "b": 0.3, "c": 0.3}) == {"a": 4, "b": 3, "c": 3}


def test_committed_files_match_manifest(committed):
    manifest = json.loads((COMMITTED / "MANIFEST.json").read_text("utf-8"))
    assert manifest["version"] == instruct_gen.VERSION
    total = 0
    for name in instruct_gen.FILES:
        info = manifest["files"][name]
        assert sha256_file(COMMITTED / info["path"]) == info["sha256"], f"{name} differs from its manifest"
        assert info["records"] == len(committed[name])
        assert sum(info["tasks"].values()) == info["records"]
        total += info["bytes"]
    assert total < 5_000_000
    assert len(load_eval(COMMITTED / "eval.jsonl")) == manifest["files"]["eval"]["records"]


@pytest.mark.parametrize(
    ("task", "predicted", "answer", "ok"),
    [
        ("math", " -3/4", "-3/4", True),
        ("math", "3*x**2-x + 7\nmore text", "3*x**2 - x + 7", True),
        ("math", "2, 3,5", "2, 3, 5", True),
        ("math", "true</s>", "True", True),
        ("math", "-3/5", "-3/4", False),
        ("math", "12", "1", False),
        ("math", "", "0", False),
        ("count", "5 words.", "5", True),
        ("count", "6", "5", False),
        ("language", "  french.", "French", True),
        ("language", "French is the language", "French", False),
        ("code_name", "get_cache_token()", "get_cache_token", True),
        ("code_name", "get_cache", "get_cache_token", False),
        ("first_word", '"Her"', "Her", True),
        ("first_word", "Hers", "Her", False),
    ],
)
def test_answer_matches(task, predicted, answer, ok):
    assert answer_matches(task, predicted, answer) is ok


def test_evaluate_accuracy_on_a_tiny_model(small):
    items = load_eval(small / "eval.jsonl")
    items = [next(it for it in items if it["task"] == t) for t in instruct_gen.TASKS]
    model = Transformer(tiny_config(vocab_size=32000, max_seq_len=512))
    model.train()
    result = evaluate_accuracy(model, load_tokenizer(None), items, max_new_tokens=4, batch_size=3)
    assert set(result) >= {"accuracy", "per_task", "n", "examples"}
    assert result["n"] == len(items) and 0.0 <= result["accuracy"] <= 1.0
    assert set(result["per_task"]) == set(instruct_gen.TASKS)
    assert all(0.0 <= a <= 1.0 for a in result["per_task"].values())
    example = result["examples"][0]
    assert set(example) == {"question", "expected", "predicted", "correct"}
    assert example["expected"] == items[0]["answer"] and isinstance(example["predicted"], str)
    assert model.training  # restored


def test_evaluate_accuracy_scores_the_right_rows(small, monkeypatch):
    """A fake generator answering from the prompt: right for every other item, in sorted batches."""
    tok = load_tokenizer(None)
    items = load_eval(small / "eval.jsonl")[:12]
    by_prompt = {tuple(encode_chat(tok, it["messages"])): (i, it["answer"]) for i, it in enumerate(items)}

    def fake_generate_ids(model, prompts, config=None, eos_id=None, should_stop=None, **kw):
        rows = []
        for p in prompts:
            i, answer = by_prompt[tuple(p)]
            text = answer if i % 2 == 0 else "wrong answer"
            rows.append(tok.encode(text + "\nignored", bos=False) + [eos_id])
        for step in range(max(map(len, rows))):
            yield [r[step] if step < len(r) else None for r in rows]

    monkeypatch.setattr(instruct_eval, "generate_ids", fake_generate_ids)
    result = evaluate_accuracy(Transformer(tiny_config(vocab_size=32000)), tok, items, batch_size=5)
    assert result["accuracy"] == 0.5 and result["n"] == 12
    for i, example in enumerate(result["examples"]):
        assert example["correct"] is (i % 2 == 0)
        assert example["predicted"] == (items[i]["answer"] if i % 2 == 0 else "wrong answer")


def test_committed_files_are_reproducible(tmp_path):
    """The defaults rebuild data/instruct byte for byte (else rerun scripts/build_instruct_data.py)."""
    instruct_gen.build_instruct_data(tmp_path)
    for name in [*instruct_gen.FILES, "MANIFEST"]:
        suffix = ".json" if name == "MANIFEST" else ".jsonl"
        assert (tmp_path / f"{name}{suffix}").read_bytes() == (COMMITTED / f"{name}{suffix}").read_bytes(), (
            name
        )
