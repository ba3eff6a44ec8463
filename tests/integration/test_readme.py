"""The README's Python snippet runs as written, on the shipped mini model, from a fresh directory."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_readme_python_snippet_runs_as_written(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert blocks, "the README has no Python snippet"
    (tmp_path / "models").symlink_to(ROOT / "models")  # the snippet names models/mini, relative
    run = subprocess.run([sys.executable, "-c", blocks[0]], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "out-dir" / "config.json").is_file() and (
        tmp_path / "out-dir" / "tokenizer.json"
    ).is_file()
