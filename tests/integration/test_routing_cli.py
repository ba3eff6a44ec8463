"""Routing analysis from a saved checkpoint: layer-by-layer execution routes like the whole model, and the
`mixtral routing` command writes its report or fails with a one-line error.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import random_docs, save_tiny_model, tiny_config

from mixtral.analysis.layerwise import LayerwiseModel
from mixtral.analysis.routing import analyze_routing
from mixtral.checkpoint import load_model
from mixtral.cli import main
from mixtral.data.packing import PackedStream


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(
        tmp_path_factory.mktemp("routing") / "model", tiny_config(vocab_size=32000, n_experts=8)
    )


def test_layerwise_model_routes_like_the_whole_model(model_dir):
    """Layer-by-layer execution from the checkpoint gives the same router logits and statistics."""
    whole = load_model(model_dir).eval()
    layerwise = LayerwiseModel(model_dir, dtype=torch.float32)
    data = {"x": random_docs(2, 10, 32000), "y": random_docs(3, 10, 32000)}
    batch = next(PackedStream(data, 64, shuffle=False, loop=False).batches(3))
    x, pos = batch.inputs, batch.positions
    with torch.no_grad():
        expected = whole(x, positions=pos).router_logits
    torch.testing.assert_close(layerwise.router_logits([(x, pos)])[0], expected, rtol=1e-5, atol=1e-5)
    kw = dict(seq_len=64, batch_size=4, n_resamples=10, progress=False, max_tokens=None)
    a, b = analyze_routing(whole, data, **kw).to_json(), analyze_routing(layerwise, data, **kw).to_json()
    for key in ("tokens", "pairs", "expert_share", "repetition", "cache", "samples"):
        assert a[key] == b[key], key


def test_routing_cli_writes_the_report(model_dir, tmp_path, capsys):
    (tmp_path / "code.txt").write_text("def f(x):\n    return x + 1\n\n" * 30)
    (tmp_path / "fr.jsonl").write_text(
        "\n".join(json.dumps({"text": f"Le chat numéro {i} dort."}) for i in range(40))
    )
    out = tmp_path / "report"
    argv = ["routing", str(model_dir), "--data", f"code={tmp_path / 'code.txt'}", "--data",
            f"fr={tmp_path / 'fr.jsonl'}", "--seq-len", "64", "--bootstrap", "10", "--quiet",
            "--keep-traces", "--layerwise", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "report:" in printed and "same 1st" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["domains"] == ["code", "fr"] and report["layers"] == [0, 1]
    assert (out / "report.html").stat().st_size > 10_000
    with np.load(out / "traces.npz") as traces:
        assert traces["code"].shape[0] == 2 and traces["code"].dtype == np.uint8


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--data", "nofile"], "DOMAIN=PATH"),
        (["--layers", "9"], "out of range"),
        (["--data", "a=/nonexistent/x.txt", "--data", "b=/nonexistent/y.txt"], "nonexistent"),
    ],
)
def test_routing_cli_errors(model_dir, tmp_path, capsys, extra, match):
    assert main(["routing", str(model_dir), *extra, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and match in err
