"""The `mixtral` command line: info, generate, chat, convert and demo, as typed functions over argparse.

Entry point only: this module (not the library) sets threads, seeds and logging. Every expected
failure (missing path, bad checkpoint, bad flag value) ends in one `error:` line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .config import PRESETS, MixtralConfig, get_preset
from .errors import MixtralError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
QUANT_TARGETS = ("experts", "attention", "output")  # --quantize compresses every matrix but the embedding


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError


def _human_count(n: int) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _resolve_config(target: str) -> tuple[MixtralConfig, str]:
    if target in PRESETS:
        return get_preset(target), f"preset {target}"
    path = Path(target)
    if not path.exists():
        raise MixtralError(f"{target!r} is neither a preset ({', '.join(PRESETS)}) nor an existing path")
    from .checkpoint import read_config

    cfg, fmt = read_config(path)
    return cfg, f"{fmt} checkpoint {path}"


def info_report(cfg: MixtralConfig) -> dict[str, object]:
    """Parameter counts and memory figures for a config (nothing is allocated)."""
    return {
        "config": cfg.to_dict(),
        "total_params": cfg.total_params,
        "active_params": cfg.active_params,
        "active_fraction": cfg.active_params / cfg.total_params,
        "weights_bytes": {
            name: cfg.total_params * torch.empty((), dtype=dt).element_size() for name, dt in DTYPES.items()
        },  # fmt: skip
        "kv_cache_bytes_per_token": {name: cfg.kv_cache_bytes_per_token(dt) for name, dt in DTYPES.items()},
        "kv_cache_bytes_full_context_bf16": cfg.kv_cache_bytes_per_token(torch.bfloat16) * cfg.max_seq_len,
    }


def cmd_info(target: str, as_json: bool = False) -> None:
    cfg, source = _resolve_config(target)
    report = info_report(cfg)
    if as_json:
        print(json.dumps({"source": source, **report}))
        return
    print(f"{source}")
    print("  " + ", ".join(f"{k}={v}" for k, v in cfg.to_dict().items()))
    print(f"  total parameters:  {cfg.total_params:,} ({_human_count(cfg.total_params)})")
    print(f"  active parameters: {cfg.active_params:,} ({_human_count(cfg.active_params)}, "
          f"{report['active_fraction']:.1%} of total: top-{cfg.top_k} of {cfg.n_experts} experts)")  # fmt: skip
    weights = report["weights_bytes"]
    print("  weights: " + ", ".join(f"{_human_bytes(weights[n])} in {n}" for n in DTYPES))  # type: ignore[index]
    kv = report["kv_cache_bytes_per_token"]
    print("  KV cache per token: " + ", ".join(f"{_human_bytes(kv[n])} in {n}" for n in DTYPES))  # type: ignore[index]
    print(f"  KV cache for one {cfg.max_seq_len}-token sequence (bf16): "
          f"{_human_bytes(report['kv_cache_bytes_full_context_bf16'])}")  # type: ignore[arg-type]  # fmt: skip


def _load(path: str, dtype: str, quantize: str | None = None):
    from .checkpoint import load_model
    from .tokenizer import load_tokenizer

    if not Path(path).exists():
        raise MixtralError(f"model path {path!r} does not exist")
    model = load_model(path, dtype=DTYPES[dtype]).eval()
    if quantize:
        from .quantize import quantize_model

        quantize_model(model, quantize, QUANT_TARGETS)
    try:
        tok = load_tokenizer(path)
    except MixtralError:
        tok = load_tokenizer(None)
        print(f"note: no tokenizer in {path}; using the bundled Mixtral tokenizer", file=sys.stderr)
    if tok.vocab_size > model.config.vocab_size:
        raise MixtralError(
            f"tokenizer has {tok.vocab_size} pieces but the model's vocabulary is {model.config.vocab_size}"
        )
    return model, tok


def cmd_generate(
    path: str,
    prompt: str,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float,
    seed: int | None,
    stop: Sequence[str],
    stream: bool,
    as_json: bool,
    dtype: str,
    chunk_size: int,
    quantize: str | None = None,
    compile: bool = False,
) -> None:
    from .generate import GenerationStats, generate
    from .generate import stream as stream_text

    model, tok = _load(path, dtype, quantize)
    kwargs = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                  seed=seed, stop=tuple(stop), chunk_size=chunk_size, compile=compile)  # fmt: skip
    if stream and not as_json:
        stats = GenerationStats()
        for piece in stream_text(model, tok, prompt, stats=stats, **kwargs):
            print(piece, end="", flush=True)
        print()
        print(f"[prefill {stats.prefill_tokens_per_s:.1f} tok/s, decode {stats.decode_tokens_per_s:.1f} tok/s]",
              file=sys.stderr)  # fmt: skip
        return
    out = generate(model, tok, prompt, **kwargs)
    if as_json:
        s = out.stats
        print(json.dumps({
            "prompt": prompt, "text": out.text, "token_ids": out.token_ids, "finish_reason": out.finish_reason,
            "prompt_tokens": s.prompt_tokens, "generated_tokens": len(out.token_ids),
            "prefill_seconds": s.prefill_seconds, "decode_seconds": s.decode_seconds,
            "prefill_tokens_per_s": s.prefill_tokens_per_s, "decode_tokens_per_s": s.decode_tokens_per_s,
        }, ensure_ascii=False))  # fmt: skip
    else:
        print(prompt + out.text)


def cmd_chat(
    path: str, system: str | None, max_new_tokens: int, temperature: float, top_p: float,
    seed: int | None, dtype: str, quantize: str | None = None,
) -> None:  # fmt: skip
    from .chat import encode_chat
    from .generate import stream

    model, tok = _load(path, dtype, quantize)
    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    interactive = sys.stdin.isatty()
    if interactive:
        print("Mixtral-Instruct chat. Empty line or Ctrl-D to quit, /reset to clear the history.")
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        if not line.strip():
            break
        if line.strip() == "/reset":
            messages = messages[:1] if system else []
            continue
        messages.append({"role": "user", "content": line})
        print("mixtral> " if interactive else "", end="", flush=True)
        answer = ""
        for piece in stream(model, tok, encode_chat(tok, messages), max_new_tokens=max_new_tokens,
                            temperature=temperature, top_p=top_p, seed=seed):  # fmt: skip
            if not answer:  # the reply's first word carries SentencePiece's space after [/INST]
                piece = piece.lstrip()
            answer += piece
            print(piece, end="", flush=True)
        print()
        # The turn must be non-empty to be valid in the v1 format; a model that said nothing gets a space.
        messages.append({"role": "assistant", "content": answer.strip() or " "})


def cmd_convert(
    src: str, dst: str, to: str | None, dtype: str | None, overwrite: bool, outtype: str = "f32"
) -> None:
    from .checkpoint import convert, read_config

    if not Path(src).exists():
        raise MixtralError(f"source {src!r} does not exist")
    _, fmt = read_config(src)
    target = to or ("mistral" if fmt == "hf" else "hf")
    t0 = time.perf_counter()
    if target == "gguf":
        from .gguf_export import export_gguf

        export_gguf(src, dst, outtype, overwrite=overwrite)
        target = f"gguf ({outtype})"
    else:
        convert(src, dst, to=target, dtype=DTYPES[dtype] if dtype else None, overwrite=overwrite)
    print(
        f"converted {fmt} checkpoint {src} -> {target} checkpoint {dst} in {time.perf_counter() - t0:.1f} s"
    )


def _add_sampling(p: argparse.ArgumentParser, temperature: float) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most (default 128)")
    p.add_argument("--temperature", type=float, default=temperature,
                   help=f"0 = greedy; higher = more random (default {temperature})")  # fmt: skip
    p.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1 = off)"
    )
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="weight dtype to load (default fp32)")
    p.add_argument("--quantize", choices=("int8", "bf16"), default=None,
                   help="weight-only compression after loading (activations stay fp32): int8 with "
                   "per-channel scales or bf16 storage; decode streams the compressed weights")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mixtral",
        description="Mixtral sparse mixture-of-experts models: inspect, generate, chat, convert.",
        epilog="examples:\n  mixtral info mixtral-8x7b\n  mixtral demo\n"
        '  mixtral generate models/mini "def fibonacci(n):" --max-new-tokens 64 --stream\n'
        "  mixtral convert Mixtral-8x7B-v0.1-consolidated Mixtral-8x7B-hf --to hf\n"
        "run 'mixtral COMMAND --help' for a command's options",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "info", help="parameter counts and memory of a preset or checkpoint (allocates nothing)"
    )
    p.add_argument("target", help=f"a preset ({', '.join(PRESETS)}) or a checkpoint directory")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("generate", help="generate text from a prompt with a checkpoint")
    p.add_argument("path", help="checkpoint directory (Hugging Face or Mistral format)")
    p.add_argument("prompt", help="prompt text (BOS is added)")
    _add_sampling(p, temperature=0.0)
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens only")
    p.add_argument(
        "--stop", action="append", default=[], help="stop string (repeatable); excluded from output"
    )
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--json", action="store_true", help="print one JSON line: text, token ids, timings")
    p.add_argument("--chunk-size", type=int, default=512, help="prefill chunk length (default 512)")
    p.add_argument("--compile", action="store_true",
                   help="run the decode step under torch.compile (falls back to eager if it fails)")  # fmt: skip

    p = sub.add_parser("chat", help="interactive chat in the Mixtral-Instruct format, streamed")
    p.add_argument("path", help="checkpoint directory")
    p.add_argument("--system", default=None, help="system prompt (prepended to the first user turn)")
    _add_sampling(p, temperature=0.7)

    p = sub.add_parser(
        "convert", help="convert a checkpoint: Mistral <-> Hugging Face, or to GGUF for llama.cpp"
    )
    p.add_argument("src", help="source checkpoint directory (format detected)")
    p.add_argument("dst", help="destination directory (a .gguf file with --to gguf), written atomically")
    p.add_argument("--to", choices=("hf", "mistral", "gguf"), default=None,
                   help="target format (default: the other of hf/mistral)")  # fmt: skip
    p.add_argument(
        "--outtype", choices=("f32", "f16", "q8_0"), default="f32", help="GGUF tensor type (default f32)"
    )
    p.add_argument("--dtype", choices=DTYPES, default=None, help="cast weights (default: keep)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing destination")

    from . import cli_demo, cli_instruct, cli_quantize, cli_routing, cli_train

    cli_demo.add_parsers(sub)
    cli_train.add_parsers(sub)
    cli_quantize.add_parsers(sub)
    cli_routing.add_parsers(sub)
    cli_instruct.add_parsers(sub)
    return parser


def _dispatch(args: argparse.Namespace) -> Callable[[], None]:
    a = args
    return {
        "info": lambda: cmd_info(a.target, a.json),
        "generate": lambda: cmd_generate(a.path, a.prompt, a.max_new_tokens, a.temperature, a.top_k, a.top_p,
                                         a.seed, a.stop, a.stream, a.json, a.dtype, a.chunk_size, a.quantize,
                                         a.compile),
        "chat": lambda: cmd_chat(a.path, a.system, a.max_new_tokens, a.temperature, a.top_p, a.seed, a.dtype,
                                 a.quantize),
        "convert": lambda: cmd_convert(a.src, a.dst, a.to, a.dtype, a.overwrite, a.outtype),
    }[a.command]  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if hasattr(args, "func"):
            args.func(args)
        else:
            _dispatch(args)()
    except BrokenPipeError:  # e.g. `mixtral generate ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (MixtralError, OSError, ValueError) as e:  # OSError: paths; ValueError: bad option values
        if os.environ.get("MIXTRAL_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
