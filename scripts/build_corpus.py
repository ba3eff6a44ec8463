#!/usr/bin/env python3
"""Builds the committed default corpus, data/corpus/, from Debian packages and our math generator.

    python scripts/build_corpus.py [--out data/corpus] [--cache ~/.cache/mixtral-corpus] [--latest]

Needs a Debian (bookworm) system with `apt-get update` done, `dpkg-deb` and `groff` (for man
pages). Packages are fetched with `apt-get download` into the cache and unpacked there with
`dpkg-deb -x`: nothing is installed. The versions are pinned to those in the existing
MANIFEST.json, so a rebuild reproduces the committed files byte for byte; `--latest` takes
whatever apt offers today (and records it).

Pipeline: extract documents per source -> clean (NFC, no control characters or trailing blanks)
-> drop English paragraphs from the fr/de/es/it domains -> drop documents under 200 characters
-> exact deduplication across the whole corpus (whitespace- and case-insensitive) -> cap each
source at a fixed number of characters by a seeded choice of whole documents -> per domain, a
validation split of whole documents chosen by hash of (seed, domain, document id): 3% of the
characters, at least 100,000 -> `<domain>/{train,valid}.jsonl.xz` with records
`{"text", "source"}` and MANIFEST.json (files, counts, sha256, sources with version and licence).
Only sources whose Debian copyright file states a licence that allows redistribution are used;
the licence string recorded is the one read from that file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import random
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import corpus_sources as cs  # noqa: E402
from debian_packages import copyright_text, dep5_licences, fetch  # noqa: E402

from mixtral.data import mathgen  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SEED = 0
VALID_FRACTION, MIN_VALID_CHARS, MIN_DOC_CHARS = 0.03, 100_000, 200
# Licence names (as Debian copyright files and the TeX Catalogue spell them) that allow
# redistribution of modified copies; anything else stops the build.
ALLOWED = re.compile(
    r"^(public[- ]domain|pd|l?gpl|g?fdl|bsd|mit|expat|isc|psf|apache|cc-by(-sa)?-[0-9.]+|cc0|lppl|"
    r"linux-man-pages-copyleft|artistic|zlib)",
    re.I,
)
TEX_LICENCES = re.compile(
    r"^(lppl[0-9.a-c]*|l?gpl[0-9+]*|pd|mit|bsd[0-9]*|isc|apache2|cc-by(-sa)?-[0-9]|cc0|fdl)$"
)


@dataclass
class Source:
    """One Debian package (or generator) feeding a domain, with its cap and licence rule."""

    package: str
    extract: Extractor
    cap: int  # characters kept, chosen as whole documents
    licence: str | None = None  # None: read from the DEP-5 copyright file
    evidence: str | None = None  # regex that must occur in a non-DEP-5 copyright file
    note: str = ""
    copyright_package: str | None = None  # where the copyright file is, if not in `package`
    meta: dict = field(default_factory=dict)


Extractor = Callable[[Path, "Source"], list[cs.Doc]]


def _man(lang: str | None) -> Extractor:
    return lambda root, _: cs.man_pages(root, lang)


def _html(pattern: str) -> Extractor:
    return lambda root, _: cs.html_docs(root, pattern)


def _dict(name: str) -> Extractor:
    return lambda root, _: cs.dictd(root, name)


def _python(root: Path, _: Source) -> list[cs.Doc]:
    return cs.python_stdlib(root)


def _tex(root: Path, source: Source) -> list[cs.Doc]:
    """TeX files whose CTAN package's licence (TeX Catalogue, via Debian) allows redistribution."""
    licences = cs.texlive_licences(root, source.package)
    docs, used = [], {}
    for sid, ctan, text in cs.tex_sources(root):
        licence = licences.get(ctan, "")
        if TEX_LICENCES.match(licence):
            docs.append((sid, text))
            used[ctan] = licence
    source.meta["ctan_licences"] = used  # the builder keeps only those of documents it selects
    return docs


def _language(lang: str, region: str) -> list[Source]:
    return [
        Source(f"manpages-{lang}", _man(lang), 2_500_000, note="translated man pages (manpages-l10n)"),
        Source(
            "debian-handbook", _html(f"usr/share/doc/debian-handbook/html/{lang}-{region}/*.html"), 1_300_000
        ),
        Source(f"debian-reference-{lang}", _html(f"usr/share/debian-reference/*.{lang}.html"), 700_000),
        Source(f"maint-guide-{lang}", _html(f"usr/share/doc/maint-guide-{lang}/html/*.html"), 350_000),
    ]


_PSF = ("PSF-2.0", r"PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2")
LANGUAGES = ("fr", "de", "es", "it")
DOMAINS: dict[str, tuple[str, list[Source]]] = {
    "code": (
        "Python source code: the CPython 3.11 standard library (no tests, codec tables or data modules)",
        [
            Source(
                "libpython3.11-stdlib", _python, 4_500_000, *_PSF, copyright_package="libpython3.11-minimal"
            ),
            Source("libpython3.11-minimal", _python, 1_500_000, *_PSF),
        ],
    ),
    "math": ("DeepMind-Mathematics-style questions and answers from mixtral.data.mathgen (seed 0)", []),
    "literature": (
        "English literature: Jane Austen's six novels and the World English Bible, one chapter per document",
        [
            Source(
                "r-cran-janeaustenr",
                lambda root, _: cs.jane_austen(root),
                4_500_000,
                note="the novels are public-domain Project Gutenberg texts",
            ),
            Source(
                "sword-text-web",
                lambda root, _: cs.world_english_bible(root),
                2_500_000,
                note="World English Bible, public domain",
            ),
        ],
    ),
    "encyclopedic": (
        "English reference prose: dictionaries (GCIDE/Webster 1913, FOLDOC, Jargon File), man pages, "
        "Debian manuals, and 'Copyright Does Not Exist'",
        [
            Source("dict-gcide", _dict("gcide"), 1_500_000, "GPL-2+", r"GNU General Public License"),
            Source(
                "dict-foldoc", _dict("foldoc"), 1_000_000, "GFDL-1.1+", r"GNU Free Documentation\s+License"
            ),
            Source("dict-jargon", _dict("jargon"), 600_000),
            Source("manpages", _man(None), 1_000_000),
            Source("debian-reference-en", _html("usr/share/debian-reference/*.en.html"), 600_000),
            Source("debian-handbook", _html("usr/share/doc/debian-handbook/html/en-US/*.html"), 1_000_000),
            Source("maint-guide", _html("usr/share/doc/maint-guide/html/*.html"), 300_000),
            Source(
                "cfi-en", _html("usr/share/doc/cfi-en/html/*.htm"), 600_000, "public-domain", r"public domain"
            ),
        ],
    ),
    "latex": (
        "LaTeX sources of TeX Live package documentation and publishers' article templates",
        [
            Source("texlive-science-doc", _tex, 1_600_000),
            Source("texlive-publishers-doc", _tex, 2_400_000),
            Source("texlive-latex-recommended-doc", _tex, 1_000_000),
            Source("texlive-latex-base-doc", _tex, 800_000),
        ],
    ),
    "fr": ("French: man pages, Debian handbook, Debian reference, maintainers' guide", _language("fr", "FR")),
    "de": ("German: man pages, Debian handbook, Debian reference, maintainers' guide", _language("de", "DE")),
    "es": (
        "Spanish: man pages, Debian handbook, Debian reference, maintainers' guide",
        _language("es", "ES"),
    ),
    "it": (
        "Italian: man pages, Debian handbook, Debian reference, maintainers' guide",
        _language("it", "IT"),
    ),
}
MATH_CHARS, MATH_ITEMS_PER_DOC = 4_000_000, 16


# ---------------------------------------------------------------- packages and licences


def licence_of(source: Source, copyright_root: Path) -> str:
    """The licence recorded for `source`, checked against its copyright file and the allow-list."""
    text = copyright_text(copyright_root, source.copyright_package or source.package)
    if source.licence is not None:
        if source.evidence and not re.search(source.evidence, text):
            sys.exit(
                f"{source.package}: copyright file no longer matches {source.evidence!r}; re-check its licence"
            )
        licence = source.licence
    elif text.startswith("Format:"):
        licence = " / ".join(dep5_licences(text))
    else:
        licence = "per CTAN package (TeX Catalogue via Debian's Licenses file)"
        if not source.package.startswith("texlive-"):
            sys.exit(f"{source.package}: copyright file is not DEP-5; give its licence and evidence by hand")
    parts = re.split(r"\s+(?:and|or)\s+|\s*/\s*", licence) if source.meta.get("ctan_licences") is None else []
    bad = [p for p in parts if p and not ALLOWED.match(p)]
    if bad:
        sys.exit(f"{source.package}: licence {bad} is not known to allow redistribution")
    return licence


# ---------------------------------------------------------------- cleaning and selection


def cap(docs: list[cs.Doc], limit: int, key: str) -> list[cs.Doc]:
    """Whole documents, chosen in a seeded random order, until `limit` characters; original order kept."""
    order = list(range(len(docs)))
    random.Random(f"{SEED}:{key}").shuffle(order)
    chosen, total = set(), 0
    for i in order:
        if total >= limit:
            break
        chosen.add(i)
        total += len(docs[i][1])
    return [d for i, d in enumerate(docs) if i in chosen]


def split_valid(docs: list[dict], domain: str) -> tuple[list[dict], list[dict]]:
    """Whole documents to validation, by hash order, until 3% of the characters (>= 100,000)."""
    total = sum(len(d["text"]) for d in docs)
    target = max(VALID_FRACTION * total, MIN_VALID_CHARS)
    order = sorted(docs, key=lambda d: hashlib.sha256(f"{SEED}:{domain}:{d['source']}".encode()).hexdigest())
    valid, chars = set(), 0
    for d in order:
        if chars >= target:
            break
        valid.add(d["source"])
        chars += len(d["text"])
    return [d for d in docs if d["source"] not in valid], [d for d in docs if d["source"] in valid]


def math_docs() -> list[cs.Doc]:
    docs, chars, i = [], 0, 0
    while chars < MATH_CHARS:
        items = [mathgen.item_at(j, SEED) for j in range(i, i + MATH_ITEMS_PER_DOC)]
        text = "\n\n".join(item.text for item in items)
        docs.append((f"items-{i:07d}-{i + MATH_ITEMS_PER_DOC - 1:07d}", text))
        chars, i = chars + len(text), i + MATH_ITEMS_PER_DOC
    return docs


# ---------------------------------------------------------------- build


def build_source(
    domain: str, source: Source, cache: Path, pins: dict[str, str], seen: set[str]
) -> tuple[list[dict], dict]:
    t0 = time.time()
    root, version = fetch(source.package, pins.get(source.package), cache)
    croot = (
        fetch(source.copyright_package, pins.get(source.copyright_package), cache)[0]
        if source.copyright_package
        else root
    )
    raw = source.extract(root, source)
    licence = licence_of(source, croot)
    docs, local, duplicates = [], set(), 0
    for sid, text in raw:
        text = cs.clean(text)
        if domain in LANGUAGES:
            text = cs.clean(cs.drop_english(text, domain))
        fp = cs.fingerprint(text)
        if len(text) < MIN_DOC_CHARS:
            continue
        if fp in seen or fp in local:
            duplicates += 1
            continue
        local.add(fp)
        docs.append((sid, text))
    selected = cap(docs, source.cap, f"{domain}:{source.package}")
    seen.update(cs.fingerprint(t) for _, t in selected)
    entry = {
        "package": source.package,
        "version": version,
        "licence": licence,
        "copyright": f"/usr/share/doc/{source.copyright_package or source.package}/copyright",
        "documents": len(selected),
        "characters": sum(len(t) for _, t in selected),
        "documents_available": len(docs),
        "duplicates_dropped": duplicates,
    }
    if source.note:
        entry["note"] = source.note
    if "ctan_licences" in source.meta:
        used = {Path(sid).parts[1] for sid, _ in selected}
        entry["ctan_licences"] = {k: v for k, v in sorted(source.meta["ctan_licences"].items()) if k in used}
    print(
        f"  {domain:12s} {source.package:30s} {len(selected):6d} docs {entry['characters']:>10,d} chars "
        f"({len(docs)} available, {duplicates} duplicates) {time.time() - t0:5.1f}s",
        file=sys.stderr,
    )
    return [{"text": t, "source": f"{source.package}:{sid}"} for sid, t in selected], entry


def build_math() -> tuple[list[dict], dict]:
    docs = math_docs()
    entry = {
        "generator": "mixtral.data.mathgen",
        "seed": SEED,
        "items": len(docs) * MATH_ITEMS_PER_DOC,
        "items_per_document": MATH_ITEMS_PER_DOC,
        "modules": list(mathgen.MODULES),
        "licence": "Apache-2.0 (generated by this repository's code)",
        "documents": len(docs),
        "characters": sum(len(t) for _, t in docs),
    }
    return [{"text": t, "source": f"mathgen:{sid}"} for sid, t in docs], entry


def write_split(records: list[dict], path: Path) -> dict:
    path.parent.mkdir(parents=True, exist_ok=True)
    records = sorted(records, key=lambda r: r["source"])
    data = "".join(
        json.dumps({"text": r["text"], "source": r["source"]}, ensure_ascii=False) + "\n" for r in records
    )
    blob = lzma.compress(data.encode("utf-8"), preset=9 | lzma.PRESET_EXTREME)
    path.write_bytes(blob)
    return {
        "documents": len(records),
        "characters": sum(len(r["text"]) for r in records),
        "bytes": len(blob),
        "sha256": hashlib.sha256(blob).hexdigest(),
    }


def pins_from(manifest_path: Path) -> dict[str, str]:
    if not manifest_path.is_file():
        return {}
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    return {
        s["package"]: s["version"]
        for entry in manifest["domains"].values()
        for s in entry["sources"]
        if "package" in s
    } | manifest.get("copyright_packages", {})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "data" / "corpus")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "mixtral-corpus")
    parser.add_argument("--latest", action="store_true", help="ignore the versions pinned in MANIFEST.json")
    args = parser.parse_args()
    pins = {} if args.latest else pins_from(args.out / "MANIFEST.json")
    seen: set[str] = set()
    domains, copyright_packages = {}, {}
    for domain, (description, sources) in DOMAINS.items():
        records, entries = [], []
        if domain == "math":
            records, math_entry = build_math()
            entries.append(math_entry)
        for source in sources:
            recs, entry = build_source(domain, source, args.cache, pins, seen)
            records += recs
            entries.append(entry)
            if source.copyright_package:
                copyright_packages[source.copyright_package] = fetch(
                    source.copyright_package, pins.get(source.copyright_package), args.cache
                )[1]
        train, valid = split_valid(records, domain)
        files = {}
        for split, recs in (("train", train), ("valid", valid)):
            rel = f"{domain}/{split}.jsonl.xz"
            files[split] = {"path": rel, **write_split(recs, args.out / rel)}
        domains[domain] = {"description": description, "files": files, "sources": entries}
        print(
            f"{domain}: train {files['train']['characters']:,} chars / valid {files['valid']['characters']:,} "
            f"-> {files['train']['bytes'] + files['valid']['bytes']:,} bytes",
            file=sys.stderr,
        )
    debian = Path("/etc/debian_version").read_text().strip() if Path("/etc/debian_version").exists() else "?"
    manifest = {
        "name": "mixtral default corpus",
        "format": '<domain>/{train,valid}.jsonl.xz: xz-compressed JSON lines {"text": str, "source": str}; '
        "source is '<debian package>:<path in the package>[#section]' or 'mathgen:items-<first>-<last>'",
        "builder": "scripts/build_corpus.py",
        "built_on": f"Debian {debian}",
        "seed": SEED,
        "valid_split": f"whole documents by hash order, {VALID_FRACTION:.0%} of characters, at least {MIN_VALID_CHARS:,}",
        "copyright_packages": copyright_packages,
        "domains": domains,
        "totals": {
            "documents": sum(f["documents"] for d in domains.values() for f in d["files"].values()),
            "characters": sum(f["characters"] for d in domains.values() for f in d["files"].values()),
            "bytes": sum(f["bytes"] for d in domains.values() for f in d["files"].values()),
        },
    }
    (args.out / "MANIFEST.json").write_text(
        json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    print(f"total {manifest['totals']}", file=sys.stderr)


if __name__ == "__main__":
    main()
