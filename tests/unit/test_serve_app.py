"""The HTTP app's states that a real server rarely shows: loading (503), a failed load, an engine that
fails in the middle of a stream (an error event, then [DONE]; the server goes on). uvicorn runs the
app in a thread of the test, on a free loopback port, with a loader the test controls."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import torch
from helpers import tiny_config

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
requests = pytest.importorskip("requests")

from mixtral.inference.engine import Engine  # noqa: E402
from mixtral.model import Transformer  # noqa: E402
from mixtral.serve.app import create_app  # noqa: E402
from mixtral.text import load_tokenizer  # noqa: E402


class AppServer:
    def __init__(self, load) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(create_app(load, "tiny"), host="127.0.0.1", port=self.port, log_level="error")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def tiny_engine(engine_class=Engine):
    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size=32000)).eval()
    tok = load_tokenizer(None)
    return engine_class(model, tok, max_batch=2, max_model_len=128), tok


def wait_healthy(url: str) -> None:
    deadline = time.monotonic() + 30
    while requests.get(f"{url}/health").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_health_is_503_while_loading_then_200():
    release = threading.Event()

    def load():
        release.wait(30)
        return tiny_engine()

    server = AppServer(load)
    try:
        r = requests.get(f"{server.url}/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = requests.post(f"{server.url}/v1/completions", json={"model": "tiny", "prompt": "x"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
        release.set()
        wait_healthy(server.url)
        r = requests.post(
            f"{server.url}/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2}
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    finally:
        release.set()
        server.stop()


def test_a_failed_load_is_reported_not_hidden():
    def load():
        raise RuntimeError("weights are corrupt")

    server = AppServer(load)
    try:
        deadline = time.monotonic() + 10
        while requests.get(f"{server.url}/health").json()["status"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        r = requests.get(f"{server.url}/health")
        assert r.status_code == 503 and "weights are corrupt" in r.json()["detail"]
        r = requests.post(f"{server.url}/v1/completions", json={"model": "tiny", "prompt": "x"})
        assert r.status_code == 503 and "weights are corrupt" in r.json()["error"]["message"]
    finally:
        server.stop()


class FailingEngine(Engine):
    """Fails in the step after `fail_at` steps, while requests are running."""

    fail_at = 3
    steps = 0

    def step(self):
        FailingEngine.steps += 1
        if FailingEngine.steps == self.fail_at:
            raise RuntimeError("device lost")
        return super().step()


def test_an_engine_failure_mid_stream_is_an_error_event_then_done():
    server = AppServer(lambda: tiny_engine(FailingEngine))
    try:
        wait_healthy(server.url)
        body = {"model": "tiny", "prompt": "Hello", "max_tokens": 20, "stream": True}
        with requests.post(f"{server.url}/v1/completions", json=body, stream=True, timeout=30) as r:
            events = [line.decode() for line in r.iter_lines() if line]
        assert events[-1] == "data: [DONE]"
        error = json.loads(events[-2].removeprefix("data: "))
        assert error["error"]["code"] == "internal_error" and "device lost" in error["error"]["message"]
        assert any('"text"' in e for e in events[:-2])  # some text came before the failure
        r = requests.post(f"{server.url}/v1/completions", json={**body, "stream": False, "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3  # the server goes on
    finally:
        server.stop()
