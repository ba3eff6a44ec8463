"""Drives the engine on its own thread and hands each request's outputs to asyncio, with metrics.

The engine is not thread-safe, so one thread owns it: it steps while there is work and sleeps on
an event otherwise (an idle server costs no CPU). `submit` and `abort` take the engine's lock
briefly from a worker thread, so the event loop never waits for a step; a step's outputs reach each
request's asyncio queue through `call_soon_threadsafe`. Prometheus metrics (running, waiting, KV
use, generated tokens, time to first token, inter-token latency) are updated here, where the
timings happen.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from mixtral.inference import GenerationConfig
from mixtral.inference.engine import Engine, RequestOutput

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """The server's Prometheus metrics, in a registry of their own (tests start several servers)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.running = Gauge("mixtral_requests_running", "Requests holding a KV-cache row", registry=r)
        self.waiting = Gauge("mixtral_requests_waiting", "Requests queued for a row", registry=r)
        self.kv_used = Gauge("mixtral_kv_cache_used_ratio", "Share of KV-cache positions in use", registry=r)
        self.generated = Counter("mixtral_generated_tokens", "Tokens generated", registry=r)
        self.prompt = Counter("mixtral_prompt_tokens", "Prompt tokens processed", registry=r)
        self.requests = Counter("mixtral_requests_finished", "Requests finished", ["reason"], registry=r)
        self.ttft = Histogram("mixtral_time_to_first_token_seconds", "Time to first token", buckets=_LATENCY_BUCKETS,
                              registry=r)  # fmt: skip
        self.itl = Histogram("mixtral_inter_token_latency_seconds", "Time between a request's tokens",
                             buckets=_LATENCY_BUCKETS, registry=r)  # fmt: skip


@dataclass
class _Subscriber:
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    submitted: float
    last: float | None = None


class EngineRunner:
    """The engine's thread and the bridge to asyncio (see the module docstring)."""

    def __init__(self, engine: Engine, metrics: Metrics | None = None) -> None:
        self.engine, self.metrics = engine, metrics or Metrics()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._subscribers: dict[str, _Subscriber] = {}
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._loop, name="mixtral-engine", daemon=True)
        self._thread.start()

    def new_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}-{time.monotonic_ns():x}"

    async def submit(
        self, request_id: str, prompt: list[int], config: GenerationConfig, **options
    ) -> asyncio.Queue:
        """Add a request (raising the engine's GenerationError / QueueFullError); its outputs arrive
        on the returned queue, the last one with a finish_reason (or an Exception if the engine
        failed while running it)."""
        queue: asyncio.Queue = asyncio.Queue()
        subscriber = _Subscriber(queue, asyncio.get_running_loop(), time.perf_counter())

        def add() -> None:
            with self._lock:
                self.engine.add_request(request_id, prompt, config, **options)
                self._subscribers[request_id] = subscriber
            self._wake.set()

        await asyncio.to_thread(add)
        return queue

    async def abort(self, request_ids: list[str]) -> None:
        """Drop requests (a client went away); their cache rows are free before the next step."""

        def drop() -> None:
            with self._lock:
                for rid in request_ids:
                    if self.engine.abort(rid):
                        self.metrics.requests.labels("abort").inc()
                    self._subscribers.pop(rid, None)
                self._update_gauges()

        await asyncio.to_thread(drop)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return self.engine.stats

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=30)

    # ---- the engine's thread ------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop:
            with self._lock:
                busy = self.engine.has_unfinished()
                try:
                    outputs = self.engine.step() if busy else []
                except Exception as e:  # every request in flight gets the error; the server goes on
                    deliveries = self._fail_all(e)
                    outputs = []
                else:
                    deliveries = [(self._subscribers.get(o.request_id), o) for o in outputs]
                self._update_gauges()
                for o in outputs:
                    if o.finish_reason:
                        self._subscribers.pop(o.request_id, None)
            now = time.perf_counter()
            for subscriber, out in deliveries:
                if subscriber is not None:
                    if isinstance(out, RequestOutput):
                        self._observe(subscriber, out, now)
                    subscriber.loop.call_soon_threadsafe(subscriber.queue.put_nowait, out)
            if not busy:
                self._wake.wait(timeout=1.0)
                self._wake.clear()

    def _fail_all(self, error: Exception) -> list[tuple[_Subscriber, Exception]]:
        """Abort every request (their rows are freed) and hand each subscriber the error."""
        for rid in [*self.engine.waiting, *self.engine.running]:
            self.engine.abort(rid)
            self.metrics.requests.labels("error").inc()
        failed = [(s, error) for s in self._subscribers.values()]
        self._subscribers.clear()
        return failed

    def _observe(self, subscriber: _Subscriber, out: RequestOutput, now: float) -> None:
        m = self.metrics
        if out.token_ids:
            if subscriber.last is None:
                m.ttft.observe(now - subscriber.submitted)
                m.prompt.inc(out.prompt_tokens)
            else:
                m.itl.observe((now - subscriber.last) / len(out.token_ids))
            subscriber.last = now
            m.generated.inc(len(out.token_ids))
        if out.finish_reason:
            m.requests.labels(out.finish_reason).inc()

    def _update_gauges(self) -> None:
        s = self.engine.stats
        self.metrics.running.set(s["running"])
        self.metrics.waiting.set(s["waiting"])
        self.metrics.kv_used.set(s["kv_used"] / s["kv_capacity"])
