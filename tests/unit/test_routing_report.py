"""routing_report: files, escaping and self-containment of the report, and a real headless Chromium render."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from mixtral.analysis.routing_report import write_report

PNGS = ["expert_share.png", "repetition.png", "specialisation.png", "cache.png", "tokens.png"]
IDS = ["summary", "expert-share", "repetition", "specialisation", "cache", "tokens"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TRICKY = '<b>&"'


def synthetic_report(domains=("code", "fr", "maths & <tex>"), n_layers=4, E=4, k=2, seed=0) -> dict:
    """A small, internally consistent stand-in for `RoutingAnalysis.to_json()`."""
    rng = np.random.default_rng(seed)
    domains = list(domains)
    L = n_layers

    def shares():
        return rng.dirichlet(np.ones(E), size=L)

    expert_share = {d: {"first": shares().tolist(), "second": shares().tolist(), "either": shares().tolist()}
                    for d in domains}  # fmt: skip
    pooled = {kind: np.mean([expert_share[d][kind] for d in domains], 0).tolist() for kind in ("first", "second", "either")}  # fmt: skip
    js = rng.uniform(0.05, 0.3, L)
    baselines = {
        "share": 1 / E,
        "same_first": 1 / E,
        "topk_overlap": 1 - math.comb(E - k, k) / math.comb(E, k),
    }

    def routed_curve():
        return np.cumsum(np.sort(rng.dirichlet(np.ones(E), size=L), -1)[:, ::-1], -1).tolist()

    pieces = ["Hello", " world", TRICKY, "\n", "x", " =", " 1", "\n", "", " end"]
    samples = []
    for d in domains[:2]:
        T = len(pieces)
        experts = [[rng.choice(E, size=k, replace=False).tolist() for _ in range(T)] for _ in range(L)]
        weights = [[sorted(rng.dirichlet(np.ones(k)).round(4).tolist(), reverse=True) for _ in range(T)] for _ in range(L)]  # fmt: skip
        samples.append({"domain": d, "pieces": pieces, "token_ids": list(range(T)), "experts": experts, "weights": weights})  # fmt: skip
    return {
        "model": {
            "n_layers": L,
            "n_experts": E,
            "top_k": k,
            "dim": 32,
            "total_params": 123456,
            "active_params": 65432,
        },
        "n_layers": L,
        "n_experts": E,
        "top_k": k,
        "layers": [0, L - 1],
        "domains": domains,
        "tokens": {d: 1000 * (i + 1) for i, d in enumerate(domains)},
        "pairs": {d: 1000 * (i + 1) - 5 for i, d in enumerate(domains)},
        "baselines": baselines,
        "expert_share": expert_share,
        "expert_share_all": pooled,
        "specialisation": {
            "measure": "generalised Jensen-Shannon divergence (bits)",
            "js_bits": js.tolist(),
            "ci95": [(js - 0.02).tolist(), (js + 0.02).tolist()],
            "null_mean": [0.01] * L,
            "null_p95": [0.02] * L,
            "p_value": [0.005] * L,
            "per_domain_js_bits": {d: rng.uniform(0, 0.2, L).tolist() for d in domains},
        },
        "repetition": {
            d: {
                "same_first": rng.uniform(0.2, 0.6, L).tolist(),
                "topk_overlap": rng.uniform(0.5, 0.9, L).tolist(),
            }
            for d in domains
        },  # fmt: skip
        "cache": {
            "sizes": list(range(1, E + 1)),
            "routed": {d: routed_curve() for d in domains},
            "random": {d: [[c / E for c in range(1, E + 1)]] * L for d in domains},
        },
        "samples": samples,
        "timing": {"tokens": 6000, "seconds": 1.5},
        "source": {"model_path": "runs/<tiny>", "data": {d: f"data/{d}.txt" for d in domains}},
    }


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
        ["report.json", "report.html", *PNGS]
    )  # no temp files
    assert json.loads((out / "report.json").read_text()) == report
    for name in PNGS:
        data = (out / name).read_bytes()
        assert len(data) > 1000 and data[:8] == PNG_MAGIC, name


def test_html_escaped_and_self_contained(report_dir):
    report, page = report_dir
    text = page.read_text(encoding="utf-8")
    assert "&lt;b&gt;&amp;&quot;" in text
    assert TRICKY not in text and "<b>&" not in text
    assert "maths &amp; &lt;tex&gt;" in text and "<tex>" not in text
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.I)
    assert text.count('src="data:image/png;base64,') == len(PNGS)
    for i in IDS:
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


def _chromium(binary: str, page: Path, profile: Path, *extra: str) -> subprocess.Popen:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--window-size=1280,2000"]  # fmt: skip
    return subprocess.Popen([binary, *flags, *extra, page.resolve().as_uri()], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, errors="replace")  # fmt: skip


def test_chromium_renders(report_dir, tmp_path):
    binary = shutil.which("chromium")
    if binary is None:
        pytest.skip("chromium is not installed (apt-get install chromium) - headless render check skipped")
    _, page = report_dir
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
    for i in IDS:
        assert f'id="{i}"' in dom
    console = [
        line for line in (log1 + log2).splitlines() if "CONSOLE" in line and re.search("Uncaught|Error", line)
    ]
    assert not console, console
