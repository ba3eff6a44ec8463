"""The 8x7B shape on this machine: expert offloading against llama.cpp's mmap, on the same int4 weights.

1. Writes a Mixtral-8x7B-shaped model (dim 4096, hidden 14336, 32 heads / 8 KV heads, 8 experts,
   top-2, vocabulary 32000; `--layers` of 32) with random weights straight into our int4 layout
   (`mixtral quantize`'s checkpoint: experts, attention and output head int4 in groups of 32, the
   embedding, norms and router bf16): about 26 GB for 32 layers, 0.8 GB per layer. Then the Q4_0
   GGUF export of the same weights (the stored blocks copied, another 26 GB). Both are kept in
   --dir and reused (a marker file records the shape).
2. Ours: `load_offloaded` with `--cache` (experts per layer or a byte budget such as 12GiB), greedy
   decode of --tokens tokens at batch 1 after a short prompt (prefilled one token at a time, so
   every token is one step, as the simulation counts them), in a child process: decode tokens/s,
   peak RSS (VmHWM), the cache's hit rate, prefetch precision and bytes read per token, and the
   hit rate the routing report's LRU simulation predicts for the same routing (recorded during the
   run): the two must agree, with and without prefetch.
3. llama.cpp (llama-cpp-python, mmap, same thread count) on the GGUF: the same prompt tokens, the
   same number of greedy tokens; decode tokens/s and peak RSS (file-backed pages of the mapping
   included, reported apart).
Checks first: ours and llama.cpp must produce the same first greedy tokens on the same weights
(random weights: logits are near-flat, so only the first few are compared). Prints a table and
ends with one JSON line.

Disk: 26 GB + 26 GB for 32 layers; with less, use fewer layers (`--layers 8`: 13 GB for both): the
resident part, the per-token reads and the time per token scale linearly with the layer count
(every layer reads its own experts), so tokens/s at 32 layers ≈ tokens/s at n layers × n / 32 when
the cache holds the same experts per layer. Memory: resident ≈ 0.4 GB + 24 MB per layer, cache =
layers × experts per layer × 94.5 MiB.

    python bench/bench_offload.py --dir /work/bench-8x7b --cache 12GiB        # the full shape
    python bench/bench_offload.py --dir /tmp/o8 --layers 2 --tokens 8 --cache 2   # smoke
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from bench_e2e import versions  # noqa: E402

from mixtral.checkpoint.configs import config_to_hf  # noqa: E402
from mixtral.checkpoint.quantized import QuantLayout, plan_entries  # noqa: E402
from mixtral.checkpoint.safetensors_io import shard_plan, write_safetensors  # noqa: E402
from mixtral.config import get_preset  # noqa: E402

PROMPT = [1, 415, 3340, 302, 272, 4424, 349]  # "The history of the region is" in the Mixtral vocabulary


def write_model(directory: Path, n_layers: int, seed: int = 0) -> Path:
    """The random int4 8x7B-shaped checkpoint in `directory` (skipped if its marker matches)."""
    from tqdm.auto import tqdm

    cfg = get_preset("mixtral-8x7b").replace(n_layers=n_layers)
    marker = directory / "BENCH_MODEL"
    want = json.dumps({"n_layers": n_layers, "seed": seed, "format": 1})
    if marker.is_file() and marker.read_text() == want:
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("model*.safetensors*"):
        old.unlink()
    layout = QuantLayout(4, 32, ("experts", "attention", "output"))
    entries = plan_entries(cfg, layout, torch.bfloat16)
    gen = torch.Generator().manual_seed(seed)

    def tensor(e) -> torch.Tensor:
        if e.part == "q":  # uniform nibbles: values -8..7 (std 4.6)
            return torch.randint(0, 256, e.shape, dtype=torch.uint8, generator=gen)
        if e.part == "s":  # scales around 0.02 / 4.6, so weights have std ~0.02 like trained ones
            return (torch.rand(e.shape, generator=gen) * 0.002 + 0.0035).to(torch.float16)
        if len(e.shape) == 1:
            return torch.ones(e.shape, dtype=torch.bfloat16)
        scale = 1.0 if "tok_embeddings" in e.key else 0.02
        # routers with scale: routing then depends on the token, as in a trained model
        scale = 0.2 if "gate" in e.key else scale
        return (torch.randn(e.shape, generator=gen) * scale).to(torch.bfloat16)

    specs = [(e.key, e.dtype, e.shape) for e in entries]
    by_key = {e.key: e for e in entries}
    shards = shard_plan(specs, 5 * 10**9)
    names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    total = sum(math.prod(s) * d.itemsize for _, d, s in specs)
    with tqdm(
        total=total, unit="B", unit_scale=True, desc=f"write int4 8x7B shape, {n_layers} layers"
    ) as bar:

        def produce(shard):
            for key, _, _ in shard:
                t = tensor(by_key[key])
                bar.update(t.numel() * t.element_size())
                yield t

        for name, shard in zip(names, shards, strict=True):
            write_safetensors(directory / name, shard, produce(shard), {"format": "pt"})
    weight_map = {key: name for name, shard in zip(names, shards, strict=True) for key, _, _ in shard}
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    config = config_to_hf(cfg, torch.bfloat16) | {"quantization_config": layout.to_json()}
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    from mixtral.text import load_tokenizer, save_tokenizer

    save_tokenizer(load_tokenizer(None), directory)
    (directory / "model.gguf").unlink(missing_ok=True)
    marker.write_text(want)
    return directory


def run_ours(directory: Path, cache: str, prefetch: bool, tokens: int, threads: int) -> dict:
    """Decode in a child process (its own peak RSS); returns its JSON line."""
    code = f"""
import json, resource, sys, time, torch
torch.set_num_threads({threads})
from mixtral.offload import load_offloaded
from mixtral.analysis.routing_stats import lru_hit_histogram
t0 = time.perf_counter()
model = load_offloaded({str(directory)!r}, {cache!r}, {prefetch}, dtype=torch.bfloat16)
c = model.expert_cache
load_s = time.perf_counter() - t0
c.record = True
from mixtral.inference import GenerationConfig, GenerationStats, generate_ids
stats = GenerationStats()
out = [s[0] for s in generate_ids(model, [{PROMPT}], GenerationConfig(max_new_tokens={tokens}, chunk_size=1), stats=stats)]
ids = c.routing_trace()  # [L, 1, T, K], every token in order
hist = lru_hit_histogram(ids, torch.ones(ids.shape[1:3], dtype=torch.bool), c.n_experts)
status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
print(json.dumps({{"token_ids": out, "decode_tok_s": stats.decode_tokens_per_s, "prefill_s": stats.prefill_seconds,
    "load_s": load_s, "cache_experts_per_layer": c.capacity, "pool_bytes": c.resident_bytes,
    "peak_rss_bytes": int(status["VmHWM"].split()[0]) * 1024, **c.stats.summary(),
    "simulated_hit_rate": float(hist[:, :c.capacity].sum() / hist.sum())}}))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if r.returncode:
        raise RuntimeError(f"our offloaded run failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_llamacpp(gguf: Path, tokens: int, threads: int) -> dict:
    code = f"""
import json, time, llama_cpp
llm = llama_cpp.Llama({str(gguf)!r}, n_ctx=256, n_threads={threads}, use_mmap=True, verbose=False)
out, t = [], []
llm.eval({PROMPT})
for _ in range({tokens}):
    tok = llm.sample(temp=0.0, top_k=1)
    t.append(time.perf_counter())
    out.append(int(tok))
    llm.eval([tok])
status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
kb = lambda k: int(status[k].split()[0]) * 1024
print(json.dumps({{"token_ids": out, "decode_tok_s": (len(t) - 1) / (t[-1] - t[0]) if len(t) > 1 else float("nan"),
    "peak_rss_bytes": kb("VmHWM"), "rss_file_bytes": kb("RssFile"), "rss_anon_bytes": kb("RssAnon")}}))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if r.returncode:
        raise RuntimeError(f"llama.cpp failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--dir", required=True, help="where the int4 checkpoint and its GGUF are written and kept"
    )
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--cache", default="12GiB", help="experts per layer, or a byte budget for all layers")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-llamacpp", action="store_true")
    a = ap.parse_args()
    directory = write_model(Path(a.dir), a.layers)
    report: dict = {
        "bench": "offload",
        "layers": a.layers,
        "cache": a.cache,
        "tokens": a.tokens,
        **versions(),
    }
    runs = {}
    for prefetch in (True, False):
        t0 = time.perf_counter()
        runs[f"ours prefetch={prefetch}"] = run_ours(directory, a.cache, prefetch, a.tokens, a.threads)
        print(f"ours (prefetch {prefetch}): {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    if not a.no_llamacpp:
        gguf = directory / "model.gguf"
        if not gguf.is_file():
            from mixtral.checkpoint.gguf_export import export_gguf

            export_gguf(directory, gguf)
        runs["llama.cpp mmap"] = run_llamacpp(gguf, a.tokens, a.threads)
        ours, theirs = runs["ours prefetch=True"]["token_ids"], runs["llama.cpp mmap"]["token_ids"]
        report["first_tokens_agree"] = next(
            (i for i, (x, y) in enumerate(zip(ours, theirs, strict=False)) if x != y), len(ours)
        )
    report["runs"] = runs
    print(
        f"\n8x7B shape, {a.layers} layers, int4 groups of 32, {a.threads} threads, {a.tokens} tokens at batch 1"
    )
    print(
        f"{'run':>22} {'tok/s':>7} {'peak RSS':>9} {'hit rate':>9} {'simulated':>9} {'prefetch':>9} {'MiB/token':>9}"
    )
    for name, r in runs.items():
        print(f"{name:>22} {r['decode_tok_s']:>7.3f} {r['peak_rss_bytes'] / 2**30:>7.2f}GiB "
              f"{r.get('hit_rate', float('nan')):>9.1%} {r.get('simulated_hit_rate', float('nan')):>9.1%} "
              f"{r.get('prefetch_precision', float('nan')):>9.1%} {r.get('bytes_read_per_token', float('nan')) / 2**20:>9.1f}")  # fmt: skip
    if "llama.cpp mmap" in runs:
        print(f"ours / llama.cpp: {runs['ours prefetch=True']['decode_tok_s'] / runs['llama.cpp mmap']['decode_tok_s']:.2f}x; "
              f"first {report['first_tokens_agree']} greedy tokens agree")  # fmt: skip
    print(json.dumps(report))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
