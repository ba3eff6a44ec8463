"""Expert offloading: exactly the resident quantized model's tokens for every cache size, with and
without prefetch; the measured hit rate is the routing report's LRU simulation; errors are clear."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import save_tiny_model, tiny_config

import mixtral
from mixtral.analysis.routing_stats import lru_hit_histogram
from mixtral.checkpoint.quantized import quantize_checkpoint
from mixtral.errors import ConfigError, FormatError
from mixtral.inference import GenerationConfig, generate_ids
from mixtral.offload import load_offloaded, parse_cache_size

CFG = tiny_config(dim=64, hidden_dim=128, head_dim=16, n_layers=3, n_experts=6, vocab_size=32000)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("offload")
    torch.manual_seed(0)
    model = mixtral.model.Transformer(CFG)
    with torch.no_grad():  # sharper routers, so that routing varies from token to token
        for layer in model.layers:
            layer.feed_forward.gate.weight.mul_(6)
    src = save_tiny_model(root / "float", model)
    out = {"float": src}
    for storage in ("int4", "int8-g32"):
        out[storage] = root / storage
        quantize_checkpoint(src, out[storage], storage, ("experts",), progress=False)
    return out


PROMPTS = [[1, 306, 4966, 304, 278, 3787, 29871, 13, 1576], [1, 450, 4996, 17354, 1701, 29916]]


def _tokens(model, chunk: int = 512) -> list[list[int]]:
    cfg = GenerationConfig(max_new_tokens=12, chunk_size=chunk)
    return [_run(model, p, cfg) for p in PROMPTS]


def _run(model, prompt: list[int], cfg: GenerationConfig) -> list[int]:
    out = []
    for step in generate_ids(model, [prompt], config=cfg):
        out.append(step[0])
    return out


@pytest.mark.parametrize("storage", ["int4", "int8-g32"])
@pytest.mark.parametrize("kernels", [True, False])
def test_offloaded_tokens_equal_resident(ckpts, storage, kernels, monkeypatch):
    if not kernels:
        monkeypatch.setenv("MIXTRAL_NO_KERNELS", "1")
        import mixtral.kernels.ops as ops

        monkeypatch.setattr(ops, "_state", {"ok": False})
    resident = mixtral.load_model(ckpts[storage])
    want = _tokens(resident)
    for cache in (1, 2, 3, CFG.n_experts):
        for prefetch in (False, True):
            model = load_offloaded(ckpts[storage], cache, prefetch)
            try:
                assert _tokens(model) == want, (cache, prefetch)
                st = model.expert_cache.stats
                assert st.requests > 0 and 0 <= st.hits <= st.requests
                assert (st.prefetch_issued > 0) == prefetch
                if cache == CFG.n_experts:  # every expert read once per layer at most
                    assert (
                        st.demand_loads + st.prefetch_issued
                        <= CFG.n_layers * CFG.n_experts + st.prefetch_issued
                    )
            finally:
                model.expert_cache.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("storage", ["int4", "int8-g32"])
def test_offloaded_on_cuda_equals_resident_on_cuda(ckpts, storage):
    """The slot pool in GPU memory, fed through pinned buffers on copy streams: the resident quantized
    model's tokens on the same GPU, for every cache size, with and without prefetch."""
    resident = mixtral.load_model(ckpts[storage], device="cuda")
    want = _tokens(resident)
    for cache in (1, 2, CFG.n_experts):
        for prefetch in (False, True):
            model = load_offloaded(ckpts[storage], cache, prefetch, device="cuda")
            try:
                assert model.expert_cache.pool["qw1"].is_cuda and model.output.weight.is_cuda
                assert _tokens(model) == want, (cache, prefetch)
                assert (model.expert_cache.stats.prefetch_issued > 0) == prefetch
            finally:
                model.expert_cache.close()


def test_float_model_with_experts_from_a_quantized_checkpoint(ckpts):
    want = _tokens(mixtral.load_model(ckpts["int4"]))
    model = load_offloaded(ckpts["float"], 2, True, experts_from=ckpts["int4"])
    try:
        assert _tokens(model) == want
    finally:
        model.expert_cache.close()


def _routing_ids(model, prompt: list[int]) -> torch.Tensor:
    """[L, 1, T, K] expert ids of the prompt (one causal pass; the same routing as token by token)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).router_logits  # [L, 1, T, E]
    return logits.topk(CFG.top_k, -1).indices


@pytest.mark.parametrize("cache", [1, 2, 4])
def test_measured_hit_rate_is_the_lru_simulation(ckpts, cache):
    """Token by token (prefill chunks of 1), the engine's hits per layer equal the simulation's count."""
    model = load_offloaded(ckpts["int4"], cache, prefetch=True)
    try:
        prompt = PROMPTS[0] + PROMPTS[1][1:] + PROMPTS[0][1:]
        model.expert_cache.reset()
        cfg = GenerationConfig(max_new_tokens=1, chunk_size=1)
        _run(model, prompt, cfg)  # prefill one token at a time, then one decoded token's router pass
        st = model.expert_cache.stats
        resident = mixtral.load_model(ckpts["int4"])
        ids = _routing_ids(resident, prompt)
        hist = lru_hit_histogram(ids, torch.ones(1, len(prompt), dtype=torch.bool), CFG.n_experts)
        simulated = hist[:, :cache].sum(-1)
        # the engine also saw the prompt's tokens in this order; its first len(prompt) tokens are the prompt
        assert st.tokens == len(prompt)
        assert list(simulated) == st.per_layer_hits, (list(simulated), st.per_layer_hits)
        assert list(hist.sum(-1)) == st.per_layer_requests
    finally:
        model.expert_cache.close()


def test_cache_size_and_errors(ckpts, tmp_path):
    assert parse_cache_size("3", 100, 2, 8) == 3
    assert parse_cache_size("1KB", 100, 2, 8) == 5
    assert parse_cache_size("1KiB", 100, 2, 8) == 5
    for bad, match in [
        ("0", "between 1 and 8"),
        ("9", "between 1 and 8"),
        ("1.5 apples", "byte budget"),
        ("100B", "needs"),
    ]:
        with pytest.raises(ConfigError, match=match):
            parse_cache_size(bad, 100, 2, 8)
    with pytest.raises(ConfigError, match="not a quantized checkpoint"):
        load_offloaded(ckpts["float"], 2)
    quantize_checkpoint(ckpts["float"], tmp_path / "row", "int8", ("experts",), progress=False)
    with pytest.raises(FormatError, match="group-quantized experts"):
        load_offloaded(tmp_path / "row", 2)
    other = save_tiny_model(tmp_path / "other", CFG.replace(n_layers=2))
    quantize_checkpoint(other, tmp_path / "other-q", "int4", ("experts",), progress=False)
    with pytest.raises(ConfigError, match="another model"):
        load_offloaded(ckpts["float"], 2, experts_from=tmp_path / "other-q")
    # a truncated expert file is refused when opened, before anything runs
    bad = tmp_path / "trunc"
    import shutil

    shutil.copytree(ckpts["int4"], bad)
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-4096])
    with pytest.raises(mixtral.errors.CorruptFileError, match="truncated"):
        load_offloaded(bad, 2)


# ---- the commands ---------------------------------------------------------------------------------


def test_generate_and_chat_offloaded_print_the_cache_figures(ckpts, capsys, monkeypatch):
    import io

    from mixtral.cli import main

    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\n"))
    assert main(["chat", str(ckpts["int4"]), "--max-new-tokens", "4", "--offload", "auto"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith('"') and "offload: 2 of 6 experts cached per layer" in out.err

    q = str(ckpts["int4"])
    assert main(["generate", q, "Hello", "--max-new-tokens", "4", "--json", "--offload", "auto",
                 "--expert-cache", "2"]) == 0  # fmt: skip
    out = capsys.readouterr()
    import json

    report = json.loads(out.out)
    want = json.loads(_generate_json(q, capsys))
    assert report["token_ids"] == want["token_ids"]
    assert report["offload"]["requests"] > 0 and 0 <= report["offload"]["hit_rate"] <= 1
    assert "offload: 2 of 6 experts cached per layer, hit rate" in out.err and "peak RSS" in out.err
    for argv, msg in [
        (["generate", q, "Hi", "--offload", "auto", "--quantize", "int8"], "drop --quantize"),
        (["generate", str(ckpts["float"]), "Hi", "--offload", "auto"], "not a quantized checkpoint"),
        (["generate", q, "Hi", "--offload", "auto", "--expert-cache", "9"], "between 1 and 6"),
        (["generate", q, "Hi", "--offload", "auto", "--expert-cache", "lots"], "byte budget"),
        (["generate", q, "Hi", "--offload", "/nonexistent"], "not a directory"),
    ]:
        assert main(argv) == 2, argv
        assert msg in capsys.readouterr().err, argv


def _generate_json(path: str, capsys) -> str:
    from mixtral.cli import main

    assert main(["generate", path, "Hello", "--max-new-tokens", "4", "--json"]) == 0
    return capsys.readouterr().out


def test_routing_offloaded(ckpts, tmp_path, capsys):
    from mixtral.cli import main

    assert main(["routing", str(ckpts["int4"]), "--offload", "auto", "--expert-cache", "3", "--max-tokens", "600",
                 "--seq-len", "64", "--bootstrap", "20", "--quiet", "--out", str(tmp_path / "r")]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "offload: 3 of 6 experts cached per layer" in out and (tmp_path / "r" / "report.html").is_file()


def test_serve_offloaded(ckpts):
    """A real `mixtral serve --offload auto` process answers as the resident model does."""
    requests = pytest.importorskip("requests")
    pytest.importorskip("fastapi")
    from test_serve import Server

    want = _run(mixtral.load_model(ckpts["int4"]), PROMPTS[0], GenerationConfig(max_new_tokens=6))
    server = Server("--offload", "auto", "--expert-cache", "2", "--max-batch", "2", "--max-model-len", "128",
                    model=ckpts["int4"])  # fmt: skip
    try:
        r = requests.post(f"{server.url}/v1/completions", json={"model": "mini", "prompt": PROMPTS[0], "max_tokens": 6,
                                                                "temperature": 0}, timeout=60)  # fmt: skip
        assert r.status_code == 200, r.text
        tok = mixtral.load_tokenizer(ckpts["int4"])
        assert r.json()["choices"][0]["text"] == tok.decode(want)
    finally:
        server.stop()
