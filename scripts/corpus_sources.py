"""Extracts plain-text documents from the Debian packages and generators the corpus is built from.

Used by scripts/build_corpus.py. Each extractor takes the root of an unpacked package (`dpkg-deb
-x`) and returns `(source_id, text)` pairs in a stable order; cleaning, deduplication, caps and the
train/valid split are the builder's job. Nothing here touches the network or the system.
"""

from __future__ import annotations

import gzip
import hashlib
import re
import struct
import subprocess
import unicodedata
import zlib
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from html.parser import HTMLParser
from pathlib import Path

Doc = tuple[str, str]  # (source id, text)

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\u200b\ufeff]")
_BLANKS = re.compile(r"\n{3,}")


def clean(text: str) -> str:
    """NFC, Unix newlines, no control characters or trailing spaces, at most one blank line in a row."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return _BLANKS.sub("\n\n", text).strip("\n")


_STOPWORDS = {
    "en": "the and of to is in that it for with are this be as you by on not or can from which if an your will",
    "fr": "le la les de des et est un une du en que qui pour dans pas sur par au avec ce il vous sont ou",
    "de": "der die das und ist nicht ein eine zu den von mit sich des auf für im dem wird sie werden oder auch es kann",
    "es": "el la los las de y que en un una es por para con no se del al como su o lo si puede",
    "it": "il la le di e che è un una per non in del della con si sono da al come i gli lo o può",
}
_WORDS = {lang: set(words.split()) for lang, words in _STOPWORDS.items()}


def drop_english(text: str, lang: str) -> str:
    """Paragraphs of a translated document minus those left untranslated in English."""
    kept = []
    for para in text.split("\n\n"):
        words = re.findall(r"\w+", para.lower())
        en = sum(w in _WORDS["en"] for w in words)
        native = sum(w in _WORDS[lang] for w in words)
        if len(words) < 8 or en <= 2 * native:
            kept.append(para)
    return "\n\n".join(kept)


def fingerprint(text: str) -> str:
    return hashlib.sha256(" ".join(text.lower().split()).encode("utf-8")).hexdigest()


def merge_small(parts: list[Doc], min_chars: int) -> list[Doc]:
    """Join consecutive parts until each has at least `min_chars` (keeps the first part's id)."""
    out: list[Doc] = []
    for sid, text in parts:
        if out and len(out[-1][1]) < min_chars:
            out[-1] = (out[-1][0], out[-1][1] + "\n\n" + text)
        else:
            out.append((sid, text))
    return out


def _read_text(path: Path) -> str | None:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if b"\x00" in raw:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")  # old TeX sources; the characters are the same, re-encoded


# ---------------------------------------------------------------- code


_CODE_SKIP = re.compile(r"/(test|tests|idle_test|encodings|pydoc_data|__phello__|site-packages)/")


def python_stdlib(root: Path, max_bytes: int = 300_000) -> list[Doc]:
    """Every stdlib module's source, minus tests, generated codec tables and huge data modules."""
    docs = []
    for path in sorted(root.glob("usr/lib/python3*/**/*.py")):
        rel = "/" + str(path.relative_to(root))
        if path.is_symlink() or _CODE_SKIP.search(rel) or path.stat().st_size > max_bytes:
            continue
        docs.append((rel.lstrip("/"), path.read_text(encoding="utf-8", errors="replace")))
    return docs


# ---------------------------------------------------------------- literature


def _read_strsxp(blob: bytes, pos: int) -> list[str]:
    """The R character vector (STRSXP) serialized at `pos` of an XDR stream."""
    flags, length = struct.unpack(">ii", blob[pos : pos + 8])
    if flags & 0xFF != 16:
        raise ValueError(f"expected a character vector (STRSXP), got type {flags & 0xFF}")
    pos += 8
    out = []
    for _ in range(length):
        _, n = struct.unpack(">ii", blob[pos : pos + 8])
        pos += 8
        out.append("" if n < 0 else blob[pos : pos + n].decode("utf-8"))
        pos += max(n, 0)
    return out


def _r_header_end(blob: bytes) -> int:
    """Offset just past the header of an XDR R serialization (format 2 or 3)."""
    if not blob.startswith(b"X\n"):
        raise ValueError("not an XDR R serialization")
    pos = 2 + 12  # magic, then format version, R version, minimal R version
    if struct.unpack(">i", blob[2:6])[0] == 3:
        (n,) = struct.unpack(">i", blob[pos : pos + 4])
        pos += 4 + n  # native encoding name
    return pos


def _r_lazyload(db_dir: Path, name: str) -> dict[str, list[str]]:
    """Character vectors of an R lazy-load database (`name.rdx` index + `name.rdb` blobs).

    The index is a list whose `variables` element is a named list of (offset, length) integer
    pairs into the .rdb; each blob there is a 4-byte length and a zlib stream of one object.
    """
    index = gzip.decompress((db_dir / f"{name}.rdx").read_bytes())
    pairs = re.findall(rb"\x00\x00\x00\r\x00\x00\x00\x02(.{8})", index, re.S)  # INTSXP of length 2
    names = _read_strsxp(index, index.index(b"\x00\x00\x00\x05names") + 9)
    blobs = (db_dir / f"{name}.rdb").read_bytes()
    out = {}
    for var, pair in zip(names, pairs[: len(names)], strict=True):
        offset, length = struct.unpack(">ii", pair)
        blob = zlib.decompress(blobs[offset + 4 : offset + length])
        out[var] = _read_strsxp(blob, _r_header_end(blob))
    return out


_CHAPTER = re.compile(r"^(CHAPTER|Chapter)\s+[IVXLC\d]+\.?\s*$")


def jane_austen(root: Path) -> list[Doc]:
    """Jane Austen's six novels (r-cran-janeaustenr's data), one document per chapter."""
    (db_dir,) = root.glob("usr/lib/R/site-library/janeaustenr/data")
    docs = []
    for novel, lines in sorted(_r_lazyload(db_dir, "Rdata").items()):
        title = next(line for line in lines if line.strip())
        chapters: list[list[str]] = [[]]
        for line in lines:
            if _CHAPTER.match(line.strip()):
                chapters.append([])
            chapters[-1].append(line)
        for i, chapter in enumerate(chapters[1:], start=1):  # chapters[0]: title page and contents
            docs.append((f"{novel}/chapter-{i:03d}", f"{title.strip().title()}\n\n" + "\n".join(chapter)))
    return docs


_OSIS_NOTE = re.compile(r"<note\b.*?</note>", re.S)
_OSIS_BREAK = re.compile(r"<(?:div|l|lg)\b[^>]*sID=[^>]*/>|<title\b[^>]*>")
_TAG = re.compile(r"<[^>]+>")


def world_english_bible(root: Path) -> list[Doc]:
    """The World English Bible (public domain) from its SWORD zText module, one document per chapter."""
    (module,) = root.glob("usr/share/sword/modules/texts/ztext/*")
    docs = []
    for testament in ("ot", "nt"):
        bzs, bzz = (module / f"{testament}.bzs").read_bytes(), (module / f"{testament}.bzz").read_bytes()
        bzv = (module / f"{testament}.bzv").read_bytes()
        blocks = []
        for i in range(len(bzs) // 12):
            offset, size, _ = struct.unpack("<III", bzs[12 * i : 12 * i + 12])
            blocks.append(zlib.decompress(bzz[offset : offset + size]))
        verses = []  # the verse index gives entry boundaries, so verses never run together
        for i in range(len(bzv) // 10):
            block, offset, size = struct.unpack("<IIH", bzv[10 * i : 10 * i + 10])
            if size:
                verses.append(blocks[block][offset : offset + size].decode("utf-8"))
        docs += _osis_chapters(" ".join(verses), testament)
    return docs


def _osis_chapters(osis: str, testament: str) -> list[Doc]:
    docs = []
    for book in re.split(r'(?=<div\b(?=[^>]*type="book")(?=[^>]*sID=)[^>]*>)', osis):
        book_id = re.search(r'osisID="([^"]+)"', book)
        name = re.search(r'<milestone n="([^"]+)" type="x-usfm-toc2"', book)
        if not book_id or not name:
            continue
        for part in re.split(r"(?=<chapter\b[^>]*sID=)", book)[1:]:
            number = re.search(r'<chapter\b[^>]*\bn="(\d+)"', part)
            # A footnote sits between two words with no space around it: keep one word break.
            text = _OSIS_NOTE.sub(lambda m, p=part: " " if p[m.end() : m.end() + 2] == "<w" else "", part)
            text = _OSIS_BREAK.sub("\n", text)
            text = re.sub(r"[ \t]+", " ", _TAG.sub("", text)).replace(" \n", "\n")
            sid = f"{testament}/{book_id.group(1)}.{number.group(1) if number else 0}"
            docs.append((sid, f"{name.group(1)} {number.group(1) if number else ''}\n\n{text.strip()}"))
    return docs


# ---------------------------------------------------------------- dictionaries


def dictd(root: Path, name: str, page_chars: int = 6000) -> list[Doc]:
    """A dictd dictionary's entries, grouped in headword order into pages of about `page_chars`."""
    (index_path,) = root.glob(f"usr/share/dictd/{name}.index")
    data = gzip.decompress(index_path.with_name(f"{name}.dict.dz").read_bytes())
    spans = set()
    for line in index_path.read_text(encoding="utf-8", errors="replace").splitlines():
        word, offset, length = line.split("\t")[:3]
        if not word.startswith("00"):  # 00-database-info etc. are metadata, not entries
            spans.add((_b64_int(offset), _b64_int(length)))
    pages: list[Doc] = []
    current: list[str] = []
    for offset, length in sorted(spans):
        current.append(data[offset : offset + length].decode("utf-8", errors="replace").strip())
        if sum(map(len, current)) >= page_chars:
            pages.append((f"{name}@{offset}", "\n\n".join(current)))
            current = []
    if current:
        pages.append((f"{name}@end", "\n\n".join(current)))
    return pages


def _b64_int(s: str) -> int:
    """dictd's base64 numbers: most significant digit first, alphabet A-Za-z0-9+/."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    value = 0
    for c in s:
        value = value * 64 + alphabet.index(c)
    return value


# ---------------------------------------------------------------- HTML


class _HTMLText(HTMLParser):
    """Visible text of an XHTML page: blocks on their own lines, <pre> verbatim, navigation dropped."""

    SKIP_TAGS = {"head", "script", "style", "nav"}
    SKIP_CLASSES = {"toc", "docnav", "navheader", "navfooter", "list-of-tables", "list-of-figures"}
    SKIP_IDS = {"banner", "title"}
    BLOCKS = {"p", "div", "br", "li", "dt", "dd", "tr", "table", "pre", "blockquote", "h3", "h4", "h5", "h6"}
    VOID = {"br", "img", "hr", "meta", "link", "input", "col", "area", "base", "wbr"}
    SECTION = "\x00section\x00"

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._stack: list[tuple[str, bool]] = []  # (tag, starts a skipped subtree)
        self._skip = 0
        self._pre = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        skipped = (
            tag in self.SKIP_TAGS
            or bool(set((a.get("class") or "").split()) & self.SKIP_CLASSES)
            or a.get("id") in self.SKIP_IDS
        )
        if tag not in self.VOID:
            self._stack.append((tag, skipped))
            self._skip += skipped
            self._pre += tag == "pre"
        if self._skip:
            return
        if tag in ("h1", "h2"):
            self.parts.append(self.SECTION)
        elif tag in self.BLOCKS or tag in ("h1", "h2"):
            self.parts.append("\n")
        elif tag in ("td", "th"):
            self.parts.append("\t")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.VOID or not any(t == tag for t, _ in self._stack):
            return
        while self._stack:
            t, skipped = self._stack.pop()
            self._skip -= skipped
            self._pre -= t == "pre"
            if t == tag:
                break
        if not self._skip and (tag in self.BLOCKS or tag in ("h1", "h2")):
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data if self._pre else re.sub(r"\s+", " ", data))


def html_sections(path: Path, min_chars: int = 3000) -> list[str]:
    """An HTML page's text, split before each <h1>/<h2> and merged back to at least `min_chars`."""
    parser = _HTMLText()
    parser.feed(path.read_text(encoding="utf-8", errors="replace"))
    text = "".join(parser.parts)
    sections = [re.sub(r"\n[ \t]+", "\n", s) for s in text.split(_HTMLText.SECTION)]
    merged = merge_small([("", s.strip()) for s in sections if s.strip()], min_chars)
    return [t for _, t in merged]


def html_docs(root: Path, pattern: str, skip: Iterable[str] = ("index",)) -> list[Doc]:
    """Sections of every HTML page matching `pattern` below `root`, minus tables of contents."""
    docs = []
    for path in sorted(root.glob(pattern)):
        if path.name.split(".")[0] in skip:
            continue
        rel = str(path.relative_to(root))
        docs += [(f"{rel}#{i}", text) for i, text in enumerate(html_sections(path))]
    return docs


# ---------------------------------------------------------------- man pages


def _render_man(path: Path) -> str | None:
    source = gzip.decompress(path.read_bytes())
    if source.lstrip().startswith(b".so "):
        return None  # an alias of another page
    # Left-adjusted (no justification spaces: `.ad l`, and `.ad` disabled so .TH cannot undo it),
    # no hyphenation, tables through tbl, one continuous page, no bold/underline overstriking.
    cmd = ["groff", "-mandoc", "-t", "-Tutf8", "-k", "-Kutf-8", "-rHY=0", "-rcR=1", "-rLL=78n", "-P-cbou"]
    source = b".ad l\n.de ad\n..\n" + source
    result = subprocess.run(cmd, input=source, capture_output=True, timeout=60, check=False)
    if result.returncode != 0:
        return None
    lines = result.stdout.decode("utf-8", errors="replace").strip("\n").split("\n")
    return "\n".join(lines[1:-1])  # drop the running header and footer


def man_pages(root: Path, lang: str | None, workers: int = 4) -> list[Doc]:
    """Every page of a man-page package rendered to plain text, one document per page."""
    base = root / "usr/share/man" / (lang or "")
    paths = sorted(p for p in base.glob("man*/*.gz") if p.is_file() and not p.is_symlink())
    with ThreadPoolExecutor(workers) as pool:  # groff runs in subprocesses: threads suffice
        texts = list(pool.map(_render_man, paths))
    return [(str(p.relative_to(root)), t) for p, t in zip(paths, texts, strict=True) if t]


# ---------------------------------------------------------------- TeX


def texlive_licences(root: Path, package: str) -> dict[str, str]:
    """CTAN package name -> licence, from the Debian package's Licenses file (TeX Catalogue data)."""
    text = gzip.decompress((root / f"usr/share/doc/{package}/Licenses.gz").read_bytes()).decode("utf-8")
    out = {}
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z0-9_.+-]+): ?(\S*)", line)
        if m and not line.startswith(("texmf", " ")):
            out[m.group(1)] = m.group(2)
    return out


def tex_sources(root: Path, max_bytes: int = 400_000) -> list[tuple[str, str, str]]:
    """(source id, CTAN package, text) of every .tex/.ltx file (or .gz of one) in the doc tree."""
    out = []
    for path in sorted((root / "usr/share/doc/texlive-doc").rglob("*")):
        name = path.name.removesuffix(".gz")
        if not path.is_file() or not name.endswith((".tex", ".ltx")) or path.stat().st_size > max_bytes:
            continue
        rel = path.relative_to(root / "usr/share/doc/texlive-doc")
        text = _read_text(path)
        if text is not None and len(rel.parts) > 2:
            out.append((str(rel), rel.parts[1], text))
    return out
