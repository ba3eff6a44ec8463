"""The 8x7B shape on this machine: expert offloading against llama.cpp's mmap, on the same int4 weights.

1. Writes a Mixtral-8x7B-shaped model (dim 4096, hidden 14336, 32 heads / 8 KV heads, 8 experts,
   top-2, vocabulary 32000; `--layers` of 32) with random weights straight into our int4 layout
   (`mixtral quantize`'s checkpoint: experts, attention and output head int4 in groups of 32, the
   embedding, norms and router bf16): about 26 GB for 32 layers, 0.8 GB per layer. Then the Q4_0
   GGUF export of the same weights (the stored blocks copied, another 26 GB). Both are kept in
   --dir and reused (a marker file records the shape).
2. Ours: `load_offloaded` with `--cache` (experts per layer or a byte budget such as 12GiB), in a
   child process, runs --tokens tokens of real text (the bundled corpus, Mixtral tokenizer) one
   token per forward with the KV cache, as decoding at batch 1 does, teacher-forced: a random model's
   own greedy output repeats one token, which would make routing trivially local. Reported: tokens/s,
   peak RSS (VmHWM), the cache's hit rate, prefetch precision and bytes read per token, and the hit
   rate the routing report's LRU simulation predicts for the same routing (recorded during the
   run): the two must agree, with and without prefetch.
3. llama.cpp (llama-cpp-python, mmap, same thread count) on the GGUF: the same tokens, one `eval`
   per token; tokens/s and peak RSS (file-backed pages of the mapping reported apart). Its
   CPU_REPACK buffer is turned off (`use_extra_bufts = false`): it copies every Q4_0 weight into
   anonymous memory for faster kernels, which for 32 layers needs 26 GB the machine does not
   have; without it the weights stay memory-mapped, llama.cpp's way of running a model larger
   than memory.
Check: ours and llama.cpp must predict the same next token (argmax) at most positions on the same
weights (random weights give near-flat logits, so a near tie may differ). Prints a table and ends
with one JSON line.

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


def text_tokens(n: int, model: str | None = None) -> list[int]:
    """BOS + the first n - 1 tokens of the bundled corpus' first held-out encyclopedic document
    (with `model`'s tokenizer, else the Mixtral one)."""
    from mixtral.data.corpus import load_corpus
    from mixtral.text import load_tokenizer

    doc = load_corpus(domains=["encyclopedic"])["encyclopedic"].valid[0]
    ids = load_tokenizer(model).encode(doc.text, bos=True)[:n]
    if len(ids) < n:
        raise ValueError(f"the document has only {len(ids)} tokens; ask for fewer")
    return ids


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


def run_ours(
    directory: Path, cache: str, prefetch: bool, tokens: list[int], threads: int, device: str = "cpu"
) -> dict:
    """One forward per token in a child process (its own peak RSS); returns its JSON line. On a CUDA
    device the resident weights and the expert slots are in GPU memory (peak_gpu_bytes)."""
    code = f"""
import json, time, torch
torch.set_num_threads({threads})
from mixtral.offload import load_offloaded
from mixtral.analysis.routing_stats import lru_hit_histogram
from mixtral.model import KVCache
t0 = time.perf_counter()
device = torch.device({device!r})
model = load_offloaded({str(directory)!r}, {cache!r}, {prefetch}, dtype=torch.bfloat16, device=device)
c = model.expert_cache
load_s = time.perf_counter() - t0
c.record = True
tokens = {tokens}
kv = KVCache.allocate(model.config, 1, len(tokens), dtype=torch.bfloat16, device=device)
argmax, stamps = [], []
with torch.no_grad():
    for t, tok in enumerate(tokens):
        out = model(torch.tensor([[tok]], device=device), cache=kv, positions=torch.tensor([[t]], device=device))
        argmax.append(int(out.logits[0, -1].argmax()))
        stamps.append(time.perf_counter())
ids = c.routing_trace()  # [L, 1, T, K], every token in order
hist = lru_hit_histogram(ids, torch.ones(ids.shape[1:3], dtype=torch.bool), c.n_experts)
status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
warm = len(tokens) // 4  # the first quarter fills the cache; time the rest
print(json.dumps({{"argmax": argmax, "tok_s": (len(stamps) - 1 - warm) / (stamps[-1] - stamps[warm]),
    "load_s": load_s, "cache_experts_per_layer": c.capacity, "pool_bytes": c.resident_bytes,
    "peak_rss_bytes": int(status["VmHWM"].split()[0]) * 1024, **c.stats.summary(), "device": str(device),
    "peak_gpu_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else 0,
    "simulated_hit_rate": float(hist[:, :c.capacity].sum() / hist.sum())}}))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if r.returncode:
        raise RuntimeError(f"our offloaded run failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_llamacpp(gguf: Path, tokens: list[int], threads: int) -> dict:
    code = f"""
import json, time, numpy as np, llama_cpp, llama_cpp.llama_cpp as lib
# No repacking: llama.cpp's CPU_REPACK buffer copies every Q4_0 tensor into an anonymous buffer
# (26 GB for 32 layers, which this machine cannot allocate); without it the weights stay mmap'd.
_defaults = lib.llama_model_default_params
def _params():
    p = _defaults()
    p.use_extra_bufts = False
    return p
lib.llama_model_default_params = _params
llm = llama_cpp.Llama({str(gguf)!r}, n_ctx={len(tokens) + 8}, n_threads={threads}, use_mmap=True, logits_all=True, verbose=False)
tokens = {tokens}
argmax, stamps = [], []
for tok in tokens:
    llm.eval([tok])
    argmax.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
    stamps.append(time.perf_counter())
status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
kb = lambda k: int(status[k].split()[0]) * 1024
warm = len(tokens) // 4
print(json.dumps({{"argmax": argmax, "tok_s": (len(stamps) - 1 - warm) / (stamps[-1] - stamps[warm]),
    "peak_rss_bytes": kb("VmHWM"), "rss_file_bytes": kb("RssFile"), "rss_anon_bytes": kb("RssAnon")}}))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if r.returncode:
        raise RuntimeError(f"llama.cpp failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def sweep(directory: Path, sizes: list[int], tokens: list[int], a: argparse.Namespace) -> None:
    """Ours at several cache sizes: tokens/s (prefetch on and off), hit rate measured and simulated."""
    rows = []
    for n in sizes:
        on, off = (run_ours(directory, str(n), p, tokens, a.threads, a.device) for p in (True, False))
        rows.append({"cache": n, "tok_s_prefetch": on["tok_s"], "tok_s": off["tok_s"], "hit_rate": off["hit_rate"],
                     "simulated_hit_rate": off["simulated_hit_rate"], "peak_rss_bytes": off["peak_rss_bytes"],
                     "bytes_read_per_token": off["bytes_read_per_token"], "prefetch_precision": on["prefetch_precision"],
                     "peak_gpu_bytes": off["peak_gpu_bytes"]})  # fmt: skip
        print(f"cache {n}: {rows[-1]}", file=sys.stderr)
    name = a.model or f"8x7B shape, {a.layers} layers"
    print(f"\n{name}: {len(tokens)} tokens one at a time, {a.threads} threads, on {a.device}")
    print(
        f"{'experts/layer':>13} {'tok/s':>7} {'+prefetch':>9} {'hit rate':>9} {'simulated':>9} {'peak RSS':>9} {'MiB/token':>9}"
    )
    for r in rows:
        print(f"{r['cache']:>13} {r['tok_s']:>7.3f} {r['tok_s_prefetch']:>9.3f} {r['hit_rate']:>9.1%} "
              f"{r['simulated_hit_rate']:>9.1%} {r['peak_rss_bytes'] / 2**30:>7.2f}GiB {r['bytes_read_per_token'] / 2**20:>9.1f}")  # fmt: skip
    if a.png:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(9, 3.4))
        ax1, ax2 = fig.subplots(1, 2)
        xs = [r["cache"] for r in rows]
        ax1.plot(xs, [r["tok_s"] for r in rows], "o-", label="no prefetch")
        ax1.plot(xs, [r["tok_s_prefetch"] for r in rows], "s--", label="prefetch")
        ax1.set_ylabel("tokens/s (batch 1)")
        ax2.plot(xs, [r["hit_rate"] for r in rows], "o-", label="measured")
        ax2.plot(xs, [r["simulated_hit_rate"] for r in rows], "x:", markersize=10, label="LRU simulation")
        ax2.set_ylabel("expert cache hit rate")
        for ax in (ax1, ax2):
            ax.set_xlabel("experts cached per layer")
            ax.legend(fontsize=8)
        fig.suptitle(str(name), fontsize=9)
        fig.tight_layout()
        fig.savefig(a.png, dpi=110)
    print(
        json.dumps(
            {
                "bench": "offload_sweep",
                "model": str(name),
                "tokens": len(tokens),
                "device": a.device,
                **versions(),
                "rows": rows,
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--dir", required=True, help="where the int4 checkpoint and its GGUF are written and kept"
    )
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--cache", default="12GiB", help="experts per layer, or a byte budget for all layers")
    ap.add_argument("--tokens", type=int, default=48, help="tokens of text run one at a time (default 48)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-llamacpp", action="store_true")
    ap.add_argument("--model", default=None,
                    help="an existing quantized checkpoint to run instead of writing the random 8x7B shape")  # fmt: skip
    ap.add_argument("--sweep", default=None, metavar="N,N,...",
                    help="instead of the comparison: ours at these cache sizes (experts per layer), prefetch "
                    "on and off, hit rate measured and simulated; with --png, a plot")  # fmt: skip
    ap.add_argument("--png", default=None)
    ap.add_argument(
        "--device", default="cpu", help="cpu, or cuda: the expert slots in GPU memory (implies --no-llamacpp)"
    )
    a = ap.parse_args()
    if a.device != "cpu":
        a.no_llamacpp = True
    directory = Path(a.model) if a.model else write_model(Path(a.dir), a.layers)
    if a.sweep:
        return sweep(directory, [int(x) for x in a.sweep.split(",")], text_tokens(a.tokens, a.model), a)
    tokens = text_tokens(a.tokens, a.model)
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
        runs[f"ours prefetch={prefetch}"] = run_ours(
            directory, a.cache, prefetch, tokens, a.threads, a.device
        )
        print(f"ours (prefetch {prefetch}): {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    for name, r in runs.items():
        print(f"{name}: {json.dumps({k: v for k, v in r.items() if k != 'argmax'})}", file=sys.stderr)
    if not a.no_llamacpp:
        gguf = directory / "model.gguf"
        if not gguf.is_file():
            from mixtral.checkpoint.gguf_export import export_gguf

            export_gguf(directory, gguf)
        runs["llama.cpp mmap"] = run_llamacpp(gguf, tokens, a.threads)
        ours, theirs = runs["ours prefetch=True"]["argmax"], runs["llama.cpp mmap"]["argmax"]
        report["argmax_agreement"] = sum(x == y for x, y in zip(ours, theirs, strict=True)) / len(ours)
    report["runs"] = runs
    print(
        f"\n8x7B shape, {a.layers} layers, int4 groups of 32, {a.threads} threads, {a.tokens} tokens at batch 1"
    )
    print(
        f"{'run':>22} {'tok/s':>7} {'peak RSS':>9} {'hit rate':>9} {'simulated':>9} {'prefetch':>9} {'MiB/token':>9}"
    )
    for name, r in runs.items():
        print(f"{name:>22} {r['tok_s']:>7.3f} {r['peak_rss_bytes'] / 2**30:>7.2f}GiB "
              f"{r.get('hit_rate', float('nan')):>9.1%} {r.get('simulated_hit_rate', float('nan')):>9.1%} "
              f"{r.get('prefetch_precision', float('nan')):>9.1%} {r.get('bytes_read_per_token', float('nan')) / 2**20:>9.1f}")  # fmt: skip
    if "llama.cpp mmap" in runs:
        best = max(runs["ours prefetch=True"]["tok_s"], runs["ours prefetch=False"]["tok_s"])
        print(f"ours (better of the two) / llama.cpp: {best / runs['llama.cpp mmap']['tok_s']:.2f}x; next-token argmax "
              f"agrees at {report['argmax_agreement']:.0%} of positions")  # fmt: skip
    print(json.dumps(report))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
