"""`mixtral serve` as a real process on a free loopback port, driven by the official openai client and raw HTTP."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai")
requests = pytest.importorskip("requests")
pytest.importorskip("fastapi")

ROOT = Path(__file__).resolve().parents[2]
MINI = ROOT / "models" / "mini"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `python -m mixtral serve` process, waited on through /health and always stopped."""

    def __init__(self, *args: str, model: Path = MINI) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "mixtral", "--threads", "1", "serve", str(model), "--port", str(self.port),
               "--served-model-name", "mini", *args]  # fmt: skip
        # A file, not a pipe: an unread pipe that fills up would stall the server.
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (lives as long as the process)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"the server exited: {self.log.read()[-3000:]}")
            try:
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("the server did not become healthy in 180 s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def metric(self, name: str) -> float:
        text = requests.get(f"{self.url}/metrics", timeout=5).text
        m = re.search(rf"^{name} ([0-9.e+-]+)$", text, flags=re.M)
        assert m, f"{name} not in /metrics"
        return float(m.group(1))

    def post(self, path: str, body, **kw) -> requests.Response:
        return requests.post(f"{self.url}{path}", json=body, timeout=60, **kw)


@pytest.fixture(scope="module")
def server():
    s = Server("--max-batch", "3", "--max-queue", "3", "--max-model-len", "512")
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def ours():
    import mixtral

    return mixtral.load_model(MINI), mixtral.load_tokenizer(MINI)


def test_health_models_and_page(server):
    assert requests.get(f"{server.url}/health").json() == {"status": "ok"}
    models = requests.get(f"{server.url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["mini"]
    page = requests.get(server.url)
    assert page.status_code == 200 and "/v1/chat/completions" in page.text


def test_completions_equal_local_greedy_generation(client, ours):
    import mixtral

    model, tok = ours
    prompts = ["The history of the region", "def fibonacci(n):"]
    r = client.completions.create(model="mini", prompt=prompts, max_tokens=12, temperature=0)
    expected = [mixtral.generate(model, tok, p, max_new_tokens=12).text for p in prompts]
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == expected
    assert r.usage.prompt_tokens == sum(len(tok.encode(p)) for p in prompts)
    assert r.usage.completion_tokens == 24 and r.usage.total_tokens == r.usage.prompt_tokens + 24
    ids = tok.encode(prompts[0])
    by_ids = client.completions.create(model="mini", prompt=ids, max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == expected[0]


def test_a_stream_concatenates_to_the_answer(client):
    kwargs = dict(model="mini", prompt="La commande suivante permet de", max_tokens=20, temperature=0)
    whole = client.completions.create(**kwargs).choices[0]
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1
    text = "".join(ch.text for c in chunks for ch in c.choices)
    finishes = [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason]
    assert text == whole.text and finishes == [whole.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20


def test_stop_strings_never_reach_the_text_even_across_chunks(client):
    base = dict(model="mini", prompt="It is a truth universally acknowledged", max_tokens=30, temperature=0)
    free = client.completions.create(**base).choices[0].text
    assert len(free) > 12
    stop = free[8:12]  # four characters, likely spanning a token boundary
    whole = client.completions.create(**base, stop=[stop]).choices[0]
    streamed = "".join(
        ch.text for c in client.completions.create(**base, stop=[stop], stream=True) for ch in c.choices
    )
    assert whole.finish_reason == "stop" and stop not in whole.text and free.startswith(whole.text)
    assert streamed == whole.text


def test_n_choices_and_sampling_with_a_seed(client):
    kwargs = dict(model="mini", prompt="Once upon a time", max_tokens=10, temperature=1.0, top_p=0.9, n=3,
                  seed=7, extra_body={"top_k": 50})  # fmt: skip
    a = client.completions.create(**kwargs)
    b = client.completions.create(**kwargs)
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # reproducible with a seed
    assert len({c.text for c in a.choices}) > 1  # the choices differ from each other


def test_echo_logprobs_score_the_prompt_like_the_model(client, ours):
    model, tok = ours
    ids = tok.encode("The quick brown fox jumps over the lazy dog")
    r = client.completions.create(
        model="mini", prompt=ids, max_tokens=0, echo=True, logprobs=2, temperature=0
    )
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    with torch.no_grad():
        full = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    for t in range(1, len(ids)):
        assert lp.token_logprobs[t] == pytest.approx(float(full[t - 1, ids[t]]), abs=1e-4)
        assert len(lp.top_logprobs[t]) <= 2
    assert r.choices[0].text == tok.decode(ids) and r.usage.completion_tokens == 0


def test_chat_streaming_and_not(client):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Name a colour"}, {"type": "text", "text": "."}]}]  # fmt: skip
    whole = client.chat.completions.create(
        model="mini", messages=messages, max_completion_tokens=16, temperature=0
    )
    assert whole.choices[0].message.role == "assistant" and whole.usage.completion_tokens <= 16
    chunks = list(client.chat.completions.create(model="mini", messages=messages, max_tokens=16, temperature=0,
                                                 stream=True, logprobs=True, top_logprobs=2))  # fmt: skip
    roles = [ch.delta.role for c in chunks for ch in c.choices if ch.delta.role]
    assert roles == ["assistant"] and chunks[0].choices[0].delta.role == "assistant"
    assert (
        "".join(ch.delta.content or "" for c in chunks for ch in c.choices)
        == whole.choices[0].message.content
    )
    assert sum(1 for c in chunks for ch in c.choices if ch.finish_reason) == 1
    assert all(
        len(e.top_logprobs) == 2
        for c in chunks
        for ch in c.choices
        if ch.logprobs
        for e in ch.logprobs.content
    )


BAD = [  # (endpoint, body, status, param)
    ("completions", {"prompt": "x"}, 400, "model"),
    ("completions", {"model": "mini"}, 400, "prompt"),
    ("completions", {"model": "mini", "prompt": ""}, 400, "prompt"),
    ("completions", {"model": "mini", "prompt": []}, 400, "prompt"),
    ("completions", {"model": "mini", "prompt": [1, 999999]}, 400, "prompt"),
    ("completions", {"model": "mini", "prompt": 5}, 400, "prompt"),
    ("completions", {"model": "mini", "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("completions", {"model": "mini", "prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ("completions", {"model": "mini", "prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ("completions", {"model": "mini", "prompt": "x", "temperature": 3}, 400, "temperature"),
    ("completions", {"model": "mini", "prompt": "x", "top_p": 0}, 400, "top_p"),
    ("completions", {"model": "mini", "prompt": "x", "top_k": -2}, 400, "top_k"),
    ("completions", {"model": "mini", "prompt": "x", "n": 99}, 400, "n"),
    ("completions", {"model": "mini", "prompt": "x", "logprobs": 9}, 400, "logprobs"),
    ("completions", {"model": "mini", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("completions", {"model": "mini", "prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("completions", {"model": "mini", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("completions", {"model": "mini", "prompt": "x", "seed": -1}, 400, "seed"),
    ("completions", {"model": "mini", "prompt": "x " * 400, "max_tokens": 200}, 400, "max_tokens"),
    ("completions", {"model": "other", "prompt": "x"}, 404, "model"),
    ("chat/completions", {"model": "mini", "messages": []}, 400, "messages"),
    ("chat/completions", {"model": "mini", "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.[0].role"),
    ("chat/completions", {"model": "mini", "messages": [{"role": "user", "content": ""}]}, 400, "messages.[0].content"),
    ("chat/completions", {"model": "mini", "messages": [{"role": "assistant", "content": "a"}]}, 400, "messages"),
    ("chat/completions", {"model": "mini", "messages": [{"role": "user", "content": "a"}], "top_logprobs": 2}, 400,
     "top_logprobs"),
    ("chat/completions", {"model": "mini", "messages": [{"role": "user", "content": "a"}],
                          "max_completion_tokens": 0}, 400, "max_completion_tokens"),
]  # fmt: skip


@pytest.mark.parametrize(("endpoint", "body", "status", "param"), BAD, ids=[f"{b[0]}-{b[3]}" for b in BAD])
def test_a_bad_request_names_its_field_and_the_server_goes_on(server, endpoint, body, status, param):
    r = server.post(f"/v1/{endpoint}", body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param and error["message"]
    if param == "max_tokens" and "x " in str(body.get("prompt")):
        assert error["code"] == "context_length_exceeded" and "512" in error["message"]
    ok = server.post("/v1/completions", {"model": "mini", "prompt": "Hello", "max_tokens": 2})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 1


def test_malformed_json_and_wrong_content_type(server):
    r = requests.post(
        f"{server.url}/v1/completions", data="{not json", headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["error"]["message"]
    r = requests.post(f"{server.url}/v1/completions", data="prompt=x", headers={"Content-Type": "text/plain"})
    assert r.status_code == 400 and "application/json" in r.json()["error"]["message"]


def test_a_client_that_goes_away_is_aborted(server):
    body = {"model": "mini", "prompt": "Tell a long story", "max_tokens": 400, "stream": True}
    with requests.post(f"{server.url}/v1/completions", json=body, stream=True, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith(b"data: ") for line in got)
    deadline = time.monotonic() + 20
    while server.metric("mixtral_requests_running") or server.metric("mixtral_kv_cache_used_ratio"):
        assert time.monotonic() < deadline, "the aborted request still holds its row"
        time.sleep(0.1)


def test_a_burst_gets_answers_or_429_never_a_5xx(server):
    body = {"model": "mini", "prompt": "Count: one two", "max_tokens": 60}

    def one(_):
        r = server.post("/v1/completions", body)
        return r.status_code, r.headers.get("Retry-After")

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    codes = [c for c, _ in results]
    assert set(codes) <= {200, 429} and 200 in codes and 429 in codes, codes
    assert all(after for c, after in results if c == 429)
    assert server.post("/v1/completions", {**body, "max_tokens": 2}).status_code == 200


def test_an_api_key_is_required_when_set():
    s = Server("--api-key", "sekret", "--max-model-len", "256")
    try:
        body = {"model": "mini", "prompt": "hi", "max_tokens": 2}
        assert s.post("/v1/completions", body).status_code == 401
        assert s.post("/v1/completions", body, headers={"Authorization": "Bearer wrong"}).json()["error"][
            "code"
        ] == ("invalid_api_key")
        c = openai.OpenAI(base_url=f"{s.url}/v1", api_key="sekret", max_retries=0)
        assert c.completions.create(**body).choices[0].text is not None
        assert requests.get(f"{s.url}/health").status_code == 200  # health needs no key
    finally:
        s.stop()


def test_metrics_are_prometheus_text(server):
    server.post("/v1/completions", {"model": "mini", "prompt": "Hello", "max_tokens": 3})
    text = requests.get(f"{server.url}/metrics").text
    for name in ("mixtral_requests_running", "mixtral_requests_waiting", "mixtral_kv_cache_used_ratio",
                 "mixtral_generated_tokens_total", "mixtral_time_to_first_token_seconds_bucket",
                 "mixtral_inter_token_latency_seconds_bucket"):  # fmt: skip
        assert name in text, name
    assert server.metric("mixtral_generated_tokens_total") > 0
    assert json.loads(json.dumps(requests.get(f"{server.url}/v1/models").json()))
