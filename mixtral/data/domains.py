"""Domain-labelled held-out text for analysis: the given files, or the bundled corpus's validation splits."""

from __future__ import annotations

from mixtral.data.corpus import load_corpus, read_documents
from mixtral.data.packing import TokenizedDocs, tokenize_documents
from mixtral.errors import DataError
from mixtral.text.tokenizer import Tokenizer


def load_domains(
    tok: Tokenizer, data: dict[str, str], text_field: str = "text"
) -> tuple[dict[str, TokenizedDocs], dict[str, str]]:
    """(tokenized documents per domain, where they came from): the files of `data` ({domain: path},
    text/JSONL/Parquet files or directories) or, when it is empty, the bundled corpus' validation splits."""
    if not data:
        return {d: tokenize_documents(s.valid, tok) for d, s in load_corpus().items()}, {
            "bundled corpus": "valid"
        }
    out = {}
    for domain, path in data.items():
        docs = [d for d in read_documents(path, text_field) if d.text.strip()]
        if not docs:
            raise DataError(f"--data {domain}={path}: no non-empty documents")
        out[domain] = tokenize_documents(docs, tok)
    return out, data
