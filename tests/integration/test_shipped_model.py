"""The shipped mini model: loads in our loader and in transformers with the same logits, writes domain text."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mixtral.checkpoint import load_model
from mixtral.inference import generate
from mixtral.model import Transformer
from mixtral.text.tokenizer import load_tokenizer

MINI = Path(__file__).resolve().parents[2] / "models" / "mini"
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


CODE_PROMPT = "class Parser(object):\n    def __init__(self, text):\n        self."
FRENCH_PROMPT = "La commande suivante permet de"
FRENCH_WORDS = ("le", "la", "les", "de", "des", "un", "une", "est", "et", "du", "dans", "pour", "par", "en")


def _looks_like_python(text: str) -> bool:
    return sum(m in text for m in ("self", "(", ")", "\n    ", "if ", "return", ":\n", "None")) >= 5


def _looks_french(text: str) -> bool:
    return sum(w in FRENCH_WORDS for w in text.split()) >= 4


def _samples(model, tok) -> tuple[str, str]:
    """What `mixtral generate --temperature 0.7 --top-p 0.9 --seed 1` writes for the two prompts."""
    kw = dict(max_new_tokens=60, temperature=0.7, top_p=0.9, seed=1)
    return generate(model, tok, CODE_PROMPT, **kw).text, generate(model, tok, FRENCH_PROMPT, **kw).text


def test_it_writes_recognisable_code_and_french(mini):
    """Sampled text: Python after a Python prompt, French after a French one (greedy decoding of a
    model this small falls into loops)."""
    code, french = _samples(*mini)
    assert _looks_like_python(code), code
    assert _looks_french(french), french
    assert not _looks_french(code) and not _looks_like_python(french)


def test_an_untrained_model_fails_the_same_checks(mini):
    model, tok = mini
    torch.manual_seed(0)
    random = Transformer(model.config).eval()
    code, french = _samples(random, tok)
    assert not _looks_like_python(code) and not _looks_french(french)
