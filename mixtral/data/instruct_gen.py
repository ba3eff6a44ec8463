"""Generates small instruction datasets with checkable answers: SFT conversations, preference pairs, eval.

Tasks (short prompt, short exact answer, so that a tiny model can learn them and
`mixtral.eval.instruct` can score them): `math` (a `mixtral.data.mathgen` question; the
pretraining corpus used seed 0, the training files use seed 2s+1, held-out files 2s+2, and a held-out
question is never a training or pretraining one), `language` (one or two fr/de/es/it/English corpus
sentences -> French/German/Spanish/Italian/English, kept only where a stop-word vote agrees with the
domain), `code_name` (a short code-corpus function, docstring removed -> its name), `first_word`,
`count` (a comma-separated word list -> how many) and, for preference pairs only, `code_fix` (a function
with a syntax error -> chosen the original, which `ast.parse` accepts, rejected a broken version, which
it rejects). Rejected answers are verifiably wrong: a perturbed or borrowed maths answer of another
value, another language, identifier or word, a count off by one.

Training files take texts from the corpus train split, held-out files (sft_valid, pref_valid, eval)
from its valid split minus any sentence or function also in the train split, and no held-out prompt
equals a training one. All draws come from string-seeded `random.Random`s: a seed gives the same
bytes on every run and platform. `MANIFEST.json` records counts per task and file sha256s.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import textwrap
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from random import Random
from typing import Any

from mixtral.data import mathgen
from mixtral.data.corpus import default_corpus_root, load_corpus, load_manifest, sha256_file
from mixtral.errors import DataError

VERSION = 1
TASKS: tuple[str, ...] = ("math", "language", "code_name", "first_word", "count")  # SFT and eval
PREF_TASKS: tuple[str, ...] = (*TASKS, "code_fix")
SFT_WEIGHTS = {"math": 0.4, "language": 0.15, "code_name": 0.15, "first_word": 0.15, "count": 0.15}
PREF_WEIGHTS = {"math": 0.4, **{t: 0.12 for t in PREF_TASKS[1:]}}
PROMPTS = {
    "language": "Which language is this text written in?\n\n{}",
    "code_name": "What is the name of the function defined in this code?\n\n{}",
    "first_word": "What is the first word of this sentence?\n\n{}",
    "count": "How many words are in this list?\n\n{}",
    "code_fix": "Fix the syntax error in this Python function:\n\n{}",
}
LANGUAGES = {"fr": "French", "de": "German", "es": "Spanish", "it": "Italian", "literature": "English"}
FILES = ("sft_train", "sft_valid", "pref_train", "pref_valid", "eval")

# ---------------------------------------------------------------- sentences

_STOPWORDS = {
    "English": "the and of to in is that it was for with as his her he she be have had you which this "
    "but at by on are from were they will them their there been would could shall",
    "French": "le la les des et est une du dans pour que qui pas sur au avec ce il elle sont par ne se "
    "plus aux ou vous nous cette être leur peut sans de en un a",
    "German": "der die das und ist nicht ein eine zu den von mit sich des auf für im dem auch es sie "
    "werden wird wenn oder bei nach kann wir ich sind",
    "Spanish": "el la los las y es una de del en que para por con no se su al lo como más pero sus este "
    "esta puede son hay",
    "Italian": "il la le di e è una che per non si con del della dei gli nel sono lo al come anche alla "
    "delle più questo può essere a un in",
}
_SHARED = Counter(w for words in _STOPWORDS.values() for w in set(words.split()))
# Only words of a single language vote: "la", "de", "il", "con"... say nothing.
_VOTES = {lang: {w for w in words.split() if _SHARED[w] == 1} for lang, words in _STOPWORDS.items()}
_SPLIT = re.compile(
    r"(?<=[.!?])(?<!\bMr\.)(?<!\bMrs\.)(?<!\bMs\.)(?<!\bDr\.)(?<!\bSt\.)(?<!\bM\.)\s+(?=[A-ZÀ-ÖØ-Þ])"
)
_BAD_SENTENCE = re.compile(r"[{}<>=$\\/|_#@*\[\]`~^\"“”«»„\u2010\u00ad]|\d|\.\w|\s-|--|\b[A-ZÀ-Þ]{3,}\b")
_WORD = re.compile(r"[^\W\d_]+(?:['’-][^\W\d_]+)*")


def language_of(text: str) -> str | None:
    """The language whose own stop words clearly dominate `text` (at least 2, over twice any other)."""
    words = re.findall(r"[^\W\d_]+", text.casefold())
    scores = sorted(((sum(w in v for w in words), lang) for lang, v in _VOTES.items()), reverse=True)
    (best, lang), (second, _) = scores[0], scores[1]
    return lang if best >= 2 and best > 2 * second else None


def first_word(sentence: str) -> str:
    return sentence.split()[0].strip(".,;:!?()'’")


def _sentences(text: str) -> Iterator[list[str]]:
    """Per paragraph, its runs of clean prose sentences (30-160 characters, six words or more)."""
    for paragraph in re.split(r"\n\s*\n", text):
        run: list[str] = []
        for s in _SPLIT.split(" ".join(paragraph.split())):
            ok = (
                30 <= len(s) <= 160 and len(s.split()) >= 6 and s[-1] in ".!?" and not _BAD_SENTENCE.search(s)
            )
            if ok and _WORD.fullmatch(first_word(s)) and len(first_word(s)) > 1 and s[0].isupper():
                run.append(s)
            elif run:
                yield run
                run = []
        if run:
            yield run


# ---------------------------------------------------------------- functions

_NESTED = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)


def parses(code: str) -> bool:
    try:
        ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    return True


def _clean_function(code: str) -> str | None:
    """The function without its docstring and blank lines, if it stays short (2-8 lines, <= 300 chars)."""
    try:
        fn = ast.parse(code).body[0]
    except (SyntaxError, ValueError):  # a multi-line string less indented than the def
        return None
    lines, doc = code.split("\n"), fn.body[0]
    if isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str):
        if len(fn.body) == 1 or doc.lineno == fn.lineno or fn.body[1].lineno == doc.end_lineno:
            return None
        del lines[doc.lineno - 1 : doc.end_lineno]
    code = "\n".join(line.rstrip() for line in lines if line.strip())
    short = 2 <= code.count("\n") + 1 <= 8 and len(code) <= 300 and max(map(len, code.split("\n"))) <= 90
    return code if short and code.isascii() and parses(code) else None


def _functions(text: str) -> Iterator[tuple[str, str]]:
    """(name, code) of the short, non-nesting, non-dunder functions of a module's source."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return
    lines = text.splitlines(keepends=True)
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("__"):
            continue
        if node.end_lineno - node.lineno > 40 or any(
            isinstance(m, _NESTED) for m in ast.walk(node) if m is not node
        ):
            continue
        code = _clean_function(textwrap.dedent("".join(lines[node.lineno - 1 : node.end_lineno])))
        if code:
            yield node.name, code


def break_code(code: str, rng: Random) -> str:
    """`code` with one syntax error (a removed colon, a removed closing bracket or a bad indent)."""
    lines = code.split("\n")
    kinds = ["colon", "bracket", "indent"]
    rng.shuffle(kinds)
    for kind in kinds:
        if kind == "colon":
            spots = [i for i, line in enumerate(lines) if line.endswith(":")]
            candidates = ["\n".join(lines[:i] + [lines[i][:-1]] + lines[i + 1 :]) for i in spots]
        elif kind == "bracket":
            candidates = [code[:i] + code[i + 1 :] for i, c in enumerate(code) if c in ")]}"]
        else:
            candidates = [
                "\n".join(lines[:i] + [pad + lines[i].lstrip()] + lines[i + 1 :])
                for i in range(1, len(lines))
                for pad in ("", " " * (len(lines[i]) - len(lines[i].lstrip()) + 2))
            ]
        rng.shuffle(candidates)
        for candidate in candidates:
            if not parses(candidate):
                return candidate
    raise DataError(f"cannot break this function:\n{code}")


# ---------------------------------------------------------------- maths answers


def _value(text: str) -> Fraction | None:
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def wrong_math_answer(item: mathgen.MathItem, rng: Random, seed: int) -> str:
    """A plausible, verifiably different answer: the other option, a number off by one, a sign
    flipped, two digits or list items swapped, or the answer of another item of the same module
    (far along the stream of `seed`)."""
    answer = item.answer
    if answer in ("True", "False"):
        return "False" if answer == "True" else "True"
    options = re.fullmatch(r".*: (\S+) or (\S+)\?", item.question)  # "Which is bigger: a or b?"
    if options and answer in options.groups():
        return options[1] if answer == options[2] else options[2]
    for _ in range(20):
        kind = rng.choice(["number", "number", "sign", "swap", "other"])
        numbers = list(re.finditer(r"(?<![\d*])\d+", answer))  # not an exponent
        m = rng.choice(numbers) if numbers else None
        if kind == "other":
            index = rng.randrange(10**5, 10**6) * len(mathgen.MODULES) + mathgen.MODULES.index(item.module)
            wrong = mathgen.item_at(index, seed).answer
        elif kind == "sign" and _value(answer) is not None:
            wrong = answer[1:] if answer.startswith("-") else "-" + answer
        elif kind == "swap" and ", " in answer:
            parts = answer.split(", ")
            i = rng.randrange(len(parts) - 1)
            parts[i], parts[i + 1] = parts[i + 1], parts[i]
            wrong = ", ".join(parts)
        elif kind == "swap" and m and len(s := m.group()) >= 2 and s[-1] not in ("0", s[-2]):
            wrong = answer[: m.start()] + s[:-2] + s[-1] + s[-2] + answer[m.end() :]  # last two digits
        elif m:
            n = int(m.group()) + rng.choice([-1, 1])
            if n == 0 and answer[m.start() - 1 : m.start()] == "-":
                continue  # "-0"
            digits = str(abs(n)).zfill(len(m.group())) if m.group().startswith("0") else str(abs(n))
            wrong = answer[: m.start()] + digits + answer[m.end() :]
        else:
            continue
        a, w = _value(answer), _value(wrong)
        if wrong != answer and (a is None or w is None or a != w):
            return wrong
    raise DataError(f"no wrong answer found for {item}")


# ---------------------------------------------------------------- pools and draws


@dataclass(frozen=True)
class _Pool:
    """One side's raw material: texts per language, sentences, words, (name, code) functions."""

    texts: dict[str, tuple[str, ...]]
    sentences: tuple[str, ...]
    words: tuple[str, ...]
    functions: tuple[tuple[str, str], ...]


def _build_pool(corpus: dict, split: str, exclude: _Pool | None) -> _Pool:
    banned_sentences = set(exclude.sentences) if exclude else set()
    banned_code = {code for _, code in exclude.functions} if exclude else set()
    texts: dict[str, dict[str, None]] = {language: {} for language in LANGUAGES.values()}
    sentences: dict[str, None] = {}
    for domain, language in LANGUAGES.items():
        for doc in getattr(corpus[domain], split):
            for run in _sentences(doc.text):
                good = [s for s in run if language_of(s) == language and s not in banned_sentences]
                sentences.update(dict.fromkeys(good))
                pairs = [f"{a} {b}" for a, b in zip(good, good[1:], strict=False) if len(a) + len(b) < 220]
                texts[language].update(dict.fromkeys(good + pairs))
    words = {w.casefold(): None for s in sentences for w in s.split() if w.isalpha() and 3 <= len(w) <= 10}
    functions = {
        code: name
        for doc in getattr(corpus["code"], split)
        for name, code in _functions(doc.text)
        if code not in banned_code
    }
    return _Pool(
        {language: tuple(t) for language, t in texts.items()},
        tuple(sentences),
        tuple(words),
        tuple((n, c) for c, n in functions.items()),
    )


@lru_cache(maxsize=2)
def _pools(root: str) -> tuple[_Pool, _Pool]:
    corpus = load_corpus(root, domains=["code", *LANGUAGES])
    train = _build_pool(corpus, "train", None)
    return train, _build_pool(corpus, "valid", train)


@lru_cache(maxsize=2)
def _pretraining_questions(root: str) -> frozenset[str]:
    """The maths questions of the pretraining corpus (its manifest's generator seed and item count)."""
    math = load_manifest(root)["domains"].get("math")
    sources = [s for s in (math or {}).get("sources", []) if s.get("generator") == "mixtral.data.mathgen"]
    return frozenset(it.question for s in sources for it in mathgen.generate(s["items"], s["seed"]))


def _stream(items: Sequence, rng: Random) -> Iterator:
    """A pool's items in a seeded shuffled order, reshuffled whenever it runs out."""
    if not items:
        raise DataError("the corpus gave no material for an instruction task")
    while True:
        yield from rng.sample(items, len(items))


class _Side:
    """Draws prompts of one side (train or held-out); a drawn prompt is never one of `forbidden`."""

    def __init__(self, pool: _Pool, name: str, math_seed: int, forbidden: set[str], seed: int) -> None:
        self.rng = Random(f"instruct:{seed}:{name}")
        self.math_seed, self.forbidden, self.next_math = math_seed, forbidden, 0
        streams = {"sentences": pool.sentences, "functions": pool.functions, **pool.texts}
        self.stream = {k: _stream(v, Random(f"instruct:{seed}:{name}:{k}")) for k, v in streams.items()}
        self.words, self.functions, self.n_language = pool.words, pool.functions, 0

    def _math(self) -> tuple[int, mathgen.MathItem]:
        while True:
            index, self.next_math = self.next_math, self.next_math + 1
            item = mathgen.item_at(index, self.math_seed)
            if item.question not in self.forbidden:
                self.forbidden.add(item.question)  # each question once per side
                return index, item

    def draw(self, task: str, pair: bool) -> tuple[str, str, str | None, dict]:
        """(prompt, answer, rejected answer if `pair`, extra meta) of one fresh example."""
        rng = self.rng
        for _ in range(10_000):
            wrong, extra = None, {}
            if task == "math":
                index, item = self._math()
                prompt, answer = item.question, item.answer
                extra = {"source": f"mathgen:{self.math_seed}:{index}"}
                return prompt, answer, wrong_math_answer(item, rng, self.math_seed) if pair else None, extra
            if task == "language":
                names = list(LANGUAGES.values())  # in turn, so that every language is equally frequent
                answer, self.n_language = names[self.n_language % len(names)], self.n_language + 1
                text, wrong = next(self.stream[answer]), rng.choice([n for n in names if n != answer])
            elif task == "first_word":
                text = next(self.stream["sentences"])
                answer = first_word(text)
                others = [w for w in _WORD.findall(text)[1:] if w.casefold() != answer.casefold()]
                wrong = rng.choice(others[:3]) if others else None
            elif task == "count":
                n = rng.randint(2, 9)
                text, answer = ", ".join(rng.sample(self.words, n)), str(n)
                wrong = str(n + rng.choice([-1, 1]))
            elif task == "code_name":
                answer, text = next(self.stream["functions"])
                tree = ast.parse(text)
                names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
                names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
                names = sorted(names - {answer, "self", "cls"})
                wrong = rng.choice(names) if names else rng.choice(self.functions)[0]
            elif task == "code_fix":
                _, answer = next(self.stream["functions"])
                text = break_code(answer, rng)
                wrong = text if rng.random() < 0.5 else break_code(answer, rng)
            else:
                raise DataError(f"unknown instruction task {task!r}; known: {', '.join(PREF_TASKS)}")
            prompt = PROMPTS[task].format(text)
            if prompt not in self.forbidden and not (pair and (wrong is None or wrong == answer)):
                return prompt, answer, wrong, extra
        raise DataError(f"the {task} pool has no prompt left that is not forbidden")


def allocate(n: int, weights: dict[str, float]) -> dict[str, int]:
    """`n` split over the tasks in proportion to `weights` (largest remainders, ties in task order)."""
    total = sum(weights.values())
    exact = {t: n * w / total for t, w in weights.items()}
    counts = {t: int(x) for t, x in exact.items()}
    by_remainder = sorted(weights, key=lambda t: -(exact[t] - counts[t]))
    for t in by_remainder[: n - sum(counts.values())]:
        counts[t] += 1
    return counts


def _records(side: _Side, name: str, counts: dict[str, int], seed: int) -> list[dict]:
    """The records of file `name` (its kind from its name), `counts[task]` per task, shuffled."""
    out = []
    for task in (task for task, n in counts.items() for _ in range(n)):
        prompt, answer, wrong, extra = side.draw(task, pair=name.startswith("pref"))
        user = {"role": "user", "content": prompt}
        if name.startswith("sft"):
            meta = {"task": task, "answer": answer, **extra}
            out.append({"messages": [user, {"role": "assistant", "content": answer}], "meta": meta})
        elif name.startswith("pref"):
            out.append(
                {"prompt": prompt, "chosen": answer, "rejected": wrong, "meta": {"task": task, **extra}}
            )
        else:
            out.append({"messages": [user], "answer": answer, "task": task})
    Random(f"instruct:{seed}:{name}:order").shuffle(out)
    return out


def build_instruct_data(
    out_dir: str | Path,
    n_sft_train: int = 6000,
    n_sft_valid: int = 300,
    n_pref_train: int = 4000,
    n_pref_valid: int = 300,
    n_eval: int = 500,
    seed: int = 0,
    corpus_root: str | Path | None = None,
) -> dict[str, Any]:
    """Write the five JSONL files and MANIFEST.json (see the module docstring) to `out_dir`; return the manifest."""
    root = str(Path(corpus_root) if corpus_root is not None else default_corpus_root())
    train_pool, heldout_pool = _pools(root)
    train = _Side(train_pool, "train", 2 * seed + 1, set(), seed)
    records = {
        "sft_train": _records(train, "sft_train", allocate(n_sft_train, SFT_WEIGHTS), seed),
        "pref_train": _records(train, "pref_train", allocate(n_pref_train, PREF_WEIGHTS), seed),
    }
    prompts = {
        r["prompt"] if "prompt" in r else r["messages"][0]["content"] for v in records.values() for r in v
    }
    forbidden = prompts | _pretraining_questions(root)
    heldout = _Side(heldout_pool, "heldout", 2 * seed + 2, forbidden, seed)
    # Held-out streams are shared, in this order, so eval items differ from the valid ones while they last.
    records["eval"] = _records(heldout, "eval", allocate(n_eval, dict.fromkeys(TASKS, 1.0)), seed)
    records["sft_valid"] = _records(heldout, "sft_valid", allocate(n_sft_valid, SFT_WEIGHTS), seed)
    records["pref_valid"] = _records(heldout, "pref_valid", allocate(n_pref_valid, PREF_WEIGHTS), seed)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for name in FILES:
        path = out / f"{name}.jsonl"
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records[name])
        tasks = Counter(r["task"] if "task" in r else r["meta"]["task"] for r in records[name])
        files[name] = {
            "path": path.name,
            "records": len(records[name]),
            "tasks": dict(sorted(tasks.items())),
            "bytes": path.stat().st_size,
            "sha256": sha256_file(path),
        }
    manifest = {
        "name": "mixtral instruction data",
        "generator": "mixtral.data.instruct_gen",
        "builder": "scripts/build_instruct_data.py",
        "version": VERSION,
        "seed": seed,
        "math_seeds": {"train": 2 * seed + 1, "held_out": 2 * seed + 2, "pretraining_excluded": True},
        "corpus_manifest_sha256": hashlib.sha256(Path(root, "MANIFEST.json").read_bytes()).hexdigest(),
        "prompts": PROMPTS,
        "format": {
            "sft": '{"messages": [user, assistant], "meta": {"task", "answer"[, "source"]}}',
            "pref": '{"prompt", "chosen", "rejected", "meta": {"task"[, "source"]}}',
            "eval": '{"messages": [user], "answer", "task"}',
        },
        "files": files,
    }
    (out / "MANIFEST.json").write_text(
        json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    return manifest
