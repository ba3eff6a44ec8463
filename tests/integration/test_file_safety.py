"""Nothing is lost: writers refuse destinations that would destroy the source or files they do not own."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from helpers import save_tiny_model, tiny_config

from mixtral.checkpoint import convert, save_model
from mixtral.checkpoint.gguf_export import export_gguf
from mixtral.cli import main
from mixtral.data.tokenizer_train import train_tokenizer
from mixtral.model import Transformer


def tree(root: Path) -> dict[str, str]:
    """Every file below root and the sha256 of its bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "model"
    save_tiny_model(path)
    (path / "README.md").write_text("my notes")  # a file the user keeps beside the weights
    return path


@pytest.mark.parametrize("dst", [".", "sub", ".."], ids=["itself", "inside", "around"])
def test_convert_refuses_the_source_as_destination(ckpt, dst, capsys):
    before = tree(ckpt.parent)
    target = ckpt / dst
    with pytest.raises(FileExistsError, match="the source"):
        convert(ckpt, target, to="mistral", overwrite=True)
    assert main(["convert", str(ckpt), str(target), "--to", "mistral", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "the source" in err and err.count("\n") == 1
    assert tree(ckpt.parent) == before  # nothing deleted, nothing added


def test_overwrite_replaces_only_a_directory_of_checkpoint_files(ckpt, tmp_path):
    out = tmp_path / "out"
    convert(ckpt, out, to="mistral")
    convert(ckpt, out, to="mistral", overwrite=True)  # our own files: replaced
    assert (out / "consolidated.safetensors").is_file() and (out / "tokenizer.model").is_file()
    (out / "results.csv").write_text("precious")
    (out / "plots").mkdir()
    before = tree(out)
    with pytest.raises(FileExistsError, match=r"results\.csv.*plots/|plots/.*results\.csv"):
        convert(ckpt, out, to="hf", overwrite=True)
    with pytest.raises(FileExistsError, match="results.csv"):
        save_model(Transformer(tiny_config(vocab_size=32000)), out, overwrite=True)
    assert tree(out) == before
    with pytest.raises(FileExistsError, match="not empty"):
        convert(ckpt, out, to="hf")  # without overwrite a non-empty directory is refused as before


def test_gguf_export_never_replaces_a_file_that_is_not_gguf(ckpt):
    pytest.importorskip("gguf")
    weights = ckpt / "model.safetensors"
    before = weights.read_bytes()
    with pytest.raises(FileExistsError, match="not a .gguf file"):
        export_gguf(ckpt, weights, overwrite=True)
    assert weights.read_bytes() == before


def test_tokenizer_training_refuses_a_directory_holding_a_tokenizer(ckpt):
    before = tree(ckpt)
    with pytest.raises(FileExistsError, match="tokenizer.model"):
        train_tokenizer(["some text"] * 10, 300, ckpt)
    assert tree(ckpt) == before
