"""Language-model evaluation: held-out loss and perplexity per domain, and the masked loss of SFT data.

Batches go to the model's device (`to_device`), so evaluation runs wherever the model is.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mixtral.data.packing import PackedStream, TokenizedDocs
from mixtral.eval.mode import eval_mode


def to_device(batch: Any, device: torch.device) -> Any:
    """A batch (a tensor, or a dataclass of tensors such as PackedBatch or SFTBatch) on `device`;
    returned as it is when everything is already there."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        moves = {
            f.name: value.to(device)
            for f in dataclasses.fields(batch)
            if isinstance(value := getattr(batch, f.name), torch.Tensor) and value.device != device
        }
        return dataclasses.replace(batch, **moves) if moves else batch
    return batch


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
    device = next(model.parameters()).device
    with eval_mode(model):
        for batch in batches:
            batch = to_device(batch, device)
            n = int(batch.loss_mask.sum())
            logits = model(batch.inputs, positions=batch.positions).logits
            loss_sum += float(masked_cross_entropy(logits, batch.targets, batch.loss_mask)) * n
            tokens += n
    return loss_sum, tokens


def _limited(stream: PackedStream, batch_size: int, max_sequences: int | None, bar) -> Iterator:
    """The stream's batches until `max_sequences` sequences (all if None); the last batch may be smaller."""
    left = max_sequences
    while left is None or left > 0:
        batch = stream.next_batch(batch_size if left is None else min(batch_size, left))
        if batch is None:
            return
        if left is not None:
            left -= batch.inputs.shape[0]
        bar.update(batch.inputs.shape[0])
        yield batch


def evaluate_lm(
    model: nn.Module,
    valid: Mapping[str, TokenizedDocs],
    seq_len: int,
    batch_size: int = 8,
    max_batches: int | None = None,
    max_tokens: int | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Held-out loss and perplexity per domain ("<domain>/loss", "<domain>/ppl") and token-weighted overall.

    Each domain is read from its start, up to `max_batches` batches and, with `max_tokens` (None or
    0: no limit), up to its even share of `max_tokens` (at least one sequence per domain), so the
    same call always reads the same tokens. `progress` shows a bar over the sequences.
    """
    from tqdm.auto import tqdm

    cap = None
    if max_tokens:
        cap = max(1, math.ceil(max_tokens / max(len(valid), 1) / seq_len))
    if max_batches is not None:
        cap = min(cap if cap is not None else max_batches * batch_size, max_batches * batch_size)
    total = cap * len(valid) if cap is not None else None
    results: dict[str, float] = {}
    total_loss, total_tokens = 0.0, 0
    with tqdm(total=total, desc="eval", unit="seq", disable=not progress, leave=False) as bar:
        for domain, docs in valid.items():
            stream = PackedStream({domain: docs}, seq_len, shuffle=False, loop=False)
            loss_sum, tokens = masked_loss(model, _limited(stream, batch_size, cap, bar))
            results[f"{domain}/loss"] = loss_sum / max(tokens, 1)
            results[f"{domain}/ppl"] = math.exp(results[f"{domain}/loss"])
            total_loss, total_tokens = total_loss + loss_sum, total_tokens + tokens
    results["all/loss"] = total_loss / max(total_tokens, 1)
    results["all/ppl"] = math.exp(results["all/loss"])
    return results
