"""Pretraining: the next-token objective on packed documents (evaluation: `mixtral.eval.lm`)."""

from __future__ import annotations

from torch import nn

from mixtral.data.packing import PackedBatch
from mixtral.eval.lm import masked_cross_entropy
from mixtral.train.loop import ObjectiveOutput


def lm_objective(model: nn.Module, batch: PackedBatch) -> ObjectiveOutput:
    """Cross-entropy on next tokens; attention and loss stay inside documents (positions restart at 0)."""
    out = model(batch.inputs, positions=batch.positions)
    loss = masked_cross_entropy(out.logits, batch.targets, batch.loss_mask)
    real = batch.positions >= 0  # padding takes no part in the router losses
    return ObjectiveOutput(
        loss, out.router_logits, real, int(real.sum()), loss_tokens=int(batch.loss_mask.sum())
    )
