"""Per-pair loss weights as wrappers around any pairwise loss (``weighting=wpo``)."""

from __future__ import annotations

import torch
from torch import Tensor

from dpo_lightning.losses.base import PreferenceLoss


class WPOWeighting(PreferenceLoss):
    """WPO: weight each pair by how likely the policy is to produce it (Zhou et al. 2024,
    https://arxiv.org/abs/2406.11827, Eq. 2 with the paper's sampled weight alignment).
    TRL 1.16 ``use_weighting=True``.

    ``L_i = w(x, yw_i) · w(x, yl_i) · L_inner,i`` with the detached, length-normalised,
    aligned probability
    ``w(x, y) = exp((1/|y|) Σ_t [log πθ(y_t|x, y<t) − log Σ_v πθ(v|x, y<t)²])``.
    The alignment term makes a completion the policy would sample weigh ~1 however peaked its
    distribution is. As in TRL 1.16 the weights are not clamped nor renormalised over the batch
    (older TRL releases clamped the product at 1).

    Reads the policy's summed log-probs and lengths (given to every loss) and the keyword inputs
    ``chosen_log_sum_sq_probs`` / ``rejected_log_sum_sq_probs`` (P,): ``Σ_t log Σ_v πθ(v)²``
    (the stage computes them because :attr:`extra_inputs` names them). Rewards are the inner
    loss's.

    Args:
        loss: the pairwise loss to weight (any of this package's but one whose pairs depend on the
            whole batch, such as AOT: TRL 1.16 refuses those too).
    """

    def __init__(self, loss: PreferenceLoss) -> None:
        super().__init__()
        if not isinstance(loss, PreferenceLoss) or loss.unpaired:
            raise ValueError(f"weighting=wpo weights pairs; {type(loss).__name__} is not a pairwise loss")
        if loss.batch_coupled:
            raise ValueError(
                f"weighting=wpo cannot weight {type(loss).__name__}: its pair losses depend on the "
                "whole batch (it sorts the batch), so a weight per pair has no pair to attach to"
            )
        self.loss = loss

    @property
    def is_reference_free(self) -> bool:
        return self.loss.is_reference_free

    @property
    def extra_inputs(self) -> frozenset[str]:
        return self.loss.extra_inputs | {"log_sum_sq_probs"}

    def forward(
        self,
        policy_chosen_logps: Tensor,
        policy_rejected_logps: Tensor,
        reference_chosen_logps: Tensor | None,
        reference_rejected_logps: Tensor | None,
        **kwargs: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        names = ("chosen_lengths", "rejected_lengths", "chosen_log_sum_sq_probs", "rejected_log_sum_sq_probs")
        missing = [k for k in names if kwargs.get(k) is None]
        if missing:
            raise ValueError(f"WPOWeighting needs the keyword argument(s) {missing}")
        losses, chosen_rewards, rejected_rewards = self.loss(
            policy_chosen_logps,
            policy_rejected_logps,
            reference_chosen_logps,
            reference_rejected_logps,
            **kwargs,
        )
        weights = wpo_weight(policy_chosen_logps, kwargs["chosen_log_sum_sq_probs"], kwargs["chosen_lengths"])
        weights = weights * wpo_weight(
            policy_rejected_logps, kwargs["rejected_log_sum_sq_probs"], kwargs["rejected_lengths"]
        )
        return losses * weights.to(losses.dtype), chosen_rewards, rejected_rewards


def wpo_weight(logps: Tensor, log_sum_sq_probs: Tensor, lengths: Tensor) -> Tensor:
    """``exp((Σ log p − Σ log Σ p²) / |y|)`` per completion, detached: (P,) ×3 -> (P,)."""
    with torch.no_grad():
        return torch.exp((logps - log_sum_sq_probs) / lengths.clamp(min=1.0))
