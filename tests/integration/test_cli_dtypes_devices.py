"""Every documented dtype on every command that takes one, with and without --quantize: it works
(exit 0, sensible output) or is refused up front in one `error:` line that names the dtypes that
work, never a traceback. And --device: the model is loaded where it says, the CPU-only work refuses
other devices in one line, and (where CUDA exists) generation on CUDA matches the CPU."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import save_tiny_model

from mixtral.cli import main
from mixtral.errors import MixtralError

DTYPES = ("fp32", "bf16", "fp16")
STORED = {"fp32": "F32", "bf16": "BF16", "fp16": "F16"}  # safetensors' names


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("dtypes") / "model")


@pytest.fixture(scope="module")
def domain_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("domains")
    (d / "code.txt").write_text("def f(x):\n    return x + 1\n\n" * 20)
    (d / "prose.txt").write_text("The cat sat on the mat and looked at the door.\n" * 20)
    return ["--data", f"code={d / 'code.txt'}", "--data", f"prose={d / 'prose.txt'}"]


def _run(argv, capsys) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    if code != 0:
        lines = captured.err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return code, captured.out, captured.err


def _stored_dtypes(directory: Path) -> set[str]:
    found = set()
    for f in directory.glob("*.safetensors"):
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        found |= {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    return found


# ---- the table ----------------------------------------------------------------------------------


@pytest.mark.parametrize("quantize", [None, "int8", "bf16"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_generate_every_dtype_and_quantize(model_dir, dtype, quantize, capsys):
    argv = ["generate", str(model_dir), "The capital of France is", "--max-new-tokens", "3", "--json",
            "--dtype", dtype] + (["--quantize", quantize] if quantize else [])  # fmt: skip
    code, out, _ = _run(argv, capsys)
    assert code == 0
    record = json.loads(out)
    assert len(record["token_ids"]) == 3 and all(0 <= t < 32000 for t in record["token_ids"])
    assert record["finish_reason"] == "length" and isinstance(record["text"], str)


@pytest.mark.parametrize("quantize", [None, "int8", "bf16"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_chat_every_dtype_and_quantize(model_dir, dtype, quantize, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\n"))
    argv = ["chat", str(model_dir), "--max-new-tokens", "3", "--temperature", "0.7", "--seed", "1",
            "--dtype", dtype] + (["--quantize", quantize] if quantize else [])  # fmt: skip
    code, out, _ = _run(argv, capsys)
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 1 and isinstance(json.loads(lines[0]), str)


@pytest.mark.parametrize("dtype", DTYPES)
def test_routing_fp32_and_bf16_work_fp16_is_refused_naming_them(
    model_dir, domain_files, dtype, tmp_path, capsys
):
    argv = ["routing", str(model_dir), *domain_files, "--max-tokens", "64", "--seq-len", "32",
            "--bootstrap", "2", "--samples", "0", "--quiet", "--dtype", dtype, "--out", str(tmp_path / "r")]  # fmt: skip
    code, out, err = _run(argv, capsys)
    if dtype == "fp16":
        assert code == 2 and "argument --dtype: invalid choice: 'fp16' (choose from 'fp32', 'bf16')" in err
        assert not (tmp_path / "r").exists()
    else:
        assert code == 0 and "report:" in out
        assert json.loads((tmp_path / "r" / "report.json").read_text())["source"]["dtype"] == dtype


@pytest.mark.parametrize("dtype", DTYPES)
def test_convert_every_dtype(model_dir, dtype, tmp_path, capsys):
    code, out, _ = _run(["convert", str(model_dir), str(tmp_path / "m"), "--dtype", dtype], capsys)
    assert code == 0 and "-> mistral checkpoint" in out
    assert _stored_dtypes(tmp_path / "m") == {STORED[dtype]}


@pytest.mark.parametrize("dtype", DTYPES)
def test_convert_to_gguf_refuses_dtype_naming_outtype(model_dir, dtype, tmp_path, capsys):
    argv = ["convert", str(model_dir), str(tmp_path / "m.gguf"), "--to", "gguf", "--dtype", dtype]
    code, _, err = _run(argv, capsys)
    assert code == 2 and f"--dtype {dtype}" in err and "--outtype f32|f16|q8_0" in err
    assert not (tmp_path / "m.gguf").exists()


def test_every_dtype_and_storage_computes_the_fp32_logits(model_dir):
    """Sensible, not just no crash: each dtype × storage the CLI offers gives finite logits within
    0.05 of fp32's (measured: at most 0.005 on this model)."""
    from mixtral.checkpoint import load_model
    from mixtral.cli.common import DTYPES as NAMES
    from mixtral.cli.common import QUANT_TARGETS
    from mixtral.quant import quantize_model
    from mixtral.text import load_tokenizer

    ids = torch.tensor([load_tokenizer(model_dir).encode("The capital of France is")])
    with torch.no_grad():
        reference = load_model(model_dir).eval()(ids).logits.float()
        for dtype in DTYPES:
            for storage in (None, "int8", "bf16"):
                model = load_model(model_dir, dtype=NAMES[dtype]).eval()
                if storage:
                    quantize_model(model, storage, QUANT_TARGETS)
                logits = model(ids).logits.float()
                assert torch.isfinite(logits).all(), (dtype, storage)
                assert (logits - reference).abs().max() < 0.05, (dtype, storage)


# ---- devices ------------------------------------------------------------------------------------


class _Stop(MixtralError):
    pass


@pytest.fixture
def load_spy(monkeypatch):
    """Records the device load_model is asked for, then stops the command (nothing is loaded)."""
    seen: list[torch.device] = []

    def spy(path, dtype=torch.float32, device="cpu", **kw):
        seen.append(torch.device(device))
        raise _Stop("stopped after load_model")

    monkeypatch.setattr("mixtral.checkpoint.load_model", spy)
    return seen


@pytest.fixture
def fake_cuda(monkeypatch):
    """Pretend CUDA is available, to see which device each command resolves (nothing runs there)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


@pytest.mark.parametrize(
    ("argv", "device"),
    [
        (["generate", "{m}", "hi", "--device", "cpu"], "cpu"),
        (["chat", "{m}", "--device", "cpu"], "cpu"),
        (["generate", "{m}", "hi"], "cuda"),  # auto: cuda when it is there
        (["chat", "{m}", "--device", "auto"], "cuda"),
        (["demo", "--model", "{m}", "--out", "{out}"], "cuda"),
        (["quantize", "{m}", "--device", "cuda", "--ppl-tokens", "0"], "cuda"),
        (["quantize", "{m}"], "cuda"),
        (["quantize", "{m}", "--device", "cpu"], "cpu"),
    ],
)
def test_the_model_is_loaded_on_the_resolved_device(
    argv, device, model_dir, tmp_path, load_spy, fake_cuda, capsys
):
    argv = [a.format(m=model_dir, out=tmp_path) for a in argv]
    assert main(argv) == 2 and "stopped after load_model" in capsys.readouterr().err
    assert [d.type for d in load_spy] == [device]


def test_routing_runs_on_the_resolved_device(model_dir, domain_files, tmp_path, load_spy, fake_cuda, capsys):
    """analyze_routing moves its batches to the model's device and reads the router logits back."""
    argv = ["routing", str(model_dir), *domain_files, "--out", str(tmp_path / "r")]
    assert main([*argv, "--device", "cpu"]) == 2 and "stopped after load_model" in capsys.readouterr().err
    assert main(argv) == 2 and "stopped after load_model" in capsys.readouterr().err
    assert [d.type for d in load_spy] == ["cpu", "cuda"]  # auto, with CUDA there


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_routing_on_cuda_matches_the_cpu(model_dir):
    from mixtral.analysis.routing import analyze_routing
    from mixtral.checkpoint import load_model
    from mixtral.data.domains import load_domains
    from mixtral.text import load_tokenizer

    tok = load_tokenizer(model_dir)
    domains, _ = load_domains(tok, {})
    reports = [
        analyze_routing(load_model(model_dir, device=d), domains, tok, max_tokens=512, seq_len=128, n_resamples=5,
                        progress=False).to_json()["repetition"]
        for d in ("cpu", "cuda")
    ]  # fmt: skip
    for domain in reports[0]:
        np.testing.assert_allclose(
            reports[1][domain]["same_first"], reports[0][domain]["same_first"], atol=0.02
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES)
def test_generate_on_cuda_matches_the_cpu(model_dir, dtype, capsys):
    argv = ["generate", str(model_dir), "The capital of France is", "--max-new-tokens", "4", "--json"]
    assert main([*argv, "--device", "cpu"]) == 0
    cpu = json.loads(capsys.readouterr().out)
    assert main([*argv, "--device", "cuda", "--dtype", dtype]) == 0
    cuda = json.loads(capsys.readouterr().out)
    assert len(cuda["token_ids"]) == 4
    if dtype == "fp32":
        assert cuda["token_ids"][0] == cpu["token_ids"][0]
    assert main([*argv, "--device", "cuda", "--quantize", "int8", "--seed", "0", "--temperature", "1"]) == 0
    assert len(json.loads(capsys.readouterr().out)["token_ids"]) == 4
