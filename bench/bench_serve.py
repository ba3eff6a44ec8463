"""Load on `mixtral serve` and, side by side, llama-cpp-python's OpenAI server on the same weights.

N concurrent streaming clients (each sending requests back to back) against each server at each
concurrency: aggregate generated tokens/s, time to first token and inter-token latency (p50/p99),
failures (must be 0; 429s counted apart) and the server's peak RSS. Before timing, each server's
greedy answers are checked: ours equal `mixtral.generate` on the same checkpoint token for token;
llama.cpp (fed our GGUF export of the same weights, f32) must agree on the first tokens. Then a
burst of 64 clients against a small --max-queue must give only 200s and 429s (no 5xx, no hung
connection), and 1000 sequential requests must not grow the server's RSS. Prints a table, writes a
plot, ends with one JSON line.

    python bench/bench_serve.py                                   # models/mini, 1,4,16,64 clients
    python bench/bench_serve.py --concurrency 1,4 --requests 2 --no-llamacpp --rss-requests 50   # smoke
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from bench_e2e import versions  # noqa: E402

PROMPTS = ["The history of the region", "def fibonacci(n):", "La commande suivante permet de",
           "It is a truth universally acknowledged", "Question: Calculate 17 + 25.\nAnswer:",
           "The Linux kernel is", "Die folgende Option", "Il comando seguente"]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A server process, waited on through `ready_path`, always stopped."""

    def __init__(self, cmd: list[str], port: int, ready_path: str) -> None:
        self.url = f"http://127.0.0.1:{port}"
        # A file, not a pipe: a server that logs every request would fill an unread pipe and stall.
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (lives as long as the process)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"{cmd[:4]} exited: {self.log.read()[-2000:]}")
            try:
                if requests.get(self.url + ready_path, timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"{cmd[:4]} did not come up")

    def rss(self, key: str = "VmRSS") -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        return 0

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def stream_one(url: str, model: str, prompt: str, max_tokens: int) -> dict:
    """One streaming completion; arrival times of its chunks."""
    t0 = time.perf_counter()
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    stamps, tokens = [], 0
    try:
        with requests.post(f"{url}/v1/completions", json=body, stream=True, timeout=600) as r:
            if r.status_code != 200:
                return {"status": r.status_code}
            for line in r.iter_lines():
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("error"):
                    return {"status": 500}
                if chunk["choices"]:
                    # A token per chunk until the end; llama.cpp's last chunk only carries the finish
                    # reason, ours the last token too: count the final chunk only if it has text.
                    choice = chunk["choices"][0]
                    if choice.get("finish_reason") is None or choice.get("text"):
                        stamps.append(time.perf_counter())
                        tokens += 1
    except requests.RequestException:
        return {"status": -1}
    return {"status": 200, "start": t0, "stamps": stamps, "chunks": tokens}


def load(url: str, model: str, clients: int, per_client: int, max_tokens: int) -> dict:
    """`clients` threads, each `per_client` streaming requests back to back."""

    def client(c: int) -> list[dict]:
        return [
            stream_one(url, model, PROMPTS[(c + i) % len(PROMPTS)], max_tokens) for i in range(per_client)
        ]

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(client, range(clients)) for r in rs]
    wall = time.perf_counter() - t0
    ok = [r for r in results if r["status"] == 200]
    ttft = [r["stamps"][0] - r["start"] for r in ok if r["stamps"]]
    itl = [b - a for r in ok for a, b in zip(r["stamps"], r["stamps"][1:], strict=False)]
    generated = sum(r["chunks"] for r in ok)

    def q(xs: list[float], p: int) -> float:
        if len(xs) < 2:
            return xs[0] if xs else float("nan")
        return statistics.quantiles(xs, n=100)[p - 1]

    return {"clients": clients, "requests": len(results), "tok_s": generated / wall, "ttft_p50": q(ttft, 50),
            "ttft_p99": q(ttft, 99), "itl_p50": q(itl, 50), "itl_p99": q(itl, 99),
            "failures": sum(r["status"] not in (200, 429) for r in results),
            "rejected_429": sum(r["status"] == 429 for r in results)}  # fmt: skip


def check_ours(url: str, model_path: Path, max_tokens: int) -> None:
    import mixtral

    model, tok = mixtral.load_model(model_path), mixtral.load_tokenizer(model_path)
    for prompt in PROMPTS[:3]:
        body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
        got = requests.post(f"{url}/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
        want = mixtral.generate(model, tok, prompt, max_new_tokens=max_tokens).text
        assert got == want, (
            f"our server's answer to {prompt!r} differs from mixtral.generate: {got!r} vs {want!r}"
        )


def check_llamacpp(url: str, ours_url: str) -> float:
    """Share of prompts whose first 8 greedy tokens' text agrees between llama.cpp and our server."""
    agree = 0
    for prompt in PROMPTS[:4]:
        texts = [requests.post(f"{u}/v1/completions", json={"model": "bench", "prompt": prompt, "max_tokens": 8,
                                                               "temperature": 0}, timeout=120).json()["choices"][0]["text"]
                 for u in (url, ours_url)]  # fmt: skip
        agree += texts[0].strip()[:12] == texts[1].strip()[:12]
    return agree / 4


def burst(url: str, model: str, clients: int = 64) -> dict:
    def one(i: int) -> int:
        try:
            r = requests.post(f"{url}/v1/completions", json={"model": model, "prompt": PROMPTS[i % 8], "max_tokens": 32},
                              timeout=300)  # fmt: skip
            return r.status_code
        except requests.RequestException:
            return -1  # a hung or dropped connection

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        codes = list(pool.map(one, range(clients)))
    return {
        "200": codes.count(200),
        "429": codes.count(429),
        "other": len(codes) - codes.count(200) - codes.count(429),
    }


def rss_growth(server: Proc, n: int) -> dict:
    body = {"model": "bench", "prompt": "Hello", "max_tokens": 4}
    samples = []
    for i in range(n):
        assert requests.post(f"{server.url}/v1/completions", json=body, timeout=60).status_code == 200
        if i + 1 in (n // 10, n):
            samples.append(server.rss())
    return {"requests": n, "rss_after_10pct_mb": samples[0] / 2**20, "rss_after_all_mb": samples[-1] / 2**20,
            "growth": samples[-1] / samples[0] - 1}  # fmt: skip


def plot(rows: dict[str, list[dict]], png: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.6))
    ax1, ax2 = fig.subplots(1, 2)
    for name, rs in rows.items():
        xs = [r["clients"] for r in rs]
        ax1.plot(xs, [r["tok_s"] for r in rs], "o-", label=name)
        ax2.plot(xs, [r["ttft_p99"] for r in rs], "o-", label=f"{name} TTFT p99")
        ax2.plot(xs, [r["itl_p99"] for r in rs], "s--", label=f"{name} inter-token p99")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streaming clients")
        ax.legend(fontsize=7)
    ax1.set_ylabel("aggregate generated tokens/s")
    ax2.set_ylabel("seconds")
    ax2.set_yscale("log")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "mini"))
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--requests", type=int, default=3, help="requests per client per level (default 3)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-llamacpp", action="store_true", help="skip llama-cpp-python's server")
    ap.add_argument("--rss-requests", type=int, default=1000)
    ap.add_argument("--png", default=None, help="plot path (default: none)")
    a = ap.parse_args()
    levels = [int(x) for x in a.concurrency.split(",")]
    port = free_port()
    ours = Proc([sys.executable, "-m", "mixtral", "--threads", str(a.threads), "serve", a.model, "--port", str(port),
                 "--served-model-name", "bench", "--max-batch", str(a.max_batch), "--max-queue", "1024",
                 "--max-model-len", "512"], port, "/health")  # fmt: skip
    servers = {"mixtral serve": ours}
    report: dict = {"bench": "serve", "model": a.model, **vars(a), **versions()}
    try:
        check_ours(ours.url, Path(a.model), 16)
        print("check: our server's greedy answers equal mixtral.generate", file=sys.stderr)
        if not a.no_llamacpp:
            with tempfile.TemporaryDirectory() as tmp:
                from mixtral.checkpoint.gguf_export import export_gguf

                gguf = export_gguf(a.model, Path(tmp) / "model.gguf", "f32")
                lport = free_port()
                servers["llama.cpp server"] = Proc(
                    [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(lport),
                     "--n_ctx", "512", "--n_threads", str(a.threads), "--model_alias", "bench",
                     # its default interrupts a running request when another arrives, which under
                     # concurrent load cuts streams short and leaves clients waiting: queue them
                     "--interrupt_requests", "False"],
                    lport, "/v1/models")  # fmt: skip
                report["llamacpp_agreement"] = check_llamacpp(servers["llama.cpp server"].url, ours.url)
                print(
                    f"check: llama.cpp agrees on {report['llamacpp_agreement']:.0%} of prompts",
                    file=sys.stderr,
                )
        rows: dict[str, list[dict]] = {name: [] for name in servers}
        for level in levels:
            for name, server in servers.items():  # side by side at each level, same load
                rows[name].append({**load(server.url, "bench", level, a.requests, a.max_tokens),
                                   "peak_rss_mb": server.rss("VmHWM") / 2**20})  # fmt: skip
                print(f"{name:>16} {level:>3} clients: {rows[name][-1]['tok_s']:8.1f} tok/s", file=sys.stderr)
        report["load"] = rows
    finally:
        for name, server in list(servers.items()):
            if name != "mixtral serve":
                server.stop()
    try:
        report["rss"] = rss_growth(ours, a.rss_requests)
    finally:
        ours.stop()
    small = Proc([sys.executable, "-m", "mixtral", "--threads", str(a.threads), "serve", a.model, "--port",
                  str(port), "--served-model-name", "bench", "--max-batch", "4", "--max-queue", "4",
                  "--max-model-len", "512"], port, "/health")  # fmt: skip
    try:
        report["burst"] = burst(small.url, "bench")
    finally:
        small.stop()
    report["targets"] = targets(report)
    print_report(report)
    if a.png:
        plot(report["load"], Path(a.png))
    print(json.dumps(report))
    if any(v is False for v in report["targets"].values()):
        sys.exit(1)


def targets(r: dict) -> dict:
    """The issue's targets, each True or False (None where this run lacks the levels to judge)."""
    ours = {x["clients"]: x for x in r["load"]["mixtral serve"]}
    theirs = {x["clients"]: x for x in r["load"].get("llama.cpp server", [])}
    return {
        "no_failures": all(x["failures"] == 0 for rows in r["load"].values() for x in rows),
        "x16_vs_own_1_ge_3": ours[16]["tok_s"] / ours[1]["tok_s"] >= 3 if {1, 16} <= ours.keys() else None,
        "x16_vs_llamacpp_ge_2": ours[16]["tok_s"] / theirs[16]["tok_s"] >= 2
        if 16 in ours and 16 in theirs
        else None,
        "burst_only_200_429": r["burst"]["other"] == 0 and r["burst"]["429"] > 0,
        # allocator noise aside (a few MB), the server's memory must not follow the request count
        "rss_flat": r["rss"]["growth"] < 0.05,
    }


def print_report(r: dict) -> None:
    print(f"\n{r['model']}: {r['requests']} streaming requests per client, max_tokens {r['max_tokens']}, "
          f"{r['threads']} threads; our --max-batch {r['max_batch']}")  # fmt: skip
    print(f"{'server':>18} {'clients':>7} {'tok/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8} "
          f"{'fail':>5} {'429':>4} {'peak RSS':>9}")  # fmt: skip
    for name, rows in r["load"].items():
        for x in rows:
            print(f"{name:>18} {x['clients']:>7} {x['tok_s']:>9.1f} {x['ttft_p50']:>9.3f} {x['ttft_p99']:>9.3f} "
                  f"{x['itl_p50']:>8.3f} {x['itl_p99']:>8.3f} {x['failures']:>5} {x['rejected_429']:>4} "
                  f"{x['peak_rss_mb']:>7.0f}MB")  # fmt: skip
    ours = {x["clients"]: x["tok_s"] for x in r["load"]["mixtral serve"]}
    if 1 in ours and 16 in ours:
        print(f"16 streams / 1 stream (ours): {ours[16] / ours[1]:.2f}x")
    if "llama.cpp server" in r["load"] and 16 in ours:
        theirs = {x["clients"]: x["tok_s"] for x in r["load"]["llama.cpp server"]}
        print(f"ours / llama.cpp at 16 streams: {ours[16] / theirs[16]:.2f}x")
    print(f"burst of 64 against --max-queue 4: {r['burst']}")
    print(f"RSS over {r['rss']['requests']} sequential requests: {r['rss']['rss_after_10pct_mb']:.0f} MB -> "
          f"{r['rss']['rss_after_all_mb']:.0f} MB ({r['rss']['growth']:+.1%})")  # fmt: skip
    print(
        "targets: "
        + ", ".join(f"{k} {'-' if v is None else 'PASS' if v else 'FAIL'}" for k, v in r["targets"].items())
    )


if __name__ == "__main__":
    main()
