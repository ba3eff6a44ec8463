"""lm-evaluation-harness scores a served model through `local-completions` exactly as its `hf` backend
scores the same checkpoint in transformers (log-likelihoods within 1e-4), offline, on a local task."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_serve import MINI, Server

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("fastapi")

DATA = Path(__file__).resolve().parents[1] / "data" / "lm_eval" / "cloze.jsonl"
TASK = """task: mixtral_cloze
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""


def loglikelihoods(result: dict) -> list[float]:
    """Every (document, choice) log-likelihood of a run, in document and choice order."""
    samples = sorted(result["samples"]["mixtral_cloze"], key=lambda s: s["doc_id"])
    return [float(resp[0][0]) for s in samples for resp in s["resps"]]


def test_local_completions_equal_the_hf_backend(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "cloze.yaml").write_text(TASK.format(data=DATA))
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tasks = TaskManager(include_path=str(tmp_path / "tasks"))
    reference = simple_evaluate(model="hf", model_args=f"pretrained={MINI},dtype=float32", tasks=["mixtral_cloze"],
                                task_manager=tasks, log_samples=True, batch_size=4, device="cpu")  # fmt: skip
    server = Server("--max-model-len", "512")
    try:
        served = simple_evaluate(
            model="local-completions",
            model_args=f"model=mini,base_url={server.url}/v1/completions,tokenizer={MINI},"
            # BOS as the hf backend's tokenizer adds it (Mixtral is trained with it; lm-eval's API
            # models leave it out unless asked).
            "tokenizer_backend=huggingface,tokenized_requests=True,max_retries=1,num_concurrent=2,add_bos_token=True",
            tasks=["mixtral_cloze"], task_manager=tasks, log_samples=True,
        )  # fmt: skip
    finally:
        server.stop()
    ours, theirs = loglikelihoods(served), loglikelihoods(reference)
    assert len(ours) == len(theirs) == 36
    assert max(abs(a - b) for a, b in zip(ours, theirs, strict=True)) < 1e-4
    assert served["results"]["mixtral_cloze"]["acc,none"] == reference["results"]["mixtral_cloze"]["acc,none"]
    assert os.environ["HF_HUB_OFFLINE"] == "1"
