"""Training data: the default corpus and user files, math generation, packing, tokenizer training.

Public API: `load_corpus`, `read_documents` (txt / jsonl / parquet), `Document`, `Split`,
`tokenize_documents`, `PackedStream`, `PackedBatch`, `pack_documents`, `generate_math`
(`MathItem`, `MATH_MODULES`), `train_tokenizer`. Every bad input raises `DataError`.
"""

from mixtral.data.corpus import (
    Document,
    Split,
    default_corpus_root,
    load_corpus,
    load_manifest,
    read_documents,
    read_jsonl,
    read_parquet,
    read_text,
    verify_corpus,
)
from mixtral.data.mathgen import MODULES as MATH_MODULES
from mixtral.data.mathgen import MathItem
from mixtral.data.mathgen import generate as generate_math
from mixtral.data.mathgen import iter_items as iter_math
from mixtral.data.packing import (
    PackedBatch,
    PackedStream,
    TokenizedDocs,
    check_weights,
    pack_documents,
    tokenize_documents,
)
from mixtral.data.tokenizer_train import train_tokenizer, training_lines
from mixtral.errors import DataError

__all__ = [
    "MATH_MODULES",
    "DataError",
    "Document",
    "MathItem",
    "PackedBatch",
    "PackedStream",
    "Split",
    "TokenizedDocs",
    "check_weights",
    "default_corpus_root",
    "generate_math",
    "iter_math",
    "load_corpus",
    "load_manifest",
    "pack_documents",
    "read_documents",
    "read_jsonl",
    "read_parquet",
    "read_text",
    "tokenize_documents",
    "train_tokenizer",
    "training_lines",
    "verify_corpus",
]
