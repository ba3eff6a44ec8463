"""Compare training runs side by side: loss curves on one plot and a per-domain perplexity table.

    python scripts/compare_runs.py runs/mini runs/mini-dense --png docs/img/mini_vs_dense.png
Prints a markdown table (held-out perplexity per domain, training tokens/s) and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def load(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {"name": run.name, "rows": rows, "eval": json.loads((run / "eval.json").read_text())}


def smooth(values: list[float], k: int = 9) -> list[float]:
    return [statistics.fmean(values[max(0, i - k + 1) : i + 1]) for i in range(len(values))]


def plot(runs: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, r in enumerate(runs):
        rows = r["rows"]
        label = f"{r['name']} ({r['eval']['total_params'] / 1e6:.1f}M total / {r['eval']['active_params'] / 1e6:.1f}M active)"
        ax.plot([x["tokens_seen"] for x in rows], smooth([x["loss"] for x in rows]), color=f"C{i}", lw=1,
                label=f"{label}: train")  # fmt: skip
        ev = [x for x in rows if "eval" in x]
        ax.plot([x["tokens_seen"] for x in ev], [x["eval"]["all/loss"] for x in ev], "o--", color=f"C{i}",
                label=f"{r['name']}: held-out")  # fmt: skip
    ax.set(
        xlabel="training tokens",
        ylabel="cross-entropy (nats/token)",
        title="SMoE vs dense of equal active size",
    )
    ax.set_ylim(top=min(8.0, ax.get_ylim()[1]))
    ax.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--png", type=Path, default=Path("docs/img/runs.png"))
    args = ap.parse_args()
    runs = [load(r) for r in args.runs]
    domains = [k[: -len("/ppl")] for k in runs[0]["eval"]["eval"] if k.endswith("/ppl")]
    print("| domain | " + " | ".join(r["name"] for r in runs) + " |")
    print("|---|" + "---|" * len(runs))
    for d in domains:
        print(f"| {d} | " + " | ".join(f"{r['eval']['eval'][f'{d}/ppl']:.2f}" for r in runs) + " |")
    speeds = {r["name"]: statistics.median(x["tokens_per_s"] for x in r["rows"]) for r in runs}
    print("| training tokens/s (median) | " + " | ".join(f"{speeds[r['name']]:.0f}" for r in runs) + " |")
    plot(runs, args.png)
    print(json.dumps({"ppl": {r["name"]: {d: r["eval"]["eval"][f"{d}/ppl"] for d in domains} for r in runs},
                      "tokens_per_s": speeds, "png": str(args.png)}))  # fmt: skip


if __name__ == "__main__":
    main()
