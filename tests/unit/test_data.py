"""Training data: the committed corpus, math generator, readers, packing and tokenizer training.

Every check here is an independent recomputation: math answers are re-derived from the question
text (brute force, enumeration, an AST evaluator), and packing is checked by re-parsing the packed
token stream into documents and rebuilding the boundaries the loss mask must respect.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import itertools
import json
import math
import re
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from mixtral.data import (
    MATH_MODULES,
    DataError,
    PackedStream,
    TokenizedDocs,
    generate_math,
    load_corpus,
    load_manifest,
    pack_documents,
    read_documents,
    tokenize_documents,
    train_tokenizer,
    verify_corpus,
)
from mixtral.text.tokenizer import load_tokenizer

# ---------------------------------------------------------------- the committed corpus


@pytest.fixture(scope="module")
def corpus():
    return load_corpus()  # verifies every sha256 first


def test_corpus_matches_manifest_and_has_every_domain(corpus):
    manifest = load_manifest()
    assert {"code", "math", "literature", "encyclopedic", "latex"} <= set(corpus)
    assert len({"fr", "de", "es", "it"} & set(corpus)) >= 2
    for domain, split in corpus.items():
        files = manifest["domains"][domain]["files"]
        for name, docs in (("train", split.train), ("valid", split.valid)):
            assert docs, f"{domain}/{name} is empty"
            assert len(docs) == files[name]["documents"]
            assert sum(len(d.text) for d in docs) == files[name]["characters"]
        assert sum(len(d.text) for d in split.valid) >= 100_000
        assert not {d.source for d in split.train} & {d.source for d in split.valid}, (
            "a document in both splits"
        )
        for source in manifest["domains"][domain]["sources"]:
            assert source["licence"] and ("version" in source or "generator" in source)


def _tiny_corpus(root: Path) -> Path:
    (root / "x").mkdir(parents=True)
    files = {}
    for split in ("train", "valid"):
        path = root / "x" / f"{split}.jsonl"
        path.write_text(json.dumps({"text": f"{split} text", "source": "t"}) + "\n", encoding="utf-8")
        files[split] = {"path": f"x/{split}.jsonl", "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    (root / "MANIFEST.json").write_text(json.dumps({"domains": {"x": {"files": files, "sources": []}}}))
    return root


def test_corpus_missing_or_corrupt_file_is_named(tmp_path):
    root = _tiny_corpus(tmp_path)
    assert load_corpus(root)["x"].valid[0].text == "valid text"
    (root / "x" / "valid.jsonl").write_text('{"text": "tampered"}\n')
    with pytest.raises(DataError, match=r"valid\.jsonl is corrupt"):
        verify_corpus(root)
    (root / "x" / "valid.jsonl").unlink()
    with pytest.raises(DataError, match=r"valid\.jsonl is missing"):
        load_corpus(root)
    with pytest.raises(DataError, match="MANIFEST.json is missing"):
        load_corpus(tmp_path / "nowhere")
    with pytest.raises(DataError, match="unknown corpus domains"):
        load_corpus(_tiny_corpus(tmp_path / "again"), domains=["y"])


# ---------------------------------------------------------------- math generator


def _eval(expr: str, env: dict[str, Fraction] | None = None) -> Fraction:
    """Exact value of an arithmetic/polynomial expression (an evaluator independent of mathgen)."""

    def ev(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant):
            return Fraction(str(node.value))
        if isinstance(node, ast.Name):
            return (env or {})[node.id]
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.BinOp):
            a, b = ev(node.left), ev(node.right)
            ops = {
                ast.Add: Fraction.__add__,
                ast.Sub: Fraction.__sub__,
                ast.Mult: Fraction.__mul__,
                ast.Div: Fraction.__truediv__,
                ast.Pow: Fraction.__pow__,
            }
            return ops[type(node.op)](a, b)
        raise AssertionError(f"unexpected syntax {ast.dump(node)}")

    return ev(ast.parse(expr, mode="eval"))


def _num(s: str) -> Fraction:
    return Fraction(s.strip())


def _is_prime(n: int) -> bool:  # deterministic Miller-Rabin, a different method from mathgen's
    if n < 2:
        return False
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for a in (2, 3, 5, 7, 11, 13, 17):
        if n == a:
            return True
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        if all(pow(x, 2**i, n) != n - 1 for i in range(r)):
            return False
    return True


_UNIT = {"millimetres": 1, "centimetres": 10, "metres": 1000, "kilometres": 10**6, "milligrams": 1, "grams": 10**3,
         "kilograms": 10**6, "tonnes": 10**9, "millilitres": 1, "litres": 1000, "seconds": 1, "minutes": 60,
         "hours": 3600, "days": 86400, "weeks": 7 * 86400}  # fmt: skip


def _check(module: str, q: str, a: str) -> None:  # noqa: C901 - one branch per module, on purpose
    if module == "arithmetic":
        m = re.fullmatch(r"(?:What is|Calculate) (\S+) ?([-+*/]|times|divided by) ?(\S+?)[?.]", q)
        if m:
            x, op, y = _num(m[1]), m[2], _num(m[3])
        else:
            m = re.fullmatch(r"(Sum|Add|Multiply|Subtract|Divide) (\S+) (?:and|from|by) (\S+)\.", q)
            verb, x, y = m[1], _num(m[2]), _num(m[3])
            op = {"Sum": "+", "Add": "+", "Multiply": "*", "Divide": "/"}.get(verb)
            if verb == "Subtract":
                x, y, op = y, x, "-"
        op = {"times": "*", "divided by": "/"}.get(op, op)
        assert _num(a) == {"+": x + y, "-": x - y, "*": x * y, "/": x / y if y else None}[op]
    elif module == "mixed":
        expr = re.fullmatch(r"(?:Calculate|What is the value of|Evaluate) (.+)[.?]", q)[1]
        assert _num(a) == _eval(expr)
    elif module == "linear_1d":
        lhs, rhs, v = re.fullmatch(r"Solve (.+) = (.+) for (\w)\.", q).groups()
        assert _eval(lhs, {v: _num(a)}) == _eval(rhs, {v: _num(a)})
    elif module == "linear_2d":
        e1, c1, e2, c2, v = re.fullmatch(r"Solve (.+) = (\S+), (.+) = (\S+) for (\w)\.", q).groups()
        names = sorted(set(re.findall(r"[a-z]", e1 + e2)))
        solutions = [
            dict(zip(names, map(Fraction, xy), strict=True))
            for xy in itertools.product(range(-10, 11), repeat=2)
            if all(
                _eval(e, dict(zip(names, map(Fraction, xy), strict=True))) == _num(c)
                for e, c in ((e1, c1), (e2, c2))
            )
        ]
        assert len(solutions) == 1 and solutions[0][v] == _num(a)
    elif module == "poly_eval":
        f, v, body, x = re.fullmatch(r"Let (\w)\((\w)\) = (.+)\. \w+.* \1\((-?\d+)\)[.?]", q).groups()
        assert _num(a) == _eval(body, {v: Fraction(x)})
    elif module == "expand":
        p, r = re.fullmatch(r"Expand \((.+)\)\*\((.+)\)(?: and simplify)?\.", q).groups()
        v = re.search(r"[a-z]", p)[0]
        assert "(" not in a
        for x in range(-3, 4):
            assert _eval(a, {v: Fraction(x)}) == _eval(p, {v: Fraction(x)}) * _eval(r, {v: Fraction(x)})
    elif module == "differentiate":
        p, v = re.fullmatch(
            r"(?:Find the first derivative of|Differentiate) (.+) (?:wrt|with respect to) (\w)\.", q
        ).groups()
        for x in (-1.5, 0.5, 2.0):
            h = 1e-4
            numeric = (float(_eval(p, {v: Fraction(x + h)})) - float(_eval(p, {v: Fraction(x - h)}))) / (
                2 * h
            )
            assert float(_eval(a, {v: Fraction(x)})) == pytest.approx(numeric, rel=1e-5, abs=1e-5)
    elif module in ("gcd", "lcm"):
        x, y = map(int, re.findall(r"\d+", q))
        assert int(a) == (math.gcd(x, y) if module == "gcd" else math.lcm(x, y))
    elif module == "is_prime":
        n = int(re.search(r"\d+", q)[0])
        assert a == str(_is_prime(n) != ("composite" in q))
    elif module == "prime_factors":
        n, primes = int(re.search(r"\d+", q)[0]), [int(p) for p in a.split(", ")]
        found, m, d = set(), n, 2
        while m > 1:
            while m % d == 0:
                found.add(d)
                m //= d
            d += 1
        assert primes == sorted(found)
    elif module == "sort":
        items, word = re.fullmatch(r"(?:Sort|Put) (.+) in (\w+) order\.", q).groups()
        got = a.split(", ")
        assert sorted(got) == sorted(items.split(", "))
        assert got == sorted(got, key=_num, reverse=word in ("decreasing", "descending"))
    elif module == "compare":
        x, y = re.findall(r"-?[\d./]+\d|-?\d", q)[:2]
        if q.startswith("Is"):
            assert a == str(_num(x) > _num(y))
        else:
            assert a == (max if "bigger" in q else min)((x, y), key=_num)
    elif module == "units":
        m = re.search(r"([\d.]+) (\w+)", q)
        value, src = _num(m[1]), m[2]
        dst = next(u for u in re.findall(r"[a-z]+", q) if u in _UNIT and u != src)
        assert _num(a) == value * _UNIT[src] / _UNIT[dst]
    elif module == "probability":
        bag = [c for c, n in re.findall(r"(\w): (\d+)", q) for _ in range(int(n))]
        k = {"Two": 2, "Three": 3}[q.split()[0]]
        draws = list(itertools.permutations(range(len(bag)), k))
        if "sequence" in q:
            seq = re.search(r"sequence (\w+)\?", q)[1]
            hits = sum("".join(bag[i] for i in d) == seq for d in draws)
        else:
            spec = {c: int(n) for n, c in re.findall(r"(\d+) (\w)", q.split("picking")[1])}
            hits = sum(
                sorted(bag[i] for i in d) == sorted(c for c, n in spec.items() for _ in range(n))
                for d in draws
            )
        assert _num(a) == Fraction(hits, len(draws))
    else:
        raise AssertionError(f"no checker for module {module}")


def test_math_answers_are_correct_for_every_module():
    items = generate_math(30 * len(MATH_MODULES), seed=7)
    assert {it.module for it in items} == set(MATH_MODULES) and len(MATH_MODULES) >= 8
    for it in items:
        try:
            _check(it.module, it.question, it.answer)
        except Exception as e:
            raise AssertionError(f"{it.module}: {it.question!r} -> {it.answer!r}") from e
        assert it.text == f"Question: {it.question}\nAnswer: {it.answer}"


def test_math_is_deterministic_by_seed_and_prefix_stable():
    a, b = generate_math(60, seed=3), generate_math(60, seed=3)
    assert a == b and generate_math(20, seed=3) == a[:20]
    assert a != generate_math(60, seed=4)
    only = generate_math(10, seed=3, modules=["gcd"])
    assert {it.module for it in only} == {"gcd"}
    with pytest.raises(DataError, match="unknown math modules"):
        generate_math(1, modules=["calculus_of_variations"])


# ---------------------------------------------------------------- readers


def _write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.jsonl", '{"text": "a"}\n\n{"text": "b",}\n', r"bad\.jsonl:3: malformed JSON"),
        ("list.jsonl", '{"text": "a"}\n["text"]\n', r"list\.jsonl:2: expected a JSON object, got list"),
        (
            "nofield.jsonl",
            '{"text": "a"}\n{"body": "b"}\n',
            r"nofield\.jsonl:2: no field 'text' \(fields: body\)",
        ),
        ("num.jsonl", '{"text": 5}\n', r"num\.jsonl:1: field 'text' is int, expected a string"),
        ("empty.jsonl", "\n\n", r"empty\.jsonl: empty file"),
        ("empty.txt", "", r"empty\.txt: no text"),
        ("latin.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', r"latin\.jsonl:2: not UTF-8 \(byte 0xe9"),
        ("latin.txt", b"line one\nline two\ncaf\xe9\n", r"latin\.txt:3: not UTF-8"),
        ("data.csv", "text\nhello\n", r"data\.csv: unknown file type \.csv"),
        ("trunc.jsonl.gz", b"\x1f\x8b\x08\x00garbage", r"trunc\.jsonl\.gz: cannot read"),
    ],
)
def test_bad_files_raise_data_error_naming_file_and_line(tmp_path, name, content, message):
    path = _write(tmp_path / name, content)
    with pytest.raises(DataError, match=message):
        list(read_documents(path))


def test_readers_text_separator_jsonl_field_compression_and_directories(tmp_path):
    _write(tmp_path / "a.txt", "first doc\nline 2\n<|endoftext|>\n\n<|endoftext|>\nsecond doc\n")
    docs = list(read_documents(tmp_path / "a.txt"))
    assert [d.text for d in docs] == ["first doc\nline 2\n", "second doc\n"]
    assert docs[1].source.endswith("a.txt:6")  # the line the document starts on
    _write(tmp_path / "b.jsonl", '{"body": "x", "text": 1}\n{"body": "", "text": 2}\n{"body": "y"}\n')
    assert [d.text for d in read_documents(tmp_path / "b.jsonl", text_field="body")] == ["x", "y"]
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "c.jsonl.gz").write_bytes(gzip.compress(b'{"text": "zipped", "source": "s1"}\n'))
    _write(sub / "d.md", "# markdown doc\n")
    _write(sub / "README", "not data: no known extension, so a directory read skips it")
    assert [(d.text, d.source) for d in read_documents(sub)] == [
        ("zipped", "s1"),
        ("# markdown doc\n", str(sub / "d.md")),
    ]
    with pytest.raises(DataError, match="no such file"):
        list(read_documents(tmp_path / "missing.jsonl"))


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match=r"data\.parquet: reading Parquet needs pyarrow: pip install pyarrow"):
        list(read_documents(_write(tmp_path / "data.parquet", b"PAR1")))


def test_parquet_reads_a_text_column_and_names_bad_rows(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"content": ["one", "two"], "n": [1, 2]}), tmp_path / "ok.parquet")
    assert [d.text for d in read_documents(tmp_path / "ok.parquet", text_field="content")] == ["one", "two"]
    with pytest.raises(DataError, match=r"ok\.parquet: no column 'text'"):
        list(read_documents(tmp_path / "ok.parquet"))
    with pytest.raises(DataError, match=r"column 'n' has type int64"):
        list(read_documents(tmp_path / "ok.parquet", text_field="n"))
    pq.write_table(pa.table({"text": ["a", None]}), tmp_path / "null.parquet")
    with pytest.raises(DataError, match=r"null\.parquet: row 1: column 'text' is null"):
        list(read_documents(tmp_path / "null.parquet"))


# ---------------------------------------------------------------- packing

BOS, EOS = 1, 2


def _synthetic(n_docs: int, base: int, seed: int, max_len: int = 40) -> TokenizedDocs:
    """Documents whose inner tokens are unique (base + 1000*doc + i), so any doc can be recognised."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_len, n_docs)
    return TokenizedDocs.from_lists(
        [BOS, *(base + 1000 * d + i for i in range(n)), EOS] for d, n in enumerate(lengths)
    )


def _stream_of(batches: list, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Re-join packed rows into the token stream (rows overlap by one token), with positions and masks."""
    inputs = torch.cat([b.inputs for b in batches]).numpy()
    targets = torch.cat([b.targets for b in batches]).numpy()
    assert (inputs[1:, 0] == targets[:-1, -1]).all(), "row k+1 must start with row k's last target"
    stream = np.concatenate([inputs.reshape(-1), targets[-1, -1:]])
    positions = torch.cat([b.positions for b in batches]).numpy()
    mask = torch.cat([b.loss_mask for b in batches]).numpy()
    return stream, positions, mask


def _parse_documents(stream: np.ndarray) -> tuple[list[list[int]], np.ndarray]:
    """Split a stream at BOS into documents; doc index of every stream position."""
    starts = np.flatnonzero(stream == BOS)
    assert starts[0] == 0
    ends = [*starts[1:], len(stream)]
    doc_of = np.repeat(np.arange(len(starts)), np.diff([*starts, len(stream)]))
    return [stream[s:e].tolist() for s, e in zip(starts, ends, strict=True)], doc_of


def test_packing_keeps_documents_whole_and_never_trains_across_a_boundary():
    seq_len = 16
    docs = {"a": _synthetic(60, 10_000, 0), "b": _synthetic(40, 500_000, 1)}
    stream_obj = PackedStream(docs, seq_len, seed=5, loop=False)
    batches = list(stream_obj.batches(batch_size=4))
    stream, positions, mask = _stream_of(batches, seq_len)
    real = positions.reshape(-1) >= 0
    n_real = int(real.sum()) + int(positions[-1, -1] >= 0)  # + the final target, unless it is padding
    parsed, doc_of = _parse_documents(stream[:n_real])
    originals = sorted(tuple(td.doc(i).tolist()) for td in docs.values() for i in range(len(td)))
    assert sorted(map(tuple, parsed)) == originals, "every document exactly once, tokens in order"
    rows = len(positions)
    for r in range(rows):
        for t in range(seq_len):
            g = r * seq_len + t  # stream index of input t of row r
            if positions[r, t] < 0:
                assert not mask[r, t]
                continue
            same_doc = g + 1 < n_real and doc_of[g] == doc_of[g + 1]
            assert mask[r, t] == same_doc, f"row {r} t {t}: the loss may not cross a document boundary"
            assert positions[r, t] < seq_len
            new_segment = t == 0 or doc_of[g] != doc_of[g - 1]
            assert (positions[r, t] == 0) == new_segment
            if not new_segment:
                assert positions[r, t] == positions[r, t - 1] + 1
    assert stream_obj.next_batch(4) is None  # a finite stream ends


def test_mixture_weights_are_respected_and_validated():
    docs = {"a": _synthetic(50, 10_000, 2), "b": _synthetic(50, 500_000, 3), "c": _synthetic(5, 900_000, 4)}
    stream = PackedStream(docs, 64, weights={"a": 3, "b": 1}, seed=0)
    ids = torch.cat([stream.next_batch(8).domain_ids for _ in range(40)])
    counts = torch.bincount(ids.reshape(-1), minlength=3)
    assert counts[2] == 0 and counts[0] / counts[1] == pytest.approx(3.0, rel=0.05)
    for bad, message in [
        ({"a": 1, "z": 1}, "unknown domains"),
        ({"a": -1}, "must be finite and >= 0"),
        ({"a": float("nan")}, "must be finite"),
        ({"a": 0, "b": 0}, "all zero"),
    ]:
        with pytest.raises(DataError, match=message):
            PackedStream(docs, 64, weights=bad)
    with pytest.raises(DataError, match="no documents"):
        PackedStream({"a": TokenizedDocs.from_lists([])}, 8, weights={"a": 1})


def test_packing_is_deterministic_and_resumes_exactly():
    docs = {"a": _synthetic(30, 10_000, 5), "b": _synthetic(20, 500_000, 6)}

    def take(stream, n):
        return [stream.next_batch(3) for _ in range(n)]

    first, again = take(PackedStream(docs, 24, seed=1), 12), take(PackedStream(docs, 24, seed=1), 12)
    for x, y in zip(first, again, strict=True):
        assert all(
            torch.equal(getattr(x, f), getattr(y, f)) for f in ("inputs", "targets", "positions", "loss_mask")
        )
    other = take(PackedStream(docs, 24, seed=2), 12)
    assert not all(torch.equal(x.inputs, y.inputs) for x, y in zip(first, other, strict=True))
    stream = PackedStream(docs, 24, seed=1)
    take(stream, 7)  # past the first epoch of "b": resuming must carry epochs and cursors
    state = json.loads(json.dumps(stream.state_dict()))
    resumed = PackedStream(docs, 24, seed=1)
    resumed.load_state_dict(state)
    for x, y in zip(take(resumed, 5), first[7:], strict=True):
        assert torch.equal(x.inputs, y.inputs) and torch.equal(x.positions, y.positions)
    with pytest.raises(DataError, match="seq_len"):
        PackedStream(docs, 32, seed=1).load_state_dict(state)


def test_pack_documents_with_the_real_tokenizer_and_cache(tmp_path):
    tok = load_tokenizer()
    texts = {"en": ["Hello world.", "A second, longer document about packing."], "fr": ["Bonjour à tous !"]}
    stream = pack_documents(texts, tok, seq_len=8, seed=0, loop=False, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("tokens-*.npz"))) == 2
    stream_ids, _, _ = _stream_of(list(stream.batches(4)), 8)
    docs = [tok.decode(d) for d in np.split(stream_ids, np.flatnonzero(stream_ids == tok.bos_id)[1:])]
    assert sorted(docs) == sorted(t for ts in texts.values() for t in ts)
    cached = tokenize_documents(texts["en"], tok, cache_dir=tmp_path)
    assert cached.tokens.tolist() == [i for t in texts["en"] for i in tok.encode(t, bos=True, eos=True)]


# ---------------------------------------------------------------- tokenizer training


def test_train_tokenizer_round_trips_with_byte_fallback(tmp_path, corpus):
    texts = [d.text for split in corpus.values() for d in split.valid[:6]]
    out = tmp_path / "tok"
    tok = train_tokenizer(texts, 600, out, max_chars=300_000)
    assert {"tokenizer.model", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (600, 1, 2, None)
    assert tok.id_to_piece(0) == "<unk>"
    sample = "def f(x):\n    return x**2  # 12345\n\nÉté, Straße, niño — 😀 ∮ 漢字"
    ids = tok.encode(sample, bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and 0 not in ids, "byte fallback: nothing is <unk>"
    assert tok.decode(ids) == sample
    assert "<0xF0>" in [tok.id_to_piece(i) for i in ids], "the emoji goes through byte fallback"
    assert [tok.id_to_piece(i) for i in tok.encode("12345", bos=False)][-5:] == list("12345")  # split digits
    hf = load_tokenizer(out / "tokenizer.json")
    assert hf.encode(sample) == ids[:-1]
    again = train_tokenizer(texts, 600, tmp_path / "tok2", max_chars=300_000)
    assert (out / "tokenizer.model").read_bytes() == (tmp_path / "tok2" / "tokenizer.model").read_bytes()
    assert again.encode(sample) == tok.encode(sample)
    with pytest.raises(DataError, match="one str"):
        train_tokenizer("corpus.txt", 600, tmp_path / "tok3")


def test_a_directory_of_source_code_is_read(tmp_path):
    (tmp_path / "pkg").mkdir()
    _write(tmp_path / "pkg" / "mod.py", "def f():\n    return 1\n")
    _write(tmp_path / "pkg" / "lib.rs", "fn main() {}\n")
    _write(tmp_path / "pkg" / "data.bin", "skipped")
    assert [d.text for d in read_documents(tmp_path / "pkg")] == [
        "fn main() {}\n",
        "def f():\n    return 1\n",
    ]
