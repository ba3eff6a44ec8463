"""`mixtral sft` and `mixtral dpo`: the Instruct recipe (SFT, then DPO) on any checkpoint."""

from __future__ import annotations

import argparse
import dataclasses
import json

from mixtral.cli.common import add_device_option, job_rank, leave_process_group, resolve_device


def _train_config(base, overrides: list[str]):
    """(TrainConfig, ParallelConfig) from `base` and the --set train.* / parallel.* items."""
    from mixtral.parallel import ParallelConfig
    from mixtral.train.recipes import set_fields

    items: dict[str, list[str]] = {"train": [], "parallel": []}
    for item in overrides:
        key, sep, value = item.partition("=")
        section, _, name = key.partition(".")
        if not sep or section not in items or not name:
            raise ValueError(f"--set takes train.field=value or parallel.field=value, got {item!r}")
        items[section].append(f"{name}={value}")
    return set_fields(base, "train", items["train"]), set_fields(
        ParallelConfig(), "parallel", items["parallel"]
    )


def _held_out(r: dict, what: str) -> str:
    v = r["data"].get("valid") or {}
    return f" ({v.get('evaluated')} of {v.get('kept')} held-out {what}, {v.get('evaluated_tokens')} tokens)"


def cmd_sft(a: argparse.Namespace) -> None:
    """Fine-tunes MODEL on JSONL records {"messages": [{"role", "content"}, ...]} rendered in the
    Mixtral-Instruct format. Loss only on assistant tokens; the load-balancing and router z-losses
    stay on. Over-long conversations are cut on the right to --max-len; those left with no assistant
    token are dropped (counted in data.json). Each evaluation reads at most train.eval_max_tokens
    held-out tokens (0: all)."""
    from mixtral.train.instruct_run import SFT_TRAIN, InstructConfig, run_sft

    device = resolve_device(a.device)
    cfg, parallel = _train_config(SFT_TRAIN, a.overrides)
    out = a.out
    if job_rank() == 0:
        print(f"SFT of {a.model} into {out}/ on {device} ({cfg.steps} steps x {cfg.batch_size} conversations)",
              flush=True)  # fmt: skip
    try:
        r = run_sft(a.model, out, a.data, a.valid, cfg, InstructConfig(max_len=a.max_len), resume=a.resume,
                    device=device, parallel=parallel)  # fmt: skip
    finally:
        leave_process_group()
    if job_rank() != 0:
        return
    c = r["data"]["train"]
    print(f"data: {c['kept']} of {c['records']} conversations kept ({c['truncated']} truncated, "
          f"{c['dropped']} dropped; max_len {a.max_len})")  # fmt: skip
    if r["valid_loss_before"] is not None:
        print(f"held-out assistant-token loss {r['valid_loss_before']:.3f} -> {r['valid_loss_after']:.3f}"
              + _held_out(r, "conversations"))  # fmt: skip
    print(f"model: {out}/model  curve: {out}/curve.png")


def cmd_dpo(a: argparse.Namespace) -> None:
    """DPO (Rafailov et al. 2023) of MODEL on JSONL records {"prompt", "chosen", "rejected"} (strings
    or message lists, as in trl). MODEL is also the frozen reference. Pairs whose prompt plus longer
    response exceed --max-len are dropped, and so are pairs whose chosen and rejected responses are
    identical (both counted in data.json). The reference log-probabilities are computed only for the
    pairs the run visits and cached in --out."""
    from mixtral.train.instruct_run import DPO_TRAIN, InstructConfig, run_dpo

    device = resolve_device(a.device)
    cfg, parallel = _train_config(DPO_TRAIN, a.overrides)
    icfg = InstructConfig(
        max_len=a.max_len, beta=a.beta, label_smoothing=a.label_smoothing, reference=a.reference
    )
    if job_rank() == 0:
        print(f"DPO of {a.model} into {a.out}/ on {device} ({cfg.steps} steps x {cfg.batch_size} pairs, "
              f"beta {a.beta}, {a.reference} reference)", flush=True)  # fmt: skip
    try:
        r = run_dpo(
            a.model, a.out, a.data, a.valid, cfg, icfg, resume=a.resume, device=device, parallel=parallel
        )
    finally:
        leave_process_group()
    if job_rank() != 0:
        return
    c = r["data"]["train"]
    print(f"data: {c['kept']} of {c['records']} pairs kept ({c['dropped']} dropped over max_len {a.max_len}, "
          f"{c.get('identical', 0)} dropped as chosen == rejected)")  # fmt: skip
    if r["valid_after"]:
        b, f = r["valid_before"], r["valid_after"]
        print(f"held-out: loss {b['loss']:.4f} -> {f['loss']:.4f}, reward accuracy "
              f"{b['reward_accuracy']:.1%} -> {f['reward_accuracy']:.1%}, margin {f['reward_margin']:.3f}"
              + _held_out(r, "pairs"))  # fmt: skip
    print(f"model: {a.out}/model  curve: {a.out}/curve.png")
    print(json.dumps({k: r[k] for k in ("steps", "valid_before", "valid_after")}))


def _common(p: argparse.ArgumentParser, kind: str, default_cfg) -> None:
    p.add_argument("model", help="checkpoint directory to start from (with its tokenizer)")
    p.add_argument("--out", required=True, help="run directory (checkpoints, metrics, model/)")
    p.add_argument("--data", default=None,
                   help=f"training JSONL (default: the bundled data/instruct/{kind}_train.jsonl)")  # fmt: skip
    p.add_argument(
        "--valid", default=None, help=f"held-out JSONL (default with --data unset: {kind}_valid.jsonl)"
    )
    p.add_argument(
        "--max-len", type=int, default=512, help="tokens per record (longer: see the rule in --help)"
    )
    fields = ", ".join(f"{f.name}={getattr(default_cfg, f.name)}" for f in dataclasses.fields(default_cfg))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="train.FIELD=VALUE",
                   help=f"override a training setting (repeatable; types checked). Defaults: {fields}. Under torchrun: "
                   "parallel.ep / parallel.dp_shard / parallel.dp_replicate (docs/scaling.md)")  # fmt: skip
    p.add_argument("--no-resume", dest="resume", action="store_false", help="start afresh in --out")
    add_device_option(p)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    from mixtral.train.instruct_run import DPO_TRAIN, SFT_TRAIN

    help_sft = "supervised fine-tuning on chat data (loss on assistant tokens only)"
    p = sub.add_parser("sft", help=help_sft, description=cmd_sft.__doc__)
    _common(p, "sft", SFT_TRAIN)
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser(
        "dpo", help="direct preference optimisation on chosen/rejected pairs", description=cmd_dpo.__doc__
    )
    _common(p, "pref", DPO_TRAIN)
    p.add_argument("--beta", type=float, default=0.1, help="DPO temperature beta (default 0.1)")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="conservative-DPO epsilon in [0, 0.5)")
    p.add_argument("--reference", choices=("precomputed", "copy"), default="precomputed",
                   help="reference log-probs computed once before training (default; no second model in "
                        "memory) or a frozen copy run beside the policy")  # fmt: skip
    p.set_defaults(func=cmd_dpo)
