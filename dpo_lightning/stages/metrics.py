"""Per-batch preference metrics with TRL 1.16's names, so dashboards carry over."""

from __future__ import annotations

import torch
from torch import Tensor

from dpo_lightning.engine import CompletionStats


def preference_metrics(
    losses: Tensor,
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    chosen_logits: Tensor,
    rejected_logits: Tensor,
) -> dict[str, Tensor]:
    """Batch means of the logged quantities; every input is (P,), one value per pair.

    ``grad_weight`` is the mean of ``σ(r̂(yl) − r̂(yw))``, the per-example weight of the DPO
    gradient (paper §4, "What does the DPO update do?"): high when the implicit reward model
    orders the pair wrongly.
    """
    chosen_rewards, rejected_rewards = chosen_rewards.float(), rejected_rewards.float()
    return {
        "loss": losses.detach().mean(),
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": chosen_logps.detach().mean(),
        "logps/rejected": rejected_logps.detach().mean(),
        "logits/chosen": chosen_logits.detach().mean(),
        "logits/rejected": rejected_logits.detach().mean(),
        "grad_weight": torch.sigmoid(rejected_rewards - chosen_rewards).mean(),
    }


def token_metrics(policy: CompletionStats, chosen_idx: Tensor) -> dict[str, Tensor]:
    """TRL 1.16's token-level metrics of the policy, token-weighted over the batch.

    ``entropy``: mean entropy of the next-token distribution over every completion token
    (chosen and rejected); ``mean_token_accuracy``: share of the chosen completions' tokens whose
    label is the argmax. Both come from the forward's own logits (``token_metrics=True``); a
    completion chosen in several pairs (K-wise rankings) counts once. Empty when the engine gave
    no token metrics.
    """
    if policy.entropy is None or policy.top1 is None:
        return {}
    chosen = torch.unique(chosen_idx)
    return {
        "entropy": policy.entropy.sum() / policy.lengths.sum().clamp(min=1.0),
        "mean_token_accuracy": policy.top1[chosen].sum() / policy.lengths[chosen].sum().clamp(min=1.0),
    }
