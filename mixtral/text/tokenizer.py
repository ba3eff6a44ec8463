"""Mixtral's text <-> token-id mapping: encoding, decoding and streamed decoding, from a model directory.

References: the SentencePiece model Mistral ships (`mistral_common/data/tokenizer.model.v1`: BPE,
32000 pieces, byte fallback, BOS=1, EOS=2, no pad) (the chat format built on it is in chat.py).

Two backends sit behind one `Tokenizer`: SentencePiece (`tokenizer.model`, `tokenizer.model.v1`,
...) and Hugging Face `tokenizers` (`tokenizer.json`). Both encode without special tokens; BOS and
EOS are added by `Tokenizer.encode` only, so the backends cannot disagree about them. The
`tokenizers` backend treats "<s>" typed in user text as plain text, as SentencePiece does; a user
cannot inject a control token.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import sentencepiece
import tokenizers
from tokenizers import decoders, normalizers, processors
from tokenizers.models import BPE

from mixtral.errors import TokenizerError, TokenizerNotFoundError
from mixtral.text.chat_template import CHAT_TEMPLATE

# Looked for in this order in a model directory; HF names first, then Mistral's versioned names.
_DIR_CANDIDATES = ("tokenizer.model", "tokenizer.json")
_MISTRAL_GLOB = "tokenizer.model.v*"

# Text used to check a converted tokenizer.json against its SentencePiece source: whitespace runs
# (the pieces Mistral added by hand with score -1e9), code, byte fallback and several scripts.
_PROBE_TEXTS = (
    "Hello world! Bonjour, ça va ? Größe, straße. ¿Qué tal? Perché no.",
    "  two leading, inner  runs   of    spaces, two trailing  ",
    "def f(x):\n\tif x:\n        return x  # comment\n\n",
    "你好，世界。こんにちは。 😀 👨‍👩‍👧‍👦 🇫🇷 ｆｕｌｌ width",
    "<s> [INST] not special [/INST] </s>",
)


class _SentencePieceBackend:
    kind = "sentencepiece"

    def __init__(self, path: Path) -> None:
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{path} is not a readable SentencePiece model: {e}") from e
        self.vocab_size: int = self._sp.vocab_size()
        # SentencePiece reports an undefined special id as -1; None makes that impossible to
        # feed to an embedding, where -1 would silently select the last row.
        self.bos_id: int | None = _none_if_negative(self._sp.bos_id())
        self.eos_id: int | None = _none_if_negative(self._sp.eos_id())
        self.pad_id: int | None = _none_if_negative(self._sp.pad_id())

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)  # control pieces (<s>, </s>) decode to ""

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(i)


class _HFTokenizersBackend:
    kind = "tokenizers"

    def __init__(self, path: Path) -> None:
        try:
            self._tk = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise TokenizerError(f"{path} is not a readable tokenizer.json: {e}") from e
        self._tk.encode_special_tokens = True  # "<s>" in user text stays text, as in SentencePiece
        self.vocab_size = self._tk.get_vocab_size(with_added_tokens=True)
        names = _special_token_names(path.with_name("tokenizer_config.json"))
        self.bos_id = self._tk.token_to_id(names["bos_token"]) if names["bos_token"] else None
        self.eos_id = self._tk.token_to_id(names["eos_token"]) if names["eos_token"] else None
        self.pad_id = self._tk.token_to_id(names["pad_token"]) if names["pad_token"] else None

    def encode(self, text: str) -> list[int]:
        return self._tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tk.decode(ids, skip_special_tokens=True)

    def id_to_piece(self, i: int) -> str:
        return self._tk.id_to_token(i)


def _none_if_negative(i: int) -> int | None:
    return None if i < 0 else i


def _special_token_names(config_path: Path) -> dict[str, str | None]:
    """BOS/EOS/pad strings from a sibling tokenizer_config.json, else the Llama/Mistral defaults."""
    names: dict[str, str | None] = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": None}
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise TokenizerError(f"{config_path} is not readable JSON: {e}") from e
        for key in names:
            value = config.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                names[key] = value
    return names


class Tokenizer:
    """Encodes text to Mixtral token ids and back; one file, either backend.

    Invariants: `bos_id` and `eos_id` are valid ids (checked at load); `pad_id` is None when the
    tokenizer defines no pad token (Mixtral's does not: pad with any id and mask it out).
    `source` is the file read, `kind` the backend reading it.
    `decode(encode(s)) == s` for any text the SentencePiece identity normalizer keeps, which
    includes leading, trailing and repeated whitespace, tabs and newlines.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.source = Path(path)
        if not self.source.is_file():
            raise TokenizerError(f"tokenizer file {self.source} does not exist")
        is_json = self.source.suffix == ".json"
        backend = _HFTokenizersBackend(self.source) if is_json else _SentencePieceBackend(self.source)
        if backend.bos_id is None or backend.eos_id is None:
            raise TokenizerError(f"{self.source} defines no BOS or no EOS token; both are needed")
        self._backend = backend
        self.kind: str = backend.kind  # 'sentencepiece' or 'tokenizers'
        self.vocab_size: int = backend.vocab_size
        self.bos_id: int = backend.bos_id
        self.eos_id: int = backend.eos_id
        self.pad_id: int | None = backend.pad_id

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate (undecodable input bytes): not text to encode
            raise TokenizerError(
                f"text holds a lone surrogate {text[e.start]!r} at index {e.start} (undecodable input bytes); "
                "decode the input with errors='replace'"
            ) from None
        return [self.bos_id] * bos + self._backend.encode(text) + [self.eos_id] * eos

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, skipping BOS, EOS and other control tokens; ids must be in the vocab."""
        ids = [int(i) for i in ids]
        for position, i in enumerate(ids):
            if not 0 <= i < self.vocab_size:
                raise TokenizerError(f"token id {i} at position {position} is outside [0, {self.vocab_size})")
        return self._backend.decode(ids)

    def id_to_piece(self, i: int) -> str:
        if not 0 <= i < self.vocab_size:
            raise TokenizerError(f"token id {i} is outside [0, {self.vocab_size})")
        return self._backend.id_to_piece(i)

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.source)!r}, kind={self.kind!r}, vocab_size={self.vocab_size})"


def default_tokenizer_path() -> Path:
    """The Mixtral (Mistral v1) SentencePiece model bundled with mistral-common; nothing is downloaded."""
    try:
        path = Path(str(importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"))
    except ModuleNotFoundError as e:
        raise TokenizerError("the default tokenizer needs mistral-common: pip install mistral-common") from e
    if not path.is_file():
        raise TokenizerError(f"mistral-common is installed but {path} is missing; reinstall it")
    return path


def load_tokenizer(path: str | os.PathLike[str] | None = None) -> Tokenizer:
    """Tokenizer from a file, from a model directory, or (None) the bundled Mixtral one.

    A directory is searched for tokenizer.model, then tokenizer.json, then one tokenizer.model.v*.
    `TokenizerNotFoundError` if it holds none; a file that exists but cannot be read is a
    `TokenizerError` naming it (never silently skipped for another file or the bundled tokenizer).
    """
    if path is None:
        return Tokenizer(default_tokenizer_path())
    path = Path(path)
    if path.is_file():
        return Tokenizer(path)
    if not path.is_dir():
        raise TokenizerNotFoundError(f"{path} is neither a tokenizer file nor a directory")
    for name in _DIR_CANDIDATES:
        if (path / name).is_file():
            return Tokenizer(path / name)
    versioned = sorted(path.glob(_MISTRAL_GLOB))
    if len(versioned) == 1:
        return Tokenizer(versioned[0])
    if len(versioned) > 1:
        names = ", ".join(p.name for p in versioned)
        raise TokenizerError(f"{path} holds several tokenizers ({names}); pass the file path instead")
    looked_for = ", ".join((*_DIR_CANDIDATES, _MISTRAL_GLOB))
    raise TokenizerNotFoundError(
        f"no tokenizer in {path}: looked for {looked_for}. Copy the model's tokenizer file there, "
        "or call load_tokenizer() with no argument for the bundled Mixtral tokenizer."
    )


def sentencepiece_to_tokenizer_json(model_file: str | os.PathLike[str]) -> str:
    """A Hugging Face tokenizer.json (as text) equivalent to a Llama-style SentencePiece BPE model.

    This is transformers' legacy LlamaConverter done without protobuf (which transformers needs to
    read a .model and which this package does not depend on): vocab in id order, merges ranked by
    the score of the merged piece (not its id: Mistral appended whitespace-run pieces with score
    -1e9 that must merge last), Prepend("▁") + Replace(" ", "▁") as normalizer, byte fallback.
    Exact only for identity-normalized BPE models; `save_tokenizer` verifies the result.
    """
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    n = sp.vocab_size()
    vocab = {sp.id_to_piece(i): i for i in range(n)}
    ranked = []
    for piece, i in vocab.items():
        if sp.is_control(i) or sp.is_byte(i) or sp.is_unknown(i):
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-sp.get_score(i), i, vocab[left], vocab[right], left, right))
    ranked.sort()
    merges = [(left, right) for *_, left, right in ranked]
    unk = sp.id_to_piece(sp.unk_id())
    tk = tokenizers.Tokenizer(
        BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
    )
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    specials = [i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)]
    tk.add_special_tokens(
        [tokenizers.AddedToken(sp.id_to_piece(i), special=True, normalized=False) for i in specials]
    )
    bos = sp.id_to_piece(sp.bos_id())
    # HF adds BOS through the post-processor; transformers' add_special_tokens=True relies on it.
    tk.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, sp.bos_id())]
    )
    return tk.to_str()


def save_tokenizer(tok: Tokenizer, directory: str | os.PathLike[str]) -> list[Path]:
    """Write `tok` so that both `load_tokenizer(directory)` and transformers' AutoTokenizer read it.

    A SentencePiece source is copied to `tokenizer.model` and, because transformers 5 can only
    read a bare .model with protobuf installed (it otherwise misreads it as tiktoken), also
    converted to `tokenizer.json` and checked to encode like the .model. A tokenizer.json source
    is copied verbatim. `tokenizer_config.json` names the class PreTrainedTokenizerFast, which
    uses tokenizer.json as is (LlamaTokenizer would rebuild the pipeline and drop a space from
    text that starts with whitespace), and carries the Mixtral-Instruct `chat_template`
    (`mixtral.text.chat_template`), so `apply_chat_template` gives mistral-common's ids. For that,
    transformers must parse the template's `<s>`/`</s>` as control tokens: `split_special_tokens`
    is false, as in the official Mixtral tokenizer, so in transformers a literal "<s>" typed in
    user text also becomes BOS (pass `split_special_tokens=True` to the tokenizer call, or
    `sanitize_control_tokens=True` to `apply_chat_template`, to prevent that). This package's own
    `Tokenizer` always treats it as text. Returns the files written.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if tok.kind == "sentencepiece":
        written.append(_copy(tok.source, out / "tokenizer.model"))
        converted = sentencepiece_to_tokenizer_json(tok.source)
        _check_conversion(tok, converted)
        (out / "tokenizer.json").write_text(converted, encoding="utf-8")
        written.append(out / "tokenizer.json")
    else:
        written.append(_copy(tok.source, out / "tokenizer.json"))
    special = {"bos_token": tok.id_to_piece(tok.bos_id), "eos_token": tok.id_to_piece(tok.eos_id)}
    if tok.pad_id is not None:
        special["pad_token"] = tok.id_to_piece(tok.pad_id)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "chat_template": CHAT_TEMPLATE,
    }
    for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
        (out / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        written.append(out / name)
    return written


def complete_tokenizer_files(directory: str | os.PathLike[str]) -> list[Path]:
    """Make a directory holding some tokenizer file (say only Mistral's tokenizer.model.v1) readable by
    transformers too: write tokenizer.json, tokenizer_config.json and special_tokens_map.json where
    missing, and add the chat template to a tokenizer_config.json that has none (one that has a
    template keeps its own). Returns the files written or changed."""
    out = Path(directory)
    if (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file():
        config_path = out / "tokenizer_config.json"
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise TokenizerError(f"{config_path} is not readable JSON: {e}") from e
        if not isinstance(config, dict) or config.get("chat_template"):
            return []
        config["chat_template"] = CHAT_TEMPLATE
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return [config_path]
    return save_tokenizer(load_tokenizer(out), out)


def _copy(source: Path, target: Path) -> Path:
    if not (target.exists() and target.samefile(source)):
        shutil.copyfile(source, target)
    return target


def _check_conversion(tok: Tokenizer, converted: str) -> None:
    hf = tokenizers.Tokenizer.from_str(converted)
    hf.encode_special_tokens = True
    for text in _PROBE_TEXTS:
        if hf.encode(text, add_special_tokens=False).ids != tok.encode(text, bos=False):
            raise TokenizerError(
                f"converting {tok.source} to tokenizer.json changes how {text!r} is encoded; "
                "only Llama-style BPE SentencePiece models (identity normalizer) convert exactly"
            )


class StreamDecoder:
    """Turns token ids arriving one at a time into text, emitting only complete characters.

    Invariant: the concatenation of every `push` result and the final `flush` equals
    `tok.decode(all_ids)` (with a `context`: what `tok.decode(context + ids)` adds to
    `tok.decode(context)`). Each step decodes a short window that starts at the previous emit
    point and subtracts the text already emitted for that window, so SentencePiece's
    dummy-prefix space is stripped on both sides and cancels; a window whose text ends in U+FFFD
    is an unfinished byte-fallback UTF-8 sequence and is held back until its last byte arrives.
    """

    def __init__(self, tok: Tokenizer, context: Sequence[int] = ()) -> None:
        """`context`: ids already shown (a prompt); the text pushed after them is decoded as their
        continuation, so a first token that starts a word keeps its leading space."""
        self._tok = tok
        self._ids: list[int] = [int(i) for i in context]
        # start of the window (a few context tokens back, in case the last ones are partial UTF-8
        # bytes); its text up to _read has been emitted
        self._prefix = max(0, len(self._ids) - 4)
        self._read = len(self._ids)

    def push(self, token_id: int) -> str:
        """New complete text after `token_id`, or "" if it completes nothing yet."""
        self._ids.append(int(token_id))
        return self._emit(final=False)

    def flush(self) -> str:
        """Whatever is held back (a truly invalid byte sequence decodes to U+FFFD here)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        done = self._tok.decode(self._ids[self._prefix : self._read])
        text = self._tok.decode(self._ids[self._prefix :])
        if len(text) <= len(done) or (text.endswith("\ufffd") and not final):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(done) :]


def decode_stream(tok: Tokenizer, ids: Iterable[int]) -> Iterator[str]:
    """Yield the non-empty text pieces of `ids` as they complete (see `StreamDecoder`)."""
    decoder = StreamDecoder(tok)
    for token_id in ids:
        if piece := decoder.push(token_id):
            yield piece
    if piece := decoder.flush():
        yield piece
