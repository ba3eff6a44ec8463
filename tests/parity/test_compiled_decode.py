"""The compiled decode step (torch.compile on the static cache) generates the eager step's tokens."""

from __future__ import annotations

import pytest
from helpers import tiny_config, token_rows

from mixtral.inference import generate_ids
from mixtral.kernels import apply_kernels
from mixtral.model import Transformer


# A compile failure makes generate_ids fall back to the eager step with this warning: an error here,
# or the test would compare eager with eager.
@pytest.mark.filterwarnings("error:torch.compile of the decode step failed")
def test_compiled_decode_step_equals_eager():
    """A ragged batch of two prompts, nine decode steps, on the model `load_model` gives (kernels
    applied: the MoE kernel keeps the step one graph; plain SortedDispatch would break the graph at
    its expert counts and recompile per routing pattern)."""
    pytest.importorskip("torch._inductor")
    model = apply_kernels(Transformer(tiny_config()).eval())
    prompts = [[5, 6, 7, 8], [9, 10]]
    eager = token_rows(generate_ids(model, prompts, max_new_tokens=10), 2)
    compiled = token_rows(generate_ids(model, prompts, max_new_tokens=10, compile=True), 2)
    assert len(eager[0]) == len(eager[1]) == 10
    assert compiled == eager
