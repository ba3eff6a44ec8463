"""Shared test helpers (not fixtures): tiny configs, saved tiny models, the transformers oracle, small data.

Importable from every test folder as `from helpers import ...` (pyproject puts tests/ on sys.path).
Fixtures live in tests/conftest.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mixtral.checkpoint import save_model
from mixtral.checkpoint.configs import config_to_hf
from mixtral.config import MixtralConfig
from mixtral.data.packing import PackedStream, TokenizedDocs
from mixtral.model import Transformer
from mixtral.text.tokenizer import load_tokenizer
from mixtral.train.loop import TrainConfig

# ---- models -------------------------------------------------------------------------------------


def tiny_config(**changes) -> MixtralConfig:
    """A 2-layer, 4-expert, top-2, GQA 2 model with a 97-token vocabulary; `changes` as MixtralConfig.replace."""
    base = MixtralConfig(
        dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=48,
        n_experts=4, top_k=2, vocab_size=97, max_seq_len=256,
    )  # fmt: skip
    return base.replace(**changes)


def save_tiny_model(
    path: Path, model: Transformer | MixtralConfig | None = None, *, seed: int = 0, format: str = "hf"
) -> Path:
    """Save a model with the bundled Mixtral tokenizer (32000 pieces) as a checkpoint directory `path`.

    `model`: a Transformer to save as it is; a MixtralConfig, or None for tiny_config(vocab_size=32000),
    to save a random Transformer of that config built right after torch.manual_seed(seed).
    Returns `path`.
    """
    if not isinstance(model, Transformer):
        torch.manual_seed(seed)
        model = Transformer(model if model is not None else tiny_config(vocab_size=32000))
    save_model(model, path, format=format, tokenizer_src=load_tokenizer(None))
    return path


def hf_model(
    cfg: MixtralConfig | None = None,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    transformers_init: float | None = None,
    hf_overrides: dict[str, Any] | None = None,
    **changes: Any,
):
    """The oracle: transformers' MixtralForCausalLM for our config, in eval mode.

    Config: `cfg` (tiny_config() when None) with `changes` (MixtralConfig field names), written as a
    config.json by `config_to_hf(cfg, dtype)`; `hf_overrides` then sets config.json keys that our
    config cannot express (e.g. {"head_dim": None}: transformers derives hidden_size / heads).
    Weights: with `transformers_init` None, every tensor (norms too) i.i.d. N(0, 1) from a generator
    seeded `seed`, so that every tensor is distinguishable; with a float, transformers' own
    initialisation with that `initializer_range` after torch.manual_seed(seed). The model is cast
    to `dtype` last.
    """
    import transformers

    cfg = (cfg if cfg is not None else tiny_config()).replace(**changes)
    d = config_to_hf(cfg, dtype)
    if transformers_init is not None:
        d["initializer_range"] = transformers_init
    d.update(hf_overrides or {})
    if transformers_init is not None:
        torch.manual_seed(seed)
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**d))
    if transformers_init is None:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
    return model.to(dtype).eval()


def assert_state_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Same tensor names, and every tensor bit-equal with the same dtype."""
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert torch.equal(got[k], want[k]), k


# ---- data ---------------------------------------------------------------------------------------


def write_jsonl(path: Path, lines: Iterable[Any]) -> Path:
    """One JSON record per line (strings are written as they are, to make bad lines); returns `path`."""
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def random_docs(seed: int, n: int, vocab: int) -> TokenizedDocs:
    """n documents of 7 to 91 tokens: BOS, random ids in [3, vocab), EOS."""
    rng = np.random.default_rng(seed)
    return TokenizedDocs.from_lists(
        [1, *rng.integers(3, vocab, rng.integers(5, 90)).tolist(), 2] for _ in range(n)
    )


def train_stream(seed: int = 0, n_docs: int = 40, seq_len: int = 16) -> PackedStream:
    """n_docs random documents (7 to 31 tokens, ids below 97) dealt into domains "a" and "b", packed."""
    rng = np.random.default_rng(seed)
    docs = [[1, *rng.integers(3, 97, size=int(rng.integers(5, 30))).tolist(), 2] for _ in range(n_docs)]
    return PackedStream({"a": TokenizedDocs.from_lists(docs[::2]), "b": TokenizedDocs.from_lists(docs[1::2])},
                        seq_len, seed=seed)  # fmt: skip


def train_config(**changes) -> TrainConfig:
    """12 steps of 4 sequences, lr 3e-3 decaying to 3e-4 after 2 warmup steps, a log line every step,
    evaluation and checkpoints every 1000 steps; `changes` as dataclasses.replace."""
    base = TrainConfig(steps=12, batch_size=4, lr=3e-3, min_lr=3e-4, warmup_steps=2, log_every=1,
                       eval_every=1000, save_every=1000)  # fmt: skip
    return dataclasses.replace(base, **changes)


def token_rows(steps: Iterable[list[int | None]], batch: int) -> list[list[int]]:
    """generate_ids' steps (one token or None per row) regrouped as each row's tokens."""
    rows: list[list[int]] = [[] for _ in range(batch)]
    for step in steps:
        for b, t in enumerate(step):
            if t is not None:
                rows[b].append(t)
    return rows


# ---- the routing report -------------------------------------------------------------------------

REPORT_PNGS = ["expert_share.png", "repetition.png", "specialisation.png", "cache.png", "tokens.png"]
REPORT_IDS = ["summary", "expert-share", "repetition", "specialisation", "cache", "tokens"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TRICKY = '<b>&"'


def synthetic_report(domains=("code", "fr", "maths & <tex>"), n_layers=4, E=4, k=2, seed=0) -> dict:
    """A small, internally consistent stand-in for `RoutingAnalysis.to_json()`."""
    rng = np.random.default_rng(seed)
    domains = list(domains)
    L = n_layers

    def shares():
        return rng.dirichlet(np.ones(E), size=L)

    expert_share = {d: {"first": shares().tolist(), "second": shares().tolist(), "either": shares().tolist()}
                    for d in domains}  # fmt: skip
    pooled = {kind: np.mean([expert_share[d][kind] for d in domains], 0).tolist() for kind in ("first", "second", "either")}  # fmt: skip
    js = rng.uniform(0.05, 0.3, L)
    baselines = {
        "share": 1 / E,
        "same_first": 1 / E,
        "topk_overlap": 1 - math.comb(E - k, k) / math.comb(E, k),
    }

    def routed_curve():
        return np.cumsum(np.sort(rng.dirichlet(np.ones(E), size=L), -1)[:, ::-1], -1).tolist()

    pieces = ["Hello", " world", TRICKY, "\n", "x", " =", " 1", "\n", "", " end"]
    samples = []
    for d in domains[:2]:
        T = len(pieces)
        experts = [[rng.choice(E, size=k, replace=False).tolist() for _ in range(T)] for _ in range(L)]
        weights = [[sorted(rng.dirichlet(np.ones(k)).round(4).tolist(), reverse=True) for _ in range(T)] for _ in range(L)]  # fmt: skip
        samples.append({"domain": d, "pieces": pieces, "token_ids": list(range(T)), "experts": experts, "weights": weights})  # fmt: skip
    return {
        "model": {
            "n_layers": L,
            "n_experts": E,
            "top_k": k,
            "dim": 32,
            "total_params": 123456,
            "active_params": 65432,
        },
        "n_layers": L,
        "n_experts": E,
        "top_k": k,
        "layers": [0, L - 1],
        "domains": domains,
        "tokens": {d: 1000 * (i + 1) for i, d in enumerate(domains)},
        "pairs": {d: 1000 * (i + 1) - 5 for i, d in enumerate(domains)},
        "baselines": baselines,
        "expert_share": expert_share,
        "expert_share_all": pooled,
        "specialisation": {
            "measure": "generalised Jensen-Shannon divergence (bits)",
            "js_bits": js.tolist(),
            "ci95": [(js - 0.02).tolist(), (js + 0.02).tolist()],
            "null_mean": [0.01] * L,
            "null_p95": [0.02] * L,
            "p_value": [0.005] * L,
            "per_domain_js_bits": {d: rng.uniform(0, 0.2, L).tolist() for d in domains},
        },
        "repetition": {
            d: {
                "same_first": rng.uniform(0.2, 0.6, L).tolist(),
                "topk_overlap": rng.uniform(0.5, 0.9, L).tolist(),
            }
            for d in domains
        },  # fmt: skip
        "cache": {
            "sizes": list(range(1, E + 1)),
            "routed": {d: routed_curve() for d in domains},
            "random": {d: [[c / E for c in range(1, E + 1)]] * L for d in domains},
        },
        "samples": samples,
        "timing": {"tokens": 6000, "seconds": 1.5},
        "source": {"model_path": "runs/<tiny>", "data": {d: f"data/{d}.txt" for d in domains}},
    }


DISTRIBUTED = Path(__file__).resolve().parent / "distributed"


def torchrun(nproc: int, script: str | Path, *args: str, timeout: float = 240, env: dict | None = None):
    """Run `script` (a tests/distributed worker, a path, or "-m" with a module in `args`) under
    `torchrun --standalone` with `nproc`
    processes (gloo on CPU), the way a user starts a job; returns the CompletedProcess (stdout and
    stderr together). The whole process group is killed if it outlives `timeout` or the test fails.
    The job's temporary files (torchrun's own torchelastic_* log directory) go to a directory of its
    own, removed after."""
    import os
    import signal
    import subprocess
    import sys
    import tempfile

    target = (
        [str(script)]
        if str(script) == "-m"
        else [str(Path(script) if Path(script).is_absolute() else DISTRIBUTED / script)]
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *target,
           *map(str, args)]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="mixtral-torchrun-") as scratch:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": scratch, **(env or {})})  # fmt: skip
        try:
            out, _ = proc.communicate(timeout=timeout)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, out)


def json_lines(text: str) -> list[dict]:
    """The JSON objects printed in `text` (ranks may write theirs on one line; other text ignored)."""
    decoder, out, i = json.JSONDecoder(), [], 0
    while (i := text.find("{", i)) >= 0:
        try:
            obj, end = decoder.raw_decode(text, i)
        except ValueError:
            i += 1
            continue
        out.append(obj)
        i = end
    return out
