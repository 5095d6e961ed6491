"""Per-batch preference metrics with TRL 1.16's names *and* definitions, so dashboards carry over."""

from __future__ import annotations

import torch
from torch import Tensor

from dpo_lightning.engine import CompletionStats


def token_mean_logits(mean_logits: Tensor, lengths: Tensor) -> Tensor:
    """TRL 1.16's ``logits/chosen`` (``logits/rejected``): the raw logit averaged over the
    vocabulary and over *every completion token of the batch* (token-weighted), not the mean of
    per-sequence means.

    Args:
        mean_logits: (P,) each completion's mean logit over its tokens and the vocabulary
            (``CompletionStats.mean_logits``).
        lengths: (P,) completion token counts.

    Returns:
        ``Σ_i mean_logits_i · |y_i| / Σ_i |y_i|`` (a scalar; 0 when the batch has no completion
        token, as TRL 1.16). Worked example: completions of 1 and 3 tokens whose per-token mean
        logits are [4] and [0, 0, 0] give (4 + 0 + 0 + 0) / 4 = 1, where the mean of the two
        sequence means would give (4 + 0) / 2 = 2.
    """
    lengths = lengths.detach().float()
    return (mean_logits.detach().float() * lengths).sum() / lengths.sum().clamp(min=1.0)


def preference_metrics(
    losses: Tensor,
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    chosen_logits: Tensor,
    rejected_logits: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
) -> dict[str, Tensor]:
    """The logged metrics of one batch; every input is (P,), one value per pair.

    As TRL 1.16's ``DPOTrainer``: ``rewards/*``, ``logps/*`` are means over pairs;
    ``logits/*`` are token-weighted (:func:`token_mean_logits`, from the per-completion mean
    logits ``chosen_logits``/``rejected_logits`` and the token counts ``*_lengths``). Where the
    aggregation differs: a training step under data parallelism logs the mean of the ranks'
    values (``sync_dist``), where TRL 1.16 pools the tokens of all ranks first (equal when the
    ranks hold as many completion tokens); a validation logs Lightning's pair-weighted mean over
    its batches, where TRL 1.16 takes the plain mean of per-batch values.

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
        "logits/chosen": token_mean_logits(chosen_logits, chosen_lengths),
        "logits/rejected": token_mean_logits(rejected_logits, rejected_lengths),
        "grad_weight": torch.sigmoid(rejected_rewards - chosen_rewards).mean(),
    }


def token_metrics(policy: CompletionStats, chosen_idx: Tensor) -> dict[str, Tensor]:
    """TRL 1.16's token-level metrics of the policy, token-weighted over the batch.

    ``entropy``: mean entropy of the next-token distribution over every completion token
    (chosen and rejected); ``mean_token_accuracy``: share of the chosen completions' tokens whose
    label is the argmax. Both come from the forward's own logits (the ``"token_metrics"`` output); a
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
