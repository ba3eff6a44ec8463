"""Instruct objectives for the shared loop: SFT on assistant tokens, DPO against a frozen reference.

- SFT is `pretrain.lm_objective` on `SFTBatch`es, whose `loss_mask` is True only where the target
  is an assistant token (prompt, system and earlier user turns carry no loss). The router losses
  still see every real token: the loop adds the load-balancing and z-losses whatever the objective.
- DPO (Rafailov et al. 2023, eq. 7) with label smoothing ε (the "conservative DPO" of
  Mitchell 2023, trl's `label_smoothing`):
      h = β · [(log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))]
      loss = −(1 − ε) · log σ(h) − ε · log σ(−h)
  with sequence log-probabilities summed over response tokens. Implicit rewards are
  β · (log π − log π_ref) for the chosen and rejected responses; the log reports their means,
  the reward accuracy (share of pairs with chosen reward > rejected) and the margin.
- The reference is either a frozen model run beside the policy, or (the default, half the memory)
  its log-probabilities precomputed in one pass over the examples the run will use (the run
  entry point caches them in the run directory), looked up by example index.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mixtral.eval.lm import to_device
from mixtral.eval.mode import eval_mode
from mixtral.train.loop import ObjectiveOutput
from mixtral.train.pretrain import lm_objective

sft_objective = lm_objective  # the loss mask of an SFTBatch already keeps assistant tokens only


def sequence_logprobs(
    logits_BTV: torch.Tensor, targets_BT: torch.Tensor, mask_BT: torch.Tensor
) -> torch.Tensor:
    """Sum over masked positions of log p(target): `[B]` in fp32."""
    B, T, V = logits_BTV.shape
    nll = F.cross_entropy(logits_BTV.reshape(B * T, V).float(), targets_BT.reshape(B * T), reduction="none")
    return -(nll.view(B, T) * mask_BT).sum(-1)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean DPO loss over pairs (module docstring) and the reward metrics; inputs are `[B]` log-probs."""
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen = beta * (policy_chosen - ref_chosen)
    rejected = beta * (policy_rejected - ref_rejected)
    h = chosen - rejected
    losses = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    metrics = {
        "reward_chosen": float(chosen.detach().mean()),
        "reward_rejected": float(rejected.detach().mean()),
        "reward_accuracy": float((chosen > rejected).float().mean()),
        "reward_margin": float(h.detach().mean()),
    }
    return losses.mean(), metrics


def pair_logprobs(model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen [B], rejected [B], router_logits) of a PreferenceBatch: one forward over its 2B rows
    (on the model's device)."""
    batch = to_device(batch, next(model.parameters()).device)
    out = model(batch.inputs, positions=batch.positions)
    logp = sequence_logprobs(out.logits, batch.targets, batch.loss_mask)
    B = batch.index.numel()
    return logp[:B], logp[B:], out.router_logits


@torch.no_grad()
def reference_logprobs(
    model: nn.Module, stream, batch_size: int = 8, indices=None, progress: bool = False
) -> torch.Tensor:
    """`[N, 2]` (chosen, rejected) log-probs (CPU, fp32) of the examples of a PreferenceStream, in one
    pass: every example, or only those of `indices` (the other rows are NaN)."""
    from tqdm.auto import tqdm

    wanted = sorted(set(range(len(stream.examples)) if indices is None else map(int, indices)))
    out = torch.full((len(stream.examples), 2), float("nan"))
    with eval_mode(model), tqdm(total=len(wanted), desc="reference", unit="pair", disable=not progress,
                                leave=False) as bar:  # fmt: skip
        for batch in stream.iter_batches(batch_size, wanted):
            chosen, rejected, _ = pair_logprobs(model, batch)
            out[batch.index, 0], out[batch.index, 1] = chosen.float().cpu(), rejected.float().cpu()
            bar.update(batch.index.numel())
    if torch.isnan(out[wanted]).any():
        raise RuntimeError("reference_logprobs: some examples were never visited")
    return out


class DPOObjective:
    """DPO for `train()`: the reference is a `[N, 2]` tensor from `reference_logprobs` or a frozen model."""

    def __init__(
        self, reference: torch.Tensor | nn.Module, beta: float = 0.1, label_smoothing: float = 0.0
    ) -> None:
        dpo_loss(
            torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), beta, label_smoothing
        )  # validate
        if isinstance(reference, nn.Module):
            reference.eval().requires_grad_(False)
        self.reference, self.beta, self.label_smoothing = reference, beta, label_smoothing

    def reference_for(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(self.reference, nn.Module):
            with torch.no_grad():
                chosen, rejected, _ = pair_logprobs(self.reference, batch)
            return chosen, rejected
        index = batch.index.cpu()
        ref = self.reference[index]
        if torch.isnan(ref).any():
            missing = index[torch.isnan(ref).any(-1)].tolist()
            raise RuntimeError(f"no precomputed reference log-probabilities for examples {missing[:5]}")
        ref = ref.to(batch.inputs.device)
        return ref[:, 0], ref[:, 1]

    def __call__(self, model: nn.Module, batch) -> ObjectiveOutput:
        batch = to_device(batch, next(model.parameters()).device)
        chosen, rejected, router_logits = pair_logprobs(model, batch)
        ref_chosen, ref_rejected = self.reference_for(batch)
        loss, metrics = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.beta, self.label_smoothing)
        real = batch.positions >= 0
        return ObjectiveOutput(
            loss,
            router_logits,
            real,
            int(real.sum()),
            metrics,
            int(batch.loss_mask.sum()),
            batch.index.numel(),
        )


@torch.no_grad()
def evaluate_dpo(
    model: nn.Module, objective: DPOObjective, stream, batch_size: int = 8, progress: bool = False
) -> dict[str, float]:
    """Held-out DPO loss and reward metrics, example-weighted, over a PreferenceStream once."""
    from tqdm.auto import tqdm

    sums: dict[str, float] = {}
    n = 0
    batches = tqdm(stream.iter_batches(batch_size), total=-(-len(stream.examples) // batch_size), desc="eval",
                   unit="batch", disable=not progress, leave=False)  # fmt: skip
    with eval_mode(model):
        for batch in batches:
            out = objective(model, batch)
            b = batch.index.numel()
            for key, value in {"loss": float(out.loss), **out.metrics}.items():
                sums[key] = sums.get(key, 0.0) + value * b
            n += b
    return {key: value / max(n, 1) for key, value in sums.items()}
