"""Fetches and unpacks Debian packages without installing them, and reads their licences.

Used by scripts/build_corpus.py: `apt-get download` (as any user, into a cache directory) and
`dpkg-deb -x`; the licence comes from the package's /usr/share/doc/<package>/copyright.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path


def fetch(package: str, version: str | None, cache: Path) -> tuple[Path, str]:
    """Unpacked root and version of `package` (the pinned version if given), via apt-get download."""
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)

    def find() -> Path | None:
        for deb in sorted(debs.glob(f"{package}_*.deb")):
            if version is None or _deb_field(deb, "Version") == version:
                return deb
        return None

    deb = find()
    if deb is None:
        spec = f"{package}={version}" if version else package
        result = subprocess.run(["apt-get", "download", spec], cwd=debs, capture_output=True, text=True)
        deb = find()
        if result.returncode != 0 or deb is None:
            hint = " (that version may be gone from the archive: try --latest)" if version else ""
            sys.exit(f"apt-get download {spec} failed{hint}; run `apt-get update` first?\n{result.stderr}")
    root = cache / "unpacked" / deb.stem
    if not (root / ".done").exists():
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
        (root / ".done").touch()
    return root, _deb_field(deb, "Version")


def _deb_field(deb: Path, name: str) -> str:
    return subprocess.run(
        ["dpkg-deb", "-f", str(deb), name], capture_output=True, text=True, check=True
    ).stdout.strip()


def copyright_text(root: Path, package: str) -> str:
    doc = root / "usr/share/doc" / package
    if doc.is_symlink():  # e.g. libpython3.11-stdlib -> libpython3.11-minimal (same source package)
        raise SystemExit(f"{package}: its copyright file lives in another package ({doc.readlink()})")
    return (doc / "copyright").read_text(encoding="utf-8", errors="replace")


def dep5_licences(text: str) -> list[str]:
    """Short licence names of a DEP-5 copyright file's stanzas, except those for debian/*."""
    names = []
    for stanza in re.split(r"\n\s*\n", text):
        files = re.search(r"^Files:\s*(.+)$", stanza, re.M)
        licence = re.search(r"^License:\s*(.+)$", stanza, re.M)
        if files and licence and not files.group(1).strip().startswith("debian/"):
            names.append(licence.group(1).strip())
    return sorted(set(names))
