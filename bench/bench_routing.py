"""Cost of the routing analysis: `analyze_routing` vs the plain forward passes over the same tokens.

Tokens: the bundled corpus' held-out splits, an equal share per domain, `--tokens` in all
(default 200k). Three timings, interleaved for `--repeats` rounds (median reported):
- forward: `model(inputs, positions=...)` over every packed batch, as a user would run it;
- forward (no head): the same with `keep_logits=1`, which is what the analysis runs;
- analysis: the whole `analyze_routing` call (forward, statistics, LRU simulation, bootstrap,
  token samples), without writing the report.
Checked first: the router logits of one batch are identical with and without the output head,
and the analysis counts exactly the tokens it was given. Prints a table, ends with one JSON line.

    python bench/bench_routing.py --model models/mini
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_e2e import versions  # noqa: E402

from mixtral.analysis.routing import analysis_batches, analyze_routing  # noqa: E402
from mixtral.checkpoint import load_model  # noqa: E402
from mixtral.data.domains import load_domains  # noqa: E402
from mixtral.text.tokenizer import load_tokenizer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="models/mini")
    p.add_argument("--tokens", type=int, default=200_000)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    tok = load_tokenizer(a.model)
    model = load_model(a.model).eval()
    data, _ = load_domains(tok, {})
    per_domain = a.tokens // len(data)
    budget = {d: min(per_domain, docs.n_tokens) for d, docs in data.items()}
    work = [
        (x, pos) for _, x, pos in analysis_batches(data, budget, a.seq_len, a.batch_size)
    ]  # what it will see
    n_tokens = sum(int((pos >= 0).sum()) for _, pos in work)

    with torch.inference_mode():
        x, pos = work[0]
        full, head_less = model(x, positions=pos), model(x, positions=pos, keep_logits=1)
        assert torch.equal(full.router_logits, head_less.router_logits), "keep_logits changed the routing"

    def forward(keep: int | None) -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            for x, pos in work:
                model(x, positions=pos, keep_logits=keep)
        return time.perf_counter() - t0

    def analysis() -> float:
        t0 = time.perf_counter()
        r = analyze_routing(model, data, tok, max_tokens=per_domain, seq_len=a.seq_len,
                            batch_size=a.batch_size, progress=False)  # fmt: skip
        elapsed = time.perf_counter() - t0
        assert int(r.stats.tokens.sum()) == n_tokens, (int(r.stats.tokens.sum()), n_tokens)
        return elapsed

    times: dict[str, list[float]] = {"forward": [], "forward_no_head": [], "analysis": []}
    for _ in range(a.repeats):
        times["forward"].append(forward(None))
        times["forward_no_head"].append(forward(1))
        times["analysis"].append(analysis())
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{n_tokens:,} tokens, {len(data)} domains, seq_len {a.seq_len}, batch {a.batch_size}, "
          f"{a.threads} threads, median of {a.repeats}")  # fmt: skip
    print(f"{'run':<18} {'seconds':>9} {'tok/s':>9} {'vs forward':>11}")
    for k, s in med.items():
        print(f"{k:<18} {s:>9.2f} {n_tokens / s:>9.0f} {s / med['forward']:>10.2f}x")
    print(json.dumps({"bench": "routing", "model": a.model, "tokens": n_tokens, "seconds": med,
                      "analysis_over_forward": med["analysis"] / med["forward"],
                      "analysis_over_forward_no_head": med["analysis"] / med["forward_no_head"],
                      "all_runs": times, **versions()}))  # fmt: skip


if __name__ == "__main__":
    main()
