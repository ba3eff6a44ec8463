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
    """A random model of the same shape fails both checks; the trained one passes them."""
    model, tok = mini
    code = generate(model, tok, "import os\nimport sys\n\n\ndef main():\n    ", max_new_tokens=40)
    assert sum(m in code.text for m in ("self", "(", ")", "\n    ", "if ", "return", "append")) >= 4, (
        code.text
    )
    french = generate(
        model, tok, "La commande suivante permet de", max_new_tokens=40, temperature=0.7, top_p=0.9, seed=1
    )
    words = french.text.split()
    assert (
        sum(w in ("le", "la", "les", "de", "des", "un", "une", "est", "et", "du", "veuillez") for w in words)
        >= 3
    ), french.text
