"""The numbers of docs/instruct.md: base vs SFT vs DPO models on the bundled held-out instruct data.

For each model: accuracy on the checkable held-out questions (data/instruct/eval.jsonl, greedy),
preference accuracy on held-out pairs (share with log p(chosen) > log p(rejected), no reference
needed), routing drift against the base model on held-out corpus text and on chat prompts, sample
chats (greedy, multi-turn), and a transformers load check. Writes one JSON file and prints tables.

    python scripts/instruct_report.py --base models/mini --sft runs/sft-mini/model \\
        --dpo runs/dpo-mini/model --out docs/instruct/results.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mixtral.analysis.drift import routing_drift
from mixtral.checkpoint import load_model
from mixtral.data.domains import load_domains
from mixtral.data.instruct import PreferenceStream, read_preferences, tokenize_preferences
from mixtral.data.packing import PackedStream
from mixtral.eval.instruct import evaluate_accuracy, load_eval
from mixtral.inference import generate_ids
from mixtral.text import encode_chat
from mixtral.text.tokenizer import load_tokenizer
from mixtral.train.instruct import pair_logprobs
from mixtral.train.instruct_run import DATA_DIR

CHATS = [
    [{"role": "user", "content": "Calculate 12 + 30."}],
    [{"role": "user", "content": "Which language is this text written in?\n\nLe chat dort sur la table."}],
    [
        {
            "role": "user",
            "content": "What is the first word of this sentence?\n\nPython is a programming language.",
        },
        {"role": "assistant", "content": "Python"},
        {"role": "user", "content": "Calculate 7 - 9."},
    ],  # fmt: skip
    [
        {
            "role": "user",
            "content": "What is the name of the function defined in this code?\n\n"
            "def parse_args(argv):\n    return argv[1:]",
        }
    ],  # fmt: skip
]


@torch.no_grad()
def preference_accuracy(model, stream: PreferenceStream) -> float:
    wins = n = 0
    for batch in stream.iter_batches(16):
        chosen, rejected, _ = pair_logprobs(model, batch)
        wins += int((chosen > rejected).sum())
        n += chosen.numel()
    return wins / n


def corpus_batches(tok, tokens_per_domain: int = 4096, seq_len: int = 256):
    out = []
    for domain, docs in load_domains(tok, {})[0].items():
        stream = PackedStream({domain: docs}, seq_len, shuffle=False, loop=False)
        for i, b in enumerate(stream.batches(8)):
            if i * 8 * seq_len >= tokens_per_domain:
                break
            out.append((b.inputs, b.positions))
    return out


def chat_batches(tok, items, n: int = 200):
    out = []
    for item in items[:n]:
        ids = torch.tensor([encode_chat(tok, item["messages"])])
        out.append((ids, torch.arange(ids.shape[1])[None]))
    return out


def sample_chats(model, tok) -> list[dict]:
    out = []
    for messages in CHATS:
        steps = generate_ids(model, [encode_chat(tok, messages)], max_new_tokens=40, eos_id=tok.eos_id)
        ids = [step[0] for step in steps if step[0] is not None and step[0] != tok.eos_id]
        out.append({"messages": messages, "reply": tok.decode(ids)})
    return out


def transformers_check(path: Path, model) -> float | None:
    try:
        import transformers
    except ImportError:
        return None
    hf = transformers.MixtralForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    x = torch.randint(0, model.config.vocab_size, (1, 32))
    with torch.no_grad():
        return float((hf(x).logits - model(x).logits).abs().max())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="models/mini")
    p.add_argument("--sft", default="runs/sft-mini/model")
    p.add_argument("--dpo", default="runs/dpo-mini/model")
    p.add_argument("--out", default="docs/instruct/results.json")
    p.add_argument("--eval-items", type=int, default=0, help="first N eval questions (0 = all)")
    a = p.parse_args()
    tok = load_tokenizer(a.base)
    items = load_eval(DATA_DIR / "eval.jsonl")
    items = items[: a.eval_items] if a.eval_items else items
    pairs, _ = tokenize_preferences(tok, read_preferences(DATA_DIR / "pref_valid.jsonl"), 512)
    pref_stream = PreferenceStream(pairs, shuffle=False)
    corpus, chats = corpus_batches(tok), chat_batches(tok, items)
    models = {
        name: load_model(path).eval() for name, path in (("base", a.base), ("sft", a.sft), ("dpo", a.dpo))
    }
    results: dict = {"eval_items": len(items), "pref_valid_pairs": len(pairs), "models": {}}
    for name, model in models.items():
        t0 = time.perf_counter()
        acc = evaluate_accuracy(model, tok, items)
        r = {"accuracy": acc["accuracy"], "per_task": acc["per_task"], "examples": acc["examples"],
             "preference_accuracy": preference_accuracy(model, pref_stream),
             "chats": sample_chats(model, tok)}  # fmt: skip
        if name != "base":
            r["drift_corpus"] = routing_drift(models["base"], model, corpus)
            r["drift_chat"] = routing_drift(models["base"], model, chats)
            r["transformers_max_abs_logit_diff"] = transformers_check(Path(getattr(a, name)), model)
        results["models"][name] = r
        print(f"{name}: accuracy {acc['accuracy']:.1%} {acc['per_task']}, preference accuracy "
              f"{r['preference_accuracy']:.1%} ({time.perf_counter() - t0:.0f} s)")  # fmt: skip
    results["drift_dpo_vs_sft_chat"] = routing_drift(models["sft"], models["dpo"], chats)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=1))
    L = models["base"].config.n_layers
    print("\nrouting drift vs base (share of tokens whose top-k set changed), per layer:")
    for name in ("sft", "dpo"):
        for kind in ("drift_corpus", "drift_chat"):
            row = " ".join(f"{v:6.1%}" for v in results["models"][name][kind]["topk_changed"][:L])
            print(f"  {name:<4} {kind:<13} {row}")
    print(
        json.dumps(
            {n: {k: r[k] for k in ("accuracy", "preference_accuracy")} for n, r in results["models"].items()}
        )
    )


if __name__ == "__main__":
    main()
