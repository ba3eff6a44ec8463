"""Language-model evaluation: held-out loss and perplexity per domain, and the masked loss of SFT data."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from mixtral.data.packing import PackedStream, TokenizedDocs
from mixtral.eval.mode import eval_mode


def masked_cross_entropy(
    logits_BTV: torch.Tensor, targets_BT: torch.Tensor, mask_BT: torch.Tensor | None
) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions where mask is True (all if None), in fp32."""
    losses = F.cross_entropy(logits_BTV.float().flatten(0, 1), targets_BT.flatten().long(), reduction="none")
    if mask_BT is None:
        return losses.mean()
    mask = mask_BT.flatten().float()
    return (losses * mask).sum() / mask.sum().clamp(min=1.0)


@torch.no_grad()
def masked_loss(model: nn.Module, batches: Iterable) -> tuple[float, int]:
    """(summed cross-entropy, token count) over the `loss_mask` of batches with inputs, targets,
    positions and loss_mask (PackedBatch, SFTBatch); the model in eval mode."""
    loss_sum, tokens = 0.0, 0
    with eval_mode(model):
        for batch in batches:
            n = int(batch.loss_mask.sum())
            logits = model(batch.inputs, positions=batch.positions).logits
            loss_sum += float(masked_cross_entropy(logits, batch.targets, batch.loss_mask)) * n
            tokens += n
    return loss_sum, tokens


def evaluate_lm(
    model: nn.Module,
    valid: Mapping[str, TokenizedDocs],
    seq_len: int,
    batch_size: int = 8,
    max_batches: int | None = None,
) -> dict[str, float]:
    """Held-out loss and perplexity per domain ("<domain>/loss", "<domain>/ppl") and token-weighted overall."""
    results: dict[str, float] = {}
    total_loss, total_tokens = 0.0, 0
    for domain, docs in valid.items():
        stream = PackedStream({domain: docs}, seq_len, shuffle=False, loop=False)
        loss_sum, tokens = masked_loss(model, itertools.islice(stream.batches(batch_size), max_batches))
        results[f"{domain}/loss"] = loss_sum / max(tokens, 1)
        results[f"{domain}/ppl"] = math.exp(results[f"{domain}/loss"])
        total_loss, total_tokens = total_loss + loss_sum, total_tokens + tokens
    results["all/loss"] = total_loss / max(total_tokens, 1)
    results["all/ppl"] = math.exp(results["all/loss"])
    return results
