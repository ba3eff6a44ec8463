"""The routing report renders in a real headless Chromium: a non-blank screenshot, every section present,
the page's script finished without errors (skipped where chromium is not installed)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from helpers import PNG_MAGIC, REPORT_IDS, synthetic_report

from mixtral.analysis.routing_report import write_report


def _chromium(binary: str, page: Path, profile: Path, *extra: str) -> subprocess.Popen:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--window-size=1280,2000"]  # fmt: skip
    return subprocess.Popen([binary, *flags, *extra, page.resolve().as_uri()], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, errors="replace")  # fmt: skip


def test_chromium_renders(tmp_path):
    binary = shutil.which("chromium")
    if binary is None:
        pytest.skip("chromium is not installed (apt-get install chromium) - headless render check skipped")
    page = write_report(synthetic_report(), tmp_path / "report")
    shot = tmp_path / "shot.png"
    procs = [_chromium(binary, page, tmp_path / "p1", f"--screenshot={shot}"),
             _chromium(binary, page, tmp_path / "p2", "--dump-dom")]  # fmt: skip
    try:
        (_, log1), (dom, log2) = (p.communicate(timeout=60) for p in procs)
    finally:
        for p in procs:
            p.kill()
    assert procs[0].returncode == 0 and procs[1].returncode == 0, log1[-2000:] + log2[-2000:]
    assert shot.read_bytes()[:8] == PNG_MAGIC
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 50, "blank screenshot"
    body = re.search(r"<body[^>]*>", dom)
    assert body is not None, dom[:2000]
    assert 'data-ready="1"' in body.group(0) and "data-errors" not in body.group(0), body.group(0)
    for i in REPORT_IDS:
        assert f'id="{i}"' in dom
    console = [
        line for line in (log1 + log2).splitlines() if "CONSOLE" in line and re.search("Uncaught|Error", line)
    ]
    assert not console, console
