"""The HTTP layer: an OpenAI-compatible FastAPI app over an `EngineRunner` (it never touches tensors).

Endpoints: `/health` (503 while the model loads, then 200), `/v1/models`, `/v1/completions`,
`/v1/chat/completions` (JSON or data-only server-sent events ending in `data: [DONE]`),
`/metrics` (Prometheus text) and `/`, a chat page. Every failure is OpenAI's error shape; a client
that goes away has its requests aborted.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mixtral.errors import GenerationError
from mixtral.inference.engine import ContextLengthError, Engine, QueueFullError, RequestOutput
from mixtral.serve.protocol import ApiError, ChatRequest, CompletionRequest, Job, chat_jobs, completion_jobs
from mixtral.serve.render import (
    ChoiceState,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    usage,
)
from mixtral.serve.runner import EngineRunner

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class ServerState:
    """What the endpoints share: the runner once loaded, or the load error."""

    model_name: str
    api_key: str | None
    max_model_len: int | None = None
    runner: EngineRunner | None = None
    tokenizer: Any = None
    vocab_size: int = 0
    load_error: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))


def create_app(
    load: Callable[[], tuple[Engine, Any]], model_name: str, api_key: str | None = None
) -> FastAPI:
    """The app; `load()` builds (engine, tokenizer) on a background thread while /health says 503."""
    state = ServerState(model_name, api_key)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        threading.Thread(target=load_in_background, name="mixtral-load", daemon=True).start()
        yield
        if state.runner is not None:
            state.runner.close()

    app = FastAPI(title="mixtral", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.mixtral = state

    def load_in_background() -> None:
        try:
            engine, tok = load()
            state.tokenizer, state.vocab_size, state.max_model_len = (
                tok,
                engine.model.config.vocab_size,
                engine.max_model_len,
            )
            state.runner = EngineRunner(engine)
        except Exception as e:  # the server stays up and says why
            state.load_error = f"{type(e).__name__}: {e}"

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0]
        param = param_name(first.get("loc", ()))
        if first.get("type") == "json_invalid":
            message, param = "the request body is not valid JSON", None
        else:
            message = f"{param or 'body'}: {first.get('msg', 'invalid value')}"
        return JSONResponse(ApiError(400, message, param).body(), status_code=400)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        path = request.url.path
        if path.startswith("/v1/"):
            if (
                state.api_key is not None
                and request.headers.get("authorization") != f"Bearer {state.api_key}"
            ):
                e = ApiError(401, "invalid or missing API key (Authorization: Bearer KEY)", None, "invalid_api_key",
                             type="authentication_error")  # fmt: skip
                return JSONResponse(e.body(), status_code=401)
            if state.runner is None:
                e = ApiError(503, state.load_error or "the model is still loading", None, "model_loading",
                             type="server_error")  # fmt: skip
                return JSONResponse(e.body(), status_code=503)
            if request.method == "POST" and "application/json" not in request.headers.get("content-type", ""):
                e = ApiError(400, "send the request body as JSON (Content-Type: application/json)", None)
                return JSONResponse(e.body(), status_code=400)
        return await call_next(request)

    @app.get("/health")
    async def health() -> Response:
        if state.runner is None:
            return JSONResponse({"status": "error" if state.load_error else "loading", "detail": state.load_error},
                                status_code=503)  # fmt: skip
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        if state.runner is None:
            return Response("", media_type=CONTENT_TYPE_LATEST)
        return Response(generate_latest(state.runner.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.created,
                                            "owned_by": "mixtral", "max_model_len": state.max_model_len}]}  # fmt: skip

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return resources.files("mixtral.serve").joinpath("chat.html").read_text(encoding="utf-8")

    def check_model(name: str) -> None:
        if name != state.model_name:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {state.model_name!r}",
                           "model", "model_not_found")  # fmt: skip

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check_model(body.model)
        prompts, jobs = completion_jobs(body, state.tokenizer, state.vocab_size, state.max_model_len)
        prompt_tokens = sum(len(p) for p in prompts)  # usage counts each prompt once, whatever n
        return await run(request, jobs, body, "cmpl", prompt_tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Response:
        check_model(body.model)
        prompt, jobs = chat_jobs(body, state.tokenizer, state.max_model_len)
        return await run(request, jobs, body, "chatcmpl", len(prompt), chat=True)

    async def run(
        request: Request, jobs: list[Job], body, prefix: str, prompt_tokens: int, chat: bool
    ) -> Response:
        runner = state.runner
        rid = runner.new_id(prefix)
        ids = [f"{rid}-{j.index}" for j in jobs]
        queues = []
        try:
            for job, jid in zip(jobs, ids, strict=True):
                queues.append(await runner.submit(jid, job.prompt, job.config, max_new_tokens=job.max_new_tokens,
                                                  logprobs=job.logprobs, prompt_logprobs=job.echo and job.logprobs is not None))  # fmt: skip
        except QueueFullError as e:
            await runner.abort(ids)
            raise ApiError(
                429, str(e), None, "queue_full", type="rate_limit_error", headers={"Retry-After": "1"}
            ) from None
        except ContextLengthError as e:
            await runner.abort(ids)
            raise ApiError(400, str(e), "max_tokens", "context_length_exceeded") from None
        except GenerationError as e:
            await runner.abort(ids)
            raise ApiError(400, str(e), None) from None
        states = [ChoiceState(job, state.tokenizer) for job in jobs]
        meta = {"id": rid, "created": int(time.time()), "model": state.model_name}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = stream(request, runner, ids, queues, states, meta, prompt_tokens, include_usage, chat)
            return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)
        done = await collect(request, runner, ids, queues, states)
        if not done:
            return Response(status_code=499)
        make = chat_response if chat else completion_response
        return JSONResponse(make(meta, states, prompt_tokens))

    async def collect(request: Request, runner: EngineRunner, ids, queues, states) -> bool:
        """Every choice to its end; False (and aborted) if the client went away first."""
        pending = dict(enumerate(queues))
        try:
            while pending:
                if await request.is_disconnected():
                    return False
                for i, queue in list(pending.items()):
                    try:
                        out = await asyncio.wait_for(queue.get(), timeout=0.05 if len(pending) > 1 else 0.5)
                    except TimeoutError:
                        continue
                    if isinstance(out, Exception):
                        del pending[i]
                        raise ApiError(500, f"the engine failed: {type(out).__name__}: {out}", None, "internal_error",
                                       type="server_error")  # fmt: skip
                    states[i].add(out)
                    if out.finish_reason:
                        del pending[i]
            return True
        finally:
            if pending:
                await runner.abort([ids[i] for i in pending])

    async def stream(
        request, runner, ids, queues, states, meta, prompt_tokens, include_usage, chat
    ) -> AsyncIterator[str]:
        merged: asyncio.Queue = asyncio.Queue()

        async def forward(i: int, queue: asyncio.Queue) -> None:
            while True:
                out: RequestOutput | Exception = await queue.get()
                await merged.put((i, out))
                if isinstance(out, Exception) or out.finish_reason:
                    return

        tasks = [asyncio.create_task(forward(i, q)) for i, q in enumerate(queues)]
        open_choices = set(range(len(queues)))
        chunk = chat_chunk if chat else completion_chunk
        try:
            if chat:
                for s in states:  # the role, once per choice, in the first chunk
                    yield _sse(chunk(meta, s, None, first=True))
            while open_choices:
                i, out = await merged.get()
                if isinstance(out, Exception):
                    open_choices.discard(i)
                    raise out
                states[i].add(out)
                yield _sse(chunk(meta, states[i], out))
                if out.finish_reason:
                    open_choices.discard(i)
            if include_usage:
                yield _sse({**_object(meta, chat), "choices": [], "usage": usage(states, prompt_tokens)})
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a failure mid-stream: an error event, then the end of the stream
            yield _sse(
                ApiError(500, f"{type(e).__name__}: {e}", None, "internal_error", type="server_error").body()
            )
        finally:
            for t in tasks:
                t.cancel()
            unfinished = [ids[i] for i in open_choices]
            if unfinished:
                await runner.abort(unfinished)
        yield "data: [DONE]\n\n"

    return app


_TYPE_TAG = ("str", "int", "float", "bool", "list", "dict", "none")


def param_name(loc) -> str | None:
    """A pydantic error location as OpenAI names parameters: "messages.[0].role"; the union member
    tags pydantic appends ("str", "list[int]", ...) and the leading "body" are dropped."""
    parts = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item != "body" and not (item in _TYPE_TAG or "[" in item or item.startswith("function-")):
            parts.append(item)
    return ".".join(parts) or None


def _object(meta: dict, chat: bool) -> dict:
    return {**meta, "object": "chat.completion.chunk" if chat else "text_completion"}


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
