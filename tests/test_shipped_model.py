"""The shipped mini model: loads in our loader and in transformers with the same logits, writes domain text."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mixtral.checkpoint import load_model
from mixtral.generate import generate
from mixtral.tokenizer import load_tokenizer

MINI = Path(__file__).resolve().parent.parent / "models" / "mini"
pytestmark = pytest.mark.skipif(
    not (MINI / "config.json").exists(), reason="models/mini is not in this checkout"
)


@pytest.fixture(scope="module")
def mini():
    return load_model(MINI).eval(), load_tokenizer(MINI)


def test_transformers_loads_it_with_the_same_logits(mini):
    transformers = pytest.importorskip("transformers")
    model, tok = mini
    hf = transformers.MixtralForCausalLM.from_pretrained(MINI, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(MINI)
    text = "def main():\n    return 0\nLa ville de Paris"
    ids = tok.encode(text, bos=True)
    assert hf_tok(text)["input_ids"] == ids
    tokens = torch.tensor([ids])
    with torch.no_grad():
        assert (hf(tokens).logits - model(tokens).logits).abs().max() < 1e-4


def test_it_writes_recognisable_code_and_french(mini):
    model, tok = mini
    code, french = generate(model, tok, ["def read_config(path):\n", "La commande suivante permet de"],
                            max_new_tokens=48, temperature=0.0)  # fmt: skip
    assert any(marker in code.text for marker in ("    ", "return", "self", "(", ":")), code.text
    assert (
        sum(
            w in f" {french.text} "
            for w in (" le ", " la ", " les ", " de ", " des ", " un ", " une ", " est ")
        )
        >= 2
    ), french.text
