"""Pretraining: the next-token objective on packed documents and per-domain held-out evaluation."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from ..data.packing import PackedBatch, PackedStream, TokenizedDocs
from .loop import ObjectiveOutput
from .losses import masked_cross_entropy


def lm_objective(model: nn.Module, batch: PackedBatch) -> ObjectiveOutput:
    """Cross-entropy on next tokens; attention and loss stay inside documents (positions restart at 0)."""
    out = model(batch.inputs, positions=batch.positions)
    loss = masked_cross_entropy(out.logits, batch.targets, batch.loss_mask)
    real = batch.positions >= 0  # padding takes no part in the router losses
    return ObjectiveOutput(loss, out.router_logits, real, int(batch.loss_mask.sum()))


@torch.no_grad()
def evaluate_lm(
    model: nn.Module,
    valid: Mapping[str, TokenizedDocs],
    seq_len: int,
    batch_size: int = 8,
    max_batches: int | None = None,
) -> dict[str, float]:
    """Held-out loss and perplexity per domain ("<domain>/loss", "<domain>/ppl") and token-weighted overall."""
    model.eval()
    results: dict[str, float] = {}
    total_loss, total_tokens = 0.0, 0
    for domain, docs in valid.items():
        stream = PackedStream({domain: docs}, seq_len, shuffle=False, loop=False)
        loss_sum, tokens = 0.0, 0
        for i, batch in enumerate(stream.batches(batch_size)):
            if max_batches is not None and i >= max_batches:
                break
            n = int(batch.loss_mask.sum())
            loss_sum += float(masked_cross_entropy(model(batch.inputs, positions=batch.positions).logits,
                                                   batch.targets, batch.loss_mask)) * n  # fmt: skip
            tokens += n
        results[f"{domain}/loss"] = loss_sum / max(tokens, 1)
        results[f"{domain}/ppl"] = math.exp(results[f"{domain}/loss"])
        total_loss, total_tokens = total_loss + loss_sum, total_tokens + tokens
    results["all/loss"] = total_loss / max(total_tokens, 1)
    results["all/ppl"] = math.exp(results["all/loss"])
    return results
