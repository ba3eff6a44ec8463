"""A/B of two commits on one machine: each commit's own bench_e2e.py run alternately, ratios compared.

A refactor should not move performance. Timings on a shared machine drift by tens of percent over
minutes, so the two commits are never compared across separate sessions: each is checked out into
its own temporary git worktree, and their benchmark runs alternate (A B B A A B ...) in one
session. Each run already reports its speed as a ratio to transformers measured in the same
process, which cancels most of the machine's drift; this script collects those ratios per case
and variant, prints both commits' runs side by side with the median of each and NEW / OLD, and
ends with one JSON line. Every run checks its own results first (bench_e2e asserts parity with
transformers before timing).

    python bench/ab_commits.py 247f759 HEAD --rounds 2 -- --batches 1,8 --train-shape 0 --repeats 3
    (arguments after -- go to bench_e2e.py)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()


def run_bench(tree: Path, bench_args: list[str]) -> dict:
    """One bench_e2e.py run of the commit checked out at `tree`; its final JSON line."""
    # The worktree's package, not the installed one; its own kernel build cache (torch names the build
    # after the extension, so two checkouts sharing a cache would rebuild each other's every run).
    env = {
        **os.environ,
        "PYTHONPATH": str(tree),
        "TORCH_EXTENSIONS_DIR": str(tree.parent / f"ext-{tree.name}"),
    }
    out = subprocess.run([sys.executable, "bench/bench_e2e.py", *bench_args], cwd=tree, env=env,
                         capture_output=True, text=True)  # fmt: skip
    if out.returncode:
        raise SystemExit(f"bench_e2e.py failed in {tree}:\n{out.stderr[-3000:]}")
    print(out.stdout.strip().splitlines()[-2][:200], file=sys.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def ratios(result: dict, variants: list[str]) -> dict[str, float]:
    """{"case / variant": speed ratio} of one run: each of our variants against transformers fp32, and
    our bf16 against transformers in bf16 (the same precision; both use the CPU's bf16 units)."""
    out = {}
    for r in result["results"]:
        tok_s = r["tok_s"]
        for v in variants:
            if v in tok_s:
                out[f"{r['case']} / {v}"] = tok_s[v] / tok_s["transformers"]
        if "bf16" in tok_s and "transformers-bf16" in tok_s:
            out[f"{r['case']} / bf16 vs tf-bf16"] = tok_s["bf16"] / tok_s["transformers-bf16"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old", help="baseline commit (any git revision)")
    ap.add_argument("new", help="commit to compare with it")
    ap.add_argument("--rounds", type=int, default=2, help="runs per commit, alternating (default 2)")
    ap.add_argument("--variants", default="fp32,bf16", help="our variants to compare (default fp32,bf16)")
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)  # after --: arguments for bench_e2e.py
    a, bench_args = ap.parse_args(argv[:split]), argv[split + 1 :]
    variants = a.variants.split(",")
    commits = {"old": git("rev-parse", "--short", a.old), "new": git("rev-parse", "--short", a.new)}
    runs: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
    with tempfile.TemporaryDirectory(prefix="ab-") as tmp:
        trees = {k: Path(tmp) / k for k in commits}
        try:
            for k, commit in commits.items():
                git("worktree", "add", "--detach", str(trees[k]), commit)
            for i in range(a.rounds):
                for k in ("old", "new") if i % 2 == 0 else ("new", "old"):
                    print(f"round {i + 1}: {k} ({commits[k]})", file=sys.stderr)
                    runs[k].append(ratios(run_bench(trees[k], bench_args), variants))
        finally:
            for tree in trees.values():
                subprocess.run(
                    ["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True
                )
    report(runs, commits, a.rounds, bench_args)


def report(
    runs: dict[str, list[dict[str, float]]], commits: dict[str, str], rounds: int, bench_args: list[str]
) -> None:
    """Both commits' runs side by side, medians, NEW / OLD, and whether their ranges overlap."""
    print(f"\nspeed ratio per run (to transformers fp32 unless named); old {commits['old']}, new {commits['new']}, "
          f"{rounds} runs each; overlap: the two commits' ranges overlap")  # fmt: skip
    print(
        f"{'case / variant':<44}{'old runs':>22}{'new runs':>22}{'old med':>9}{'new med':>9}{'new/old':>9}{'overlap':>9}"
    )
    rows = []
    for key in (k for k in runs["old"][0] if k in runs["new"][0]):
        old, new = [r[key] for r in runs["old"]], [r[key] for r in runs["new"]]
        mo, mn = statistics.median(old), statistics.median(new)
        overlap = max(min(old), min(new)) <= min(max(old), max(new))
        rows.append({"case": key, "old": old, "new": new, "old_median": mo, "new_median": mn,
                     "new_over_old": mn / mo, "ranges_overlap": overlap})  # fmt: skip
        cells = " ".join(f"{v:.2f}" for v in old), " ".join(f"{v:.2f}" for v in new)
        print(
            f"{key:<44}{cells[0]:>22}{cells[1]:>22}{mo:>9.2f}{mn:>9.2f}{mn / mo:>9.3f}{'yes' if overlap else 'no':>9}"
        )
    print(json.dumps({"bench": "ab_commits", "commits": commits, "bench_args": bench_args, "rounds": rounds,
                      "results": rows}))  # fmt: skip


if __name__ == "__main__":
    main()
