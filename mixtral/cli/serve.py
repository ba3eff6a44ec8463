"""`mixtral serve`: an OpenAI-compatible server (completions, chat, streaming) with continuous batching."""

from __future__ import annotations

import argparse
from pathlib import Path

from mixtral.cli.common import (
    add_device_option,
    add_model_options,
    load_for_inference,
    model_options,
    offload_report,
    positive_int,
    resolve_device,
)
from mixtral.errors import MixtralError


def cmd_serve(a: argparse.Namespace) -> None:
    """Loads MODEL on a background thread (GET /health answers 503 until it is ready, then 200) and
    serves /v1/models, /v1/completions, /v1/chat/completions (OpenAI's API, streaming included),
    /metrics (Prometheus) and a chat page at /. Requests join and leave the running batch between
    decode steps; the KV cache holds --max-batch rows of --max-model-len positions."""
    try:
        import uvicorn

        from mixtral.serve.app import create_app
    except ImportError as e:
        raise MixtralError(
            f"mixtral serve needs the serve extra (pip install 'mixtral[serve]'): {e}"
        ) from None
    from mixtral.inference.engine import Engine

    resolve_device(a.device)  # an absent device fails now, not in the loading thread
    if not Path(a.model).exists():
        raise MixtralError(f"model path {a.model!r} does not exist")
    options = model_options(a)

    loaded = []

    def load():
        model, tok = load_for_inference(a.model, options)
        loaded.append(model)
        engine = Engine(model, tok, max_batch=a.max_batch, max_model_len=a.max_model_len, max_queue=a.max_queue,
                        step_tokens=a.step_tokens)  # fmt: skip
        return engine, tok

    name = a.served_model_name or Path(a.model).resolve().name
    app = create_app(load, name, a.api_key)
    print(f"serving {a.model} as {name!r} on http://{a.host}:{a.port} (OpenAI API under /v1, chat page at /)",
          flush=True)  # fmt: skip
    uvicorn.run(app, host=a.host, port=a.port, log_level=a.log_level, timeout_graceful_shutdown=5)
    if loaded and (line := offload_report(loaded[0])):
        print(line, flush=True)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching",
                       description=cmd_serve.__doc__)  # fmt: skip
    p.add_argument("model", help="checkpoint directory (Hugging Face or Mistral format)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=positive_int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--served-model-name", default=None, help="the model id clients send (default: the directory name)"
    )
    p.add_argument(
        "--max-batch",
        type=positive_int,
        default=8,
        help="requests decoded together (KV-cache rows, default 8)",
    )
    p.add_argument("--max-queue", type=positive_int, default=64,
                   help="requests waiting for a row; more get 429 with Retry-After (default 64)")  # fmt: skip
    p.add_argument("--max-model-len", type=positive_int, default=None,
                   help="positions per request, prompt plus answer (default: the model's context)")  # fmt: skip
    p.add_argument("--step-tokens", type=positive_int, default=512,
                   help="prompt tokens prefilled per engine step, interleaved with decoding (default 512)")  # fmt: skip
    p.add_argument(
        "--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 (default: none)"
    )
    p.add_argument(
        "--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug")
    )
    add_model_options(p)
    add_device_option(p)
    p.set_defaults(func=cmd_serve)
