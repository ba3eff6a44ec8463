"""Reads text documents from disk: the committed default corpus and a user's own files.

File formats (`read_documents` picks one by extension; `.gz`, `.xz` and `.bz2` are decompressed
transparently, so `train.jsonl.xz` is JSONL):

- `.txt`, `.md`, `.text`: UTF-8 text. A file is one document, unless it contains separator lines:
  a line that is exactly `<|endoftext|>` (after stripping trailing whitespace) ends a document.
  Whitespace-only documents are skipped.
- `.jsonl`: one JSON object per line with the text in `text_field` (default "text"); blank lines
  are skipped, and so are records whose text is the empty string. Any other field is ignored,
  except `source`, kept as the document's provenance.
- `.parquet`: a string column named `text_field` (needs the optional `pyarrow`).
- a directory: every file with a known extension below it, in sorted path order.

Every malformed input raises `DataError` naming the file and the 1-based line (or 0-based row):
non-UTF-8 bytes, malformed JSON, a record that is not an object, a missing or non-string text
field, a file with no document at all, an unknown extension.

The default corpus lives in `data/corpus/` at the repository root (built by
`scripts/build_corpus.py`): `MANIFEST.json` plus `<domain>/train.jsonl.xz` and
`<domain>/valid.jsonl.xz`, each record `{"text": ..., "source": ...}`. Every file is checked
against the sha256 in the manifest before use.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import lzma
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from mixtral.errors import DataError

TEXT_SEPARATOR = "<|endoftext|>"
# Read as plain text, one document per file (or per separator-delimited section): prose and source
# code, so that `--data code=my/repo` reads a repository's sources.
TEXT_SUFFIXES = (".txt", ".md", ".text", ".rst", ".tex", ".py", ".c", ".h", ".cc", ".cpp", ".hpp", ".cu",
                 ".rs", ".go", ".java", ".js", ".ts", ".sh", ".rb", ".php", ".cs", ".kt", ".scala",
                 ".swift", ".lua", ".jl", ".r", ".sql", ".html", ".css", ".toml", ".yaml", ".yml")  # fmt: skip
_COMPRESSED = {".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open}
SPLITS = ("train", "valid")


@dataclass(frozen=True)
class Document:
    """One document's text and where it came from (a file path, `path:line`, or a corpus source)."""

    text: str
    source: str


@dataclass(frozen=True)
class Split:
    """A domain's documents, divided by document into a training and a held-out validation part."""

    train: list[Document]
    valid: list[Document]


def _format_of(path: Path) -> tuple[str, str | None]:
    """(`txt` | `jsonl` | `parquet`, compression suffix or None) from the file name."""
    suffixes = [s.lower() for s in path.suffixes]
    compression = suffixes.pop() if suffixes and suffixes[-1] in _COMPRESSED else None
    ext = suffixes[-1] if suffixes else ""
    if ext in TEXT_SUFFIXES:
        return "txt", compression
    if ext == ".jsonl":
        return "jsonl", compression
    if ext == ".parquet" and compression is None:
        return "parquet", None
    raise DataError(
        f"{path}: unknown file type {''.join(path.suffixes) or '(no extension)'}; expected "
        f"{', '.join(TEXT_SUFFIXES)}, .jsonl (optionally .gz/.xz/.bz2) or .parquet"
    )


def _open_binary(path: Path, compression: str | None) -> IO[bytes]:
    try:
        return _COMPRESSED[compression](path, "rb") if compression else open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot open: {e}") from e


def _decode(raw: bytes, path: Path, line_no: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}:{line_no}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})"
        ) from e


def read_text(path: str | os.PathLike[str]) -> Iterator[Document]:
    """Documents of a UTF-8 text file, split at `<|endoftext|>` lines (see the module docstring)."""
    path = Path(path)
    _, compression = _format_of(path)
    found, lines, start = False, [], 1
    with _open_binary(path, compression) as f:
        try:
            for line_no, raw in enumerate(f, start=1):
                line = _decode(raw, path, line_no)
                if line.rstrip() != TEXT_SEPARATOR:
                    lines.append(line)
                    continue
                if "".join(lines).strip():
                    found = True
                    yield Document("".join(lines), f"{path}:{start}")
                lines, start = [], line_no + 1
        except (OSError, EOFError, lzma.LZMAError) as e:
            raise DataError(f"{path}: cannot read: {e}") from e
    if "".join(lines).strip():
        found = True
        yield Document("".join(lines), f"{path}:{start}" if start > 1 else str(path))
    if not found:
        raise DataError(f"{path}: no text (the file is empty or only whitespace and separators)")


def iter_jsonl(path: str | os.PathLike[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """("path:line", object) for every non-blank line of a JSON-lines file (`.gz`/`.xz`/`.bz2`
    decompressed); DataError names the file and line of anything malformed, or an empty file."""
    path = Path(path)
    compression = _COMPRESSED.get(path.suffix.lower()) and path.suffix.lower()
    found = False
    with _open_binary(path, compression) as f:
        try:
            for line_no, raw in enumerate(f, start=1):
                line = _decode(raw, path, line_no)
                if not line.strip():
                    continue
                found = True
                yield f"{path}:{line_no}", _parse_record(line, path, line_no)
        except (OSError, EOFError, lzma.LZMAError) as e:
            raise DataError(f"{path}: cannot read: {e}") from e
    if not found:
        raise DataError(f"{path}: empty file (no JSON records)")


def read_jsonl(path: str | os.PathLike[str], text_field: str = "text") -> Iterator[Document]:
    """Documents of a JSON-lines file, the text taken from `text_field` of each object."""
    for where, record in iter_jsonl(path):
        text = _text_field(record, text_field, where)
        if text:
            source = record.get("source")
            yield Document(text, source if isinstance(source, str) else where)


def _parse_record(line: str, path: Path, line_no: int) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{line_no}: malformed JSON: {e.msg} at column {e.colno}") from e
    if not isinstance(record, dict):
        raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
    return record


def _text_field(record: dict[str, Any], field: str, where: str) -> str:
    if field not in record:
        keys = ", ".join(sorted(record)) or "none"
        raise DataError(
            f"{where}: no field {field!r} (fields: {keys}); choose the text field with text_field="
        )
    text = record[field]
    if not isinstance(text, str):
        raise DataError(f"{where}: field {field!r} is {type(text).__name__}, expected a string")
    return text


def read_parquet(path: str | os.PathLike[str], text_field: str = "text") -> Iterator[Document]:
    """Documents of a Parquet file's string column `text_field`, batch by batch (optional pyarrow)."""
    path = Path(path)
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError(f"{path}: reading Parquet needs pyarrow: pip install pyarrow") from e
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid (not an OSError) on a corrupt file
        raise DataError(f"{path}: not a readable Parquet file: {e}") from e
    names = pf.schema_arrow.names
    if text_field not in names:
        raise DataError(f"{path}: no column {text_field!r} (columns: {', '.join(names)})")
    column_type = pf.schema_arrow.field(text_field).type
    if str(column_type) not in ("string", "large_string", "string_view"):
        raise DataError(f"{path}: column {text_field!r} has type {column_type}, expected string")
    row, found = 0, False
    for batch in pf.iter_batches(columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if text is None:
                raise DataError(f"{path}: row {row}: column {text_field!r} is null")
            found = True
            if text:
                yield Document(text, f"{path}:row {row}")
            row += 1
    if not found:
        raise DataError(f"{path}: empty file (no rows)")


def _files_below(directory: Path) -> list[Path]:
    files = []
    for p in sorted(directory.rglob("*")):
        if not p.is_file() or p.name.startswith("."):
            continue
        try:
            _format_of(p)
        except DataError:
            continue  # a directory may hold READMEs, licences, ...: only known formats are data
        files.append(p)
    if not files:
        raise DataError(
            f"{directory}: no text ({', '.join(TEXT_SUFFIXES)}), .jsonl or .parquet files below it"
        )
    return files


def read_documents(path: str | os.PathLike[str], text_field: str = "text") -> Iterator[Document]:
    """Documents of one file or of every data file below a directory (format by extension)."""
    path = Path(path)
    if path.is_dir():
        for file in _files_below(path):
            yield from read_documents(file, text_field)
        return
    if not path.is_file():
        raise DataError(f"{path}: no such file or directory")
    kind, _ = _format_of(path)
    if kind == "txt":
        yield from read_text(path)
    elif kind == "jsonl":
        yield from read_jsonl(path, text_field)
    else:
        yield from read_parquet(path, text_field)


# ---------------------------------------------------------------- the default corpus


def default_corpus_root() -> Path:
    """`data/corpus/` of the repository this package was installed from (editable or checkout)."""
    return Path(__file__).resolve().parents[2] / "data" / "corpus"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_manifest(root: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The corpus manifest: per domain its files (split, path, docs, chars, sha256) and sources."""
    root = Path(root) if root is not None else default_corpus_root()
    path = root / "MANIFEST.json"
    if not path.is_file():
        raise DataError(
            f"{path} is missing: the default corpus ships in the repository's data/corpus/; "
            "use a source checkout (pip install -e .) or rebuild it with scripts/build_corpus.py"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not readable JSON: {e}") from e
    if not isinstance(manifest.get("domains"), dict) or not manifest["domains"]:
        raise DataError(f"{path}: no 'domains' in the manifest")
    return manifest


def verify_corpus(root: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Check every corpus file exists and matches its manifest sha256; returns the manifest."""
    root = Path(root) if root is not None else default_corpus_root()
    manifest = load_manifest(root)
    for domain, entry in manifest["domains"].items():
        for split in SPLITS:
            info = entry["files"].get(split)
            if info is None:
                raise DataError(f"{root / 'MANIFEST.json'}: domain {domain!r} has no {split} file")
            path = root / info["path"]
            if not path.is_file():
                raise DataError(f"{path} is missing (listed in {root / 'MANIFEST.json'}); git checkout it")
            actual = sha256_file(path)
            if actual != info["sha256"]:
                raise DataError(
                    f"{path} is corrupt: sha256 {actual[:16]}... but the manifest says {info['sha256'][:16]}..."
                )
    return manifest


def load_corpus(
    root: str | os.PathLike[str] | None = None,
    domains: Sequence[str] | None = None,
    verify: bool = True,
) -> dict[str, Split]:
    """Each domain's train and validation documents (all domains unless `domains` is given)."""
    root = Path(root) if root is not None else default_corpus_root()
    manifest = verify_corpus(root) if verify else load_manifest(root)
    known = manifest["domains"]
    chosen = list(known) if domains is None else list(domains)
    unknown = [d for d in chosen if d not in known]
    if unknown:
        raise DataError(f"unknown corpus domains {unknown}; the corpus has {', '.join(known)}")
    return {
        d: Split(*(list(read_jsonl(root / known[d]["files"][s]["path"])) for s in SPLITS)) for d in chosen
    }
