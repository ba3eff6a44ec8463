"""Run under torchrun: a model with experts split over EP ranks against the same model in one process.

argv: EP [ROUTER]  (ROUTER: "learned", or "one_rank": routing replaced so that every token goes to
experts 0 and 1, which rank 0 holds: the worst imbalance, the other ranks receive nothing). Every rank builds the same
model and the same global batch from one seed, keeps its slice of the batch, and compares its logits
and every gradient (dense: summed over ranks; experts: its own rows, summed over the EP groups) with
the one-process run. Prints one JSON line per rank; exits 1 on a mismatch.
"""

from __future__ import annotations

import copy
import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from mixtral.config import MixtralConfig
from mixtral.model import Transformer, moe
from mixtral.parallel import ParallelConfig, init_process_group, make_layout, shard_experts


def main() -> int:
    ep, router = int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "learned"
    init_process_group(timeout_s=60)
    rank, world = dist.get_rank(), dist.get_world_size()
    layout = make_layout(ParallelConfig(ep=ep), n_experts=8)
    cfg = MixtralConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=48, n_experts=8,
                        top_k=2, vocab_size=97, max_seq_len=64)  # fmt: skip
    torch.manual_seed(0)
    ref = Transformer(cfg)
    ref.reset_parameters(std=0.2)
    if router == "one_rank":  # every token's k slots go to experts 0..k-1, all on EP rank 0

        def first_experts(logits_TE: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
            ids = torch.arange(top_k).expand(logits_TE.shape[0], top_k)
            return torch.softmax(logits_TE[:, :top_k], dim=-1), ids

        moe.route = first_experts
    model = copy.deepcopy(ref)
    b, T = 2, 6
    tokens = torch.randint(0, cfg.vocab_size, (world * b, T))
    probe = torch.randn(world * b, T, cfg.vocab_size)
    out = ref(tokens)
    (out.logits * probe).sum().backward()

    shard_experts(model, layout.ep_mesh)
    mine = slice(rank * b, (rank + 1) * b)
    got = model(tokens[mine])
    (got.logits * probe[mine]).sum().backward()

    def rel(a: torch.Tensor, b_: torch.Tensor) -> float:
        return float((a - b_).abs().max() / b_.abs().max().clamp(min=1e-30))

    worst = {"logits": rel(got.logits.detach(), out.logits[mine].detach())}
    edp = layout.mesh["dp_shard_mod_ep"].get_group()
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        want = ref_params[name].grad
        if isinstance(p, DTensor):  # experts: this rank's rows, summed over the EP groups
            g = p.grad.to_local().clone()
            dist.all_reduce(g, group=edp)
            e0 = layout.ep_rank * g.shape[0]
            want = want[e0 : e0 + g.shape[0]]
        else:  # dense: every rank's share of the gradient
            g = p.grad.clone()
            dist.all_reduce(g)
        worst[name] = rel(g, want)
    received = [layer.feed_forward.dispatcher for layer in model.layers]
    largest = max(worst.values())
    print(json.dumps({"rank": rank, "world": world, "ep": ep, "router": router, "max_rel": largest,
                      "worst": max(worst, key=worst.get), "dispatch": repr(received[0]),
                      "received": [d.last_received for d in received]}), flush=True)  # fmt: skip
    dist.destroy_process_group()
    return 0 if largest <= 1e-6 else 1


if __name__ == "__main__":
    sys.exit(main())
