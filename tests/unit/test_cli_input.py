"""Command-line values are range-checked at parse time: one `error:` line naming the flag, exit code 2,
before any model is loaded or any input read; the edges of each range are accepted; --device
resolves here (cpu) or fails in one line."""

from __future__ import annotations

import pytest
import torch

from mixtral.cli import build_parser, main
from mixtral.cli.common import resolve_device

MISSING = "/nonexistent/model"  # parse-time errors come before the "does not exist" of loading
GEN = ["generate", MISSING, "prompt"]
ROUTING = ["routing", MISSING, "--out", "/nonexistent/report"]


@pytest.mark.parametrize(
    ("argv", "flag", "words"),
    [
        ([*GEN, "--max-new-tokens", "0"], "--max-new-tokens", "max_new_tokens must be a positive integer"),
        ([*GEN, "--max-new-tokens", "many"], "--max-new-tokens", "expected an integer, got 'many'"),
        ([*GEN, "--chunk-size", "0"], "--chunk-size", "chunk_size must be a positive integer, got 0"),
        ([*GEN, "--chunk-size", "-1"], "--chunk-size", "chunk_size must be a positive integer, got -1"),
        ([*GEN, "--temperature", "-0.5"], "--temperature", "temperature must be a finite number >= 0"),
        ([*GEN, "--temperature", "inf"], "--temperature", "finite"),
        ([*GEN, "--temperature", "nan"], "--temperature", "finite"),
        ([*GEN, "--top-p", "0"], "--top-p", "top_p must lie in (0, 1]"),
        ([*GEN, "--top-p", "1.5"], "--top-p", "top_p must lie in (0, 1]"),
        ([*GEN, "--top-k", "-1"], "--top-k", "top_k must be a non-negative integer"),
        ([*GEN, "--seed", "-1"], "--seed", "seed must be an integer in [0, 2**63 - 1]"),
        ([*GEN, "--seed", str(2**63)], "--seed", "seed must be an integer in [0, 2**63 - 1]"),
        ([*GEN, "--top-p"], "--top-p", "expected one argument"),
        ([*GEN, "--device", "tpu"], "--device", "invalid choice: 'tpu'"),
        (["chat", MISSING, "--temperature", "-1"], "--temperature", "temperature must be"),
        (["chat", MISSING, "--max-new-tokens", "0"], "--max-new-tokens", "max_new_tokens"),
        (["--threads", "0", "info", "tiny"], "--threads", "must be an integer >= 1, got 0"),
        (["--threads", "-1", "info", "tiny"], "--threads", "must be an integer >= 1, got -1"),
        (["quantize", MISSING, "--ppl-tokens", "-5"], "--ppl-tokens", "must be an integer >= 0, got -5"),
        (["quantize", MISSING, "--new-tokens", "1"], "--new-tokens", "must be an integer >= 2, got 1"),
        (
            ["quantize", MISSING, "--targets", ""],
            "--targets",
            "expected a comma list of experts, attention, output",
        ),
        (["quantize", MISSING, "--targets", "experts,mlp"], "--targets", "got 'experts,mlp'"),
        ([*ROUTING, "--max-tokens", "-1"], "--max-tokens", "must be an integer >= 0"),
        ([*ROUTING, "--seq-len", "1"], "--seq-len", "must be an integer >= 2, got 1"),
        ([*ROUTING, "--batch-size", "0"], "--batch-size", "must be an integer >= 1"),
        ([*ROUTING, "--samples", "-1"], "--samples", "must be an integer >= 0"),
        ([*ROUTING, "--bootstrap", "0"], "--bootstrap", "must be an integer >= 1"),
        ([*ROUTING, "--dtype", "fp16"], "--dtype", "(choose from 'fp32', 'bf16')"),
        (["demo", "--max-new-tokens", "0"], "--max-new-tokens", "must be an integer >= 1, got 0"),
        (["convert", MISSING, "/tmp/x", "--outtype", "q4"], "--outtype", "invalid choice: 'q4'"),
    ],
)
def test_bad_values_fail_at_parse_time_naming_the_flag(argv, flag, words, capsys, monkeypatch):
    class Untouchable:  # chat must fail before reading a line
        def isatty(self):
            return False

        def readline(self, *args):
            raise AssertionError("stdin was read")

    monkeypatch.setattr("sys.stdin", Untouchable())
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: argument {flag}: "), captured.err
    assert words in err[0] and "Traceback" not in captured.err and captured.out == ""


@pytest.mark.parametrize(
    ("argv", "field", "value"),
    [
        ([*GEN, "--max-new-tokens", "1"], "max_new_tokens", 1),
        ([*GEN, "--chunk-size", "1"], "chunk_size", 1),
        ([*GEN, "--temperature", "0"], "temperature", 0.0),
        ([*GEN, "--top-p", "1"], "top_p", 1.0),
        ([*GEN, "--top-p", "1e-9"], "top_p", 1e-9),
        ([*GEN, "--top-k", "0"], "top_k", 0),
        ([*GEN, "--seed", "0"], "seed", 0),
        ([*GEN, "--seed", str(2**63 - 1)], "seed", 2**63 - 1),
        (["--threads", "1", "info", "tiny"], "threads", 1),
        (["quantize", MISSING, "--ppl-tokens", "0"], "ppl_tokens", 0),
        (["quantize", MISSING, "--new-tokens", "2"], "new_tokens", 2),
        (["quantize", MISSING, "--targets", " attention, experts"], "targets", "attention,experts"),
        ([*ROUTING, "--max-tokens", "0"], "max_tokens", 0),
        ([*ROUTING, "--seq-len", "2"], "seq_len", 2),
        ([*ROUTING, "--samples", "0"], "samples", 0),
        ([*ROUTING, "--bootstrap", "1"], "bootstrap", 1),
        (["demo", "--max-new-tokens", "1"], "max_new_tokens", 1),
    ],
)
def test_range_edges_are_accepted(argv, field, value):
    assert getattr(build_parser().parse_args(argv), field) == value


def test_a_malformed_command_line_still_gets_the_usage(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--temperature", "0.5"])  # the positionals are missing
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: mixtral generate") and "required: path, prompt" in err


@pytest.mark.parametrize("command", ["generate", "chat", "quantize", "routing", "demo"])
def test_every_model_command_has_device_auto_by_default(command):
    argv = {"generate": GEN, "chat": ["chat", MISSING], "quantize": ["quantize", MISSING],
            "routing": ROUTING, "demo": ["demo"]}[command]  # fmt: skip
    assert build_parser().parse_args(argv).device == "auto"
    assert build_parser().parse_args([*argv, "--device", "cpu"]).device == "cpu"


@pytest.mark.skipif(
    torch.cuda.is_available() or torch.backends.mps.is_available(), reason="an accelerator is here"
)
def test_device_auto_is_the_cpu_here():
    assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
@pytest.mark.parametrize(
    "argv",
    [
        [*GEN, "--device", "cuda"],
        ["chat", MISSING, "--device", "cuda"],
        ["quantize", MISSING, "--device", "cuda", "--ppl-tokens", "0"],
        [*ROUTING, "--device", "cuda"],
        ["demo", "--device", "cuda", "--model", MISSING],
    ],
)
def test_device_cuda_without_cuda_is_one_error_line(argv, capsys):
    """Before the path is looked at: the device error, not "does not exist"."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --device cuda: no CUDA device is available to this torch build/process"]


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="MPS is available here")
def test_device_mps_without_mps_is_one_error_line(capsys):
    assert main([*GEN, "--device", "mps"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --device mps: Apple's Metal backend is not available here"]
