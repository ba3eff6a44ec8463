"""Trains a small SentencePiece BPE tokenizer with Mistral's conventions, for small experiments.

Mixtral's own tokenizer has 32000 pieces; a model with a few million parameters would spend most
of them on the embedding, so `train_tokenizer` makes a smaller one the same way: BPE with byte
fallback (no text is ever <unk>), unk=0, BOS=1, EOS=2, no pad, digits split one by one, the
identity normalizer with a dummy prefix (so decode(encode(s)) == s, whitespace included), and
whitespace-only pieces allowed (code indentation). It is saved with `save_tokenizer`, so
`load_tokenizer(out_dir)` and transformers' AutoTokenizer both read it.

SentencePiece trains on lines, so documents are split at newlines; the newline itself is encoded
by byte fallback (<0x0A>), as in Mistral's tokenizer. Training is deterministic: the sample is
drawn with `seed` and SentencePiece's own sampling and shuffling are turned off.
"""

from __future__ import annotations

import io
import os
import random
from collections.abc import Iterable
from pathlib import Path

import sentencepiece

from mixtral.data.corpus import load_corpus, read_documents
from mixtral.errors import DataError, TokenizerError
from mixtral.text.tokenizer import Tokenizer, load_tokenizer, save_tokenizer

_MAX_LINE_BYTES = 16384  # longer lines (minified data, long table rows) teach nothing useful


def _lines(texts: Iterable[str], budget: int) -> list[str]:
    """Non-blank lines of `texts`, in order, until about `budget` characters."""
    out, used = [], 0
    for text in texts:
        for line in text.split("\n"):
            if line.strip() and len(line.encode("utf-8")) <= _MAX_LINE_BYTES:
                out.append(line)
                used += len(line)
        if used >= budget:
            break
    return out


def _sample(texts: list[str], budget: int, seed: int) -> list[str]:
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    return _lines((texts[i] for i in order), budget)


def training_lines(
    texts_or_files: Iterable[str | os.PathLike[str]] | None,
    max_chars: int = 8_000_000,
    seed: int = 0,
    corpus_root: str | os.PathLike[str] | None = None,
) -> list[str]:
    """The lines a tokenizer is trained on.

    None: the default corpus's training split, the same number of characters from each domain
    (a random sample of whole documents), so no language or domain dominates the vocabulary.
    Otherwise a random sample of whole documents up to `max_chars`, where a `str` item is a
    text and an `os.PathLike` item (e.g. `pathlib.Path`) is a file or directory read with
    `read_documents`.
    """
    if texts_or_files is None:
        corpus = load_corpus(corpus_root)
        per_domain = max_chars // len(corpus)
        lines = []
        for i, (_, split) in enumerate(sorted(corpus.items())):
            lines += _sample([d.text for d in split.train], per_domain, seed + i)
        return lines
    if isinstance(texts_or_files, str):  # iterating it would train on single characters
        raise DataError("texts_or_files is one str: pass a list of texts, or a pathlib.Path for a file")
    if isinstance(texts_or_files, os.PathLike):
        texts_or_files = [texts_or_files]
    texts: list[str] = []
    for item in texts_or_files:
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, os.PathLike):
            texts += [d.text for d in read_documents(item)]
        else:
            raise DataError(f"expected text (str) or a path (os.PathLike), got {type(item).__name__}")
    return _sample(texts, max_chars, seed)


def train_tokenizer(
    texts_or_files: Iterable[str | os.PathLike[str]] | None,
    vocab_size: int,
    out_dir: str | os.PathLike[str],
    *,
    max_chars: int = 8_000_000,
    seed: int = 0,
    split_digits: bool = True,
    character_coverage: float = 0.9995,
    num_threads: int = 4,
    corpus_root: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> Tokenizer:
    """Train a BPE tokenizer of `vocab_size` pieces and save it in `out_dir` (see the module docstring).

    `texts_or_files` as in `training_lines` (None: a balanced sample of the default corpus).
    Characters outside `character_coverage` of the sample get no piece and go through byte fallback.
    Returns the tokenizer loaded back from `out_dir`. An `out_dir` that already holds tokenizer files
    (a model directory, say) is refused with FileExistsError unless `overwrite`.
    """
    out = Path(out_dir)
    existing = sorted(p.name for p in out.glob("tokenizer*")) if out.is_dir() else []
    if existing and not overwrite:
        raise FileExistsError(
            f"{out} already holds {', '.join(existing)}; training would replace them. "
            "Choose another directory or pass overwrite=True (--overwrite)"
        )
    lines = training_lines(texts_or_files, max_chars, seed, corpus_root)
    if not lines:
        raise DataError("no text to train a tokenizer on (every document is empty)")
    out.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()  # not model_prefix=: that would store the output path in the model file
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            split_digits=split_digits,
            allow_whitespace_only_pieces=True,
            remove_extra_whitespaces=False,
            normalization_rule_name="identity",
            add_dummy_prefix=True,
            character_coverage=character_coverage,
            input_sentence_size=0,  # use every line given: the sample is already ours, seeded
            shuffle_input_sentence=False,
            max_sentence_length=_MAX_LINE_BYTES,
            num_threads=num_threads,  # recorded in the model file; results do not depend on it
            minloglevel=2,
        )
    except RuntimeError as e:  # e.g. vocab_size below 256 bytes + specials + required characters
        raise TokenizerError(f"SentencePiece training failed (vocab_size={vocab_size}): {e}") from e
    (out / "tokenizer.model").write_bytes(model.getvalue())
    save_tokenizer(Tokenizer(out / "tokenizer.model"), out)
    return load_tokenizer(out)
