"""routing_report: files, escaping and self-containment of the report.

The rendered page in a real headless Chromium: tests/integration/test_routing_report_chromium.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers import PNG_MAGIC, REPORT_IDS, REPORT_PNGS, TRICKY, synthetic_report

from mixtral.analysis.routing_report import write_report


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory) -> tuple[dict, Path]:
    report = synthetic_report()
    out = tmp_path_factory.mktemp("report")
    page = write_report(report, out / "nested")
    assert page == out / "nested" / "report.html"
    return report, page


def test_files_written(report_dir):
    report, page = report_dir
    out = page.parent
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["report.json", "report.html", *REPORT_PNGS]
    )  # no temp files
    assert json.loads((out / "report.json").read_text()) == report
    for name in REPORT_PNGS:
        data = (out / name).read_bytes()
        assert len(data) > 1000 and data[:8] == PNG_MAGIC, name


def test_html_escaped_and_self_contained(report_dir):
    report, page = report_dir
    text = page.read_text(encoding="utf-8")
    assert "&lt;b&gt;&amp;&quot;" in text
    assert TRICKY not in text and "<b>&" not in text
    assert "maths &amp; &lt;tex&gt;" in text and "<tex>" not in text
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.I)
    assert text.count('src="data:image/png;base64,') == len(REPORT_PNGS)
    for i in REPORT_IDS:
        assert f'id="{i}"' in text
    # hover text lists every layer's top-k for a token
    assert re.search(r'title="L0: e\d 0\.\d\d, e\d 0\.\d\d \| L1: [^"]* \| L3: e\d', text)
    assert "runs/&lt;tiny&gt;" in text  # optional source block
    # the Table 5 layout: per domain, same-first then top-k overlap at each highlighted layer, in percent
    row = "".join(f"<td>{100 * report['repetition']['code'][key][layer]:.1f}</td>"
                  for key in ("same_first", "topk_overlap") for layer in report["layers"])  # fmt: skip
    assert f"<tr><td>code</td>{row}</tr>" in text
    assert f"<td>{100 * report['baselines']['topk_overlap']:.1f}</td>" in text


def test_top1_and_many_experts(tmp_path):
    report = synthetic_report(domains=("a", "b"), n_layers=2, E=24, k=1)
    for d in report["domains"]:
        del report["expert_share"][d]["second"]
    del report["source"]
    page = write_report(report, tmp_path)
    assert "e23" in page.read_text(encoding="utf-8")


def test_interval_above_a_near_zero_observation(tmp_path):
    """A random router's JS is below its (upward-biased) bootstrap interval: the report still renders."""
    report = synthetic_report()
    sp = report["specialisation"]
    sp["ci95"] = [[v + 0.01 for v in sp["js_bits"]], [v + 0.03 for v in sp["js_bits"]]]
    assert write_report(report, tmp_path).exists()


def test_import_leaves_matplotlib_alone():
    """The library draws on `matplotlib.figure.Figure`: no pyplot, no backend switch (no global state)."""
    import mixtral.analysis.routing_report as mod

    source = Path(mod.__file__).read_text()
    assert "pyplot" not in source and not re.search(r"matplotlib\.use\(|\buse\(", source)
