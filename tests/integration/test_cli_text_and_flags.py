"""What the command line does with awkward input: prompts and stdin that are not UTF-8 (replaced by
U+FFFD, one note), `generate --stream` printing the prompt like plain mode, piped `chat` printing one
JSON-string line per answer, and `convert` refusing flag combinations it would ignore and naming
--overwrite."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
from helpers import save_tiny_model

from mixtral.cli import main

NOTE = "is not valid UTF-8; undecodable bytes were replaced by U+FFFD"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("text") / "model")


# ---- non-UTF-8 input ----------------------------------------------------------------------------


def test_undecodable_prompt_bytes_become_replacement_characters(model_dir, capsys):
    """Python hands argv bytes that are not UTF-8 over as lone surrogates ("ab\\xff" -> "ab\\udcff");
    they reached the tokenizer's C++ and ended in a pybind11 cast traceback."""
    argv = ["generate", str(model_dir), "ab\udcff", "--max-new-tokens", "2", "--json", "--stop", "\udcfe"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["prompt"] == "ab\ufffd"
    assert captured.err.strip().splitlines() == [f"note: the prompt {NOTE}"]  # once, for prompt and --stop
    assert main(["generate", str(model_dir), "ab\udcff", "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.startswith("ab\ufffd")


@pytest.mark.parametrize("errors", ["strict", "surrogateescape"])  # a UTF-8 locale's stdin; C.UTF-8's
def test_chat_stdin_with_undecodable_bytes(model_dir, errors, capsys, monkeypatch):
    stdin = io.TextIOWrapper(
        io.BytesIO(b"hi \xff there\nand \xfe\xfd again\n"), encoding="utf-8", errors=errors
    )
    monkeypatch.setattr("sys.stdin", stdin)
    assert main(["chat", str(model_dir), "--max-new-tokens", "3", "--temperature", "0"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 2
    assert captured.err.strip().splitlines() == [f"note: the input {NOTE}"]


def test_chat_subprocess_with_undecodable_stdin(model_dir):
    """The real thing: bytes on the stdin of `python -m mixtral chat`."""
    env = {**os.environ, "LC_ALL": "C.UTF-8", "MIXTRAL_NO_KERNELS": "1"}
    done = subprocess.run([sys.executable, "-m", "mixtral", "chat", str(model_dir), "--max-new-tokens", "3",
                           "--temperature", "0"], input=b"caf\xe9 au lait\n\xff\n", capture_output=True,
                          env=env, timeout=300)  # fmt: skip
    err = done.stderr.decode()
    assert done.returncode == 0 and "Traceback" not in err, err
    answers = [json.loads(line) for line in done.stdout.decode().splitlines()]
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert err.count(NOTE) == 1


# ---- output shapes ------------------------------------------------------------------------------


def test_stream_prints_the_prompt_like_plain_mode(model_dir, capsys):
    argv = ["generate", str(model_dir), "Once upon a time", "--max-new-tokens", "5"]
    assert main(argv) == 0
    plain = capsys.readouterr().out
    assert main([*argv, "--stream"]) == 0
    streamed = capsys.readouterr().out
    assert plain.startswith("Once upon a time") and streamed == plain


def test_piped_chat_prints_one_json_line_per_answer(model_dir, capsys, monkeypatch):
    """Answers with newlines (any kind str.splitlines knows), quotes and blank lines in them still
    come out one line each."""
    answers = iter([["First line.\n", '\nSecond "quoted" line'], [" \\ back\\slash", "\u2028\x85\r\n"], []])
    seen: list[list[int]] = []

    def fake_stream(model, tok, ids, config):
        seen.append(ids)
        yield from next(answers)

    monkeypatch.setattr("mixtral.cli.generate.stream", fake_stream)
    monkeypatch.setattr("sys.stdin", io.StringIO("one\ntwo\nthree\n"))
    assert main(["chat", str(model_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()  # splits on \u2028 and \x85 too
    assert [json.loads(line) for line in lines] == [
        'First line.\n\nSecond "quoted" line',
        "\\ back\\slash\u2028\x85\r\n",
        "",
    ]
    assert len(seen) == 3 and len(seen[1]) > len(seen[0])  # each turn carries the history


# ---- convert's flags ----------------------------------------------------------------------------


def _one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("to", [["--to", "hf"], ["--to", "mistral"], []])
def test_convert_refuses_outtype_without_gguf(model_dir, to, tmp_path, capsys):
    assert main(["convert", str(model_dir), str(tmp_path / "out"), *to, "--outtype", "q8_0"]) == 2
    line = _one_error(capsys)
    assert "--outtype q8_0" in line and "--to " in line and "--to gguf" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dst", ["{tmp}/new/", "{tmp}"])
def test_convert_to_gguf_needs_a_file_path(model_dir, dst, tmp_path, capsys):
    """A destination ending in / was written as a file named like the directory."""
    dst = dst.format(tmp=tmp_path)
    assert main(["convert", str(model_dir), dst, "--to", "gguf"]) == 2
    assert "--to gguf writes one .gguf file" in _one_error(capsys)
    assert not (tmp_path / "new").exists()


def test_convert_names_the_overwrite_flag(model_dir, tmp_path, capsys):
    assert main(["convert", str(model_dir), str(tmp_path / "m")]) == 0
    capsys.readouterr()
    assert main(["convert", str(model_dir), str(tmp_path / "m")]) == 2
    line = _one_error(capsys)
    assert "pass --overwrite" in line and "overwrite=True" not in line
    assert main(["convert", str(model_dir), str(tmp_path / "m"), "--overwrite"]) == 0


def test_gguf_overwrite_names_the_flag(model_dir, tmp_path, capsys):
    pytest.importorskip("gguf")
    (tmp_path / "m.gguf").write_bytes(b"old")
    assert main(["convert", str(model_dir), str(tmp_path / "m.gguf"), "--to", "gguf"]) == 2
    line = _one_error(capsys)
    assert "pass --overwrite" in line and "overwrite=True" not in line
    assert (tmp_path / "m.gguf").read_bytes() == b"old"


def test_gguf_without_the_gguf_package_is_one_line(model_dir, tmp_path, capsys, monkeypatch):
    """A ModuleNotFoundError is no MixtralError/OSError/ValueError: it was a traceback."""
    monkeypatch.delitem(sys.modules, "mixtral.checkpoint.gguf_export", raising=False)
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now fails as if not installed
    assert main(["convert", str(model_dir), str(tmp_path / "m.gguf"), "--to", "gguf"]) == 2
    assert "GGUF export needs the gguf package: pip install 'mixtral[gguf]'" in _one_error(capsys)
