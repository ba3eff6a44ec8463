"""Which tokenizer a command uses: the checkpoint's own; the bundled one only when there is none and the
vocabulary matches; a tokenizer file that cannot be read is an error naming it, never replaced."""

from __future__ import annotations

import pytest
from helpers import save_tiny_model, tiny_config

from mixtral.checkpoint import save_model
from mixtral.cli import main
from mixtral.errors import TokenizerError
from mixtral.model import Transformer
from mixtral.text import load_tokenizer


@pytest.fixture
def model_32k(tmp_path):
    return save_tiny_model(tmp_path / "m")


@pytest.mark.parametrize("bad", ["tokenizer.model", "tokenizer.json"])
def test_an_unreadable_tokenizer_file_is_an_error_naming_it(model_32k, bad, capsys):
    for name in ("tokenizer.model", "tokenizer.json"):
        (model_32k / name).unlink()
    (model_32k / bad).write_bytes(b"\x00garbage")
    assert main(["generate", str(model_32k), "Hi", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and bad in err and "bundled" not in err


def test_a_valid_json_beside_a_bad_model_file_is_not_silently_used_either(model_32k, capsys):
    (model_32k / "tokenizer.model").write_bytes(b"")  # the file looked for first
    assert main(["generate", str(model_32k), "Hi", "--max-new-tokens", "2"]) == 2
    assert "tokenizer.model" in capsys.readouterr().err


def test_no_tokenizer_uses_the_bundled_one_only_for_its_vocabulary(tmp_path, capsys):
    save_model(Transformer(tiny_config(vocab_size=32000)), tmp_path / "a", tokenizer_src=None)
    assert main(["generate", str(tmp_path / "a"), "Hi", "--max-new-tokens", "2"]) == 0
    assert "using the bundled Mixtral tokenizer" in capsys.readouterr().err
    save_model(Transformer(tiny_config(vocab_size=32768)), tmp_path / "b", tokenizer_src=None)
    assert main(["generate", str(tmp_path / "b"), "Hi", "--max-new-tokens", "2"]) == 2
    assert "not the bundled Mixtral tokenizer's (32000)" in capsys.readouterr().err


def test_text_with_a_lone_surrogate_is_a_tokenizer_error():
    with pytest.raises(TokenizerError, match="lone surrogate"):
        load_tokenizer(None).encode("ab\udcff")
