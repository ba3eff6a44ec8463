"""`mixtral generate` and `mixtral chat`: text from a checkpoint, plain, streamed or as JSON.

Text from argv and stdin that is not UTF-8 is decoded with U+FFFD for each undecodable byte, with one
note on stderr. Piped `chat` (stdin not a terminal) prints each answer as one line holding a JSON
string, so a script reads one answer per line (`json.loads(line)`) whatever the answer contains.
"""

from __future__ import annotations

import argparse
import json
import sys

from mixtral.cli.common import (
    ModelOptions,
    TextCleaner,
    add_device_option,
    add_model_options,
    add_sampling_options,
    generation_config,
    generation_field,
    load_for_inference,
    model_options,
    offload_report,
)
from mixtral.inference import GenerationConfig, GenerationStats, generate, stream
from mixtral.text import encode_chat

# Characters that str.splitlines() breaks on but json.dumps(ensure_ascii=False) leaves as they are.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def json_string_body(text: str) -> str:
    """`text` as the inside of a JSON string that holds no line break of any kind (piped chat's lines)."""
    return json.dumps(text, ensure_ascii=False)[1:-1].translate(_LINE_BREAKS)


def cmd_generate(
    path: str,
    prompt: str,
    config: GenerationConfig,
    options: ModelOptions | None = None,
    streamed: bool = False,
    as_json: bool = False,
) -> None:
    clean = TextCleaner()
    prompt = clean(prompt, "the prompt")
    config = config.replace(stop=tuple(clean(s, "a --stop string") for s in config.stop))
    model, tok = load_for_inference(path, options)
    if streamed and not as_json:
        stats = GenerationStats()
        print(prompt, end="", flush=True)  # as plain mode prints prompt + text
        for piece in stream(model, tok, prompt, config, stats=stats):
            print(piece, end="", flush=True)
        print()
        print(f"[prefill {stats.prefill_tokens_per_s:.1f} tok/s, decode {stats.decode_tokens_per_s:.1f} tok/s]",
              file=sys.stderr)  # fmt: skip
        _print_offload(model)
        return
    out = generate(model, tok, prompt, config)
    if as_json:
        s = out.stats
        print(json.dumps({
            "prompt": prompt, "text": out.text, "token_ids": out.token_ids, "finish_reason": out.finish_reason,
            "prompt_tokens": s.prompt_tokens, "generated_tokens": len(out.token_ids),
            "prefill_seconds": s.prefill_seconds, "decode_seconds": s.decode_seconds,
            "prefill_tokens_per_s": s.prefill_tokens_per_s, "decode_tokens_per_s": s.decode_tokens_per_s,
            **({"offload": model.expert_cache.stats.summary()} if hasattr(model, "expert_cache") else {}),
        }, ensure_ascii=False))  # fmt: skip
    else:
        print(prompt + out.text)
    _print_offload(model)


def _print_offload(model) -> None:
    if line := offload_report(model):
        print(line, file=sys.stderr)


def cmd_chat(
    path: str, system: str | None, config: GenerationConfig, options: ModelOptions | None = None
) -> None:
    clean = TextCleaner()
    system = clean(system, "the --system prompt") if system else system
    model, tok = load_for_inference(path, options)
    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    interactive = sys.stdin.isatty()
    if reconfigure := getattr(sys.stdin, "reconfigure", None):
        reconfigure(errors="surrogateescape")  # undecodable bytes reach `clean` (not a UnicodeDecodeError)
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
        messages.append({"role": "user", "content": clean(line, "the input")})
        # Piped: one line per answer, a JSON string (quotes, \n and the like escaped), streamed as it comes.
        print("mixtral> " if interactive else '"', end="", flush=True)
        answer = ""
        for piece in stream(model, tok, encode_chat(tok, messages), config):
            if not answer:  # the reply's first word carries SentencePiece's space after [/INST]
                piece = piece.lstrip()
            answer += piece
            print(piece if interactive else json_string_body(piece), end="", flush=True)
        print("" if interactive else '"')
        # The turn must be non-empty to be valid in the v1 format; a model that said nothing gets a space.
        messages.append({"role": "assistant", "content": answer.strip() or " "})
    _print_offload(model)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt with a checkpoint")
    p.add_argument("path", help="checkpoint directory (Hugging Face or Mistral format)")
    p.add_argument("prompt", help="prompt text (BOS is added)")
    add_sampling_options(p, temperature=0.0)
    add_model_options(p)
    add_device_option(p)
    p.add_argument("--top-k", type=generation_field("top_k", int), default=None,
                   help="sample from the k most likely tokens only (0 = off)")  # fmt: skip
    p.add_argument(
        "--stop", action="append", default=[], help="stop string (repeatable); excluded from output"
    )
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--json", action="store_true", help="print one JSON line: text, token ids, timings")
    p.add_argument("--chunk-size", type=generation_field("chunk_size", int), default=512,
                   help="prefill chunk length, >= 1 (default 512)")  # fmt: skip
    p.add_argument("--compile", action="store_true",
                   help="run the decode step under torch.compile (falls back to eager if it fails)")  # fmt: skip
    p.set_defaults(func=lambda a: cmd_generate(a.path, a.prompt, generation_config(a), model_options(a),
                                               a.stream, a.json))  # fmt: skip

    p = sub.add_parser("chat", help="interactive chat in the Mixtral-Instruct format, streamed",
                       description="Chat in the Mixtral-Instruct format. Interactive on a terminal; with stdin "
                       "piped, each input line is a user turn and each answer is printed as one line "
                       "holding a JSON string. An empty line ends the chat.")  # fmt: skip
    p.add_argument("path", help="checkpoint directory")
    p.add_argument("--system", default=None, help="system prompt (prepended to the first user turn)")
    add_sampling_options(p, temperature=0.7)
    add_model_options(p)
    add_device_option(p)
    p.set_defaults(func=lambda a: cmd_chat(a.path, a.system, generation_config(a), model_options(a)))
