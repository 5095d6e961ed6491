"""Preference losses.

Two layers:

* pure functions with the shapes of the DPO authors' reference code
  (https://github.com/eric-mitchell/direct-preference-optimization):
  :func:`dpo_loss` and :func:`reward_model_loss` take one log-prob (or reward) per
  *completion* and index tensors that say which completion beats which, so K ranked
  completions of one prompt are forwarded once and give up to K(K-1)/2 pairs;
* one small ``nn.Module`` per loss, built by ``hydra.utils.instantiate(cfg.loss)``. Every loss
  takes per-*pair* summed log-probs and returns ``(losses, chosen_rewards, rejected_rewards)``,
  each of shape (P,). The training loop reduces and logs; it never checks a loss by name, it
  reads :attr:`PreferenceLoss.is_reference_free`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def dpo_loss(
    pi_logps: Tensor, ref_logps: Tensor, yw_idxs: Tensor, yl_idxs: Tensor, beta: float
) -> tuple[Tensor, Tensor]:
    """DPO loss over index pairs (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290, Eq. 7).

    ``L = -log σ(β[(log πθ(yw|x) − log πref(yw|x)) − (log πθ(yl|x) − log πref(yl|x))])``

    Args:
        pi_logps: (B,) summed policy log-probs, one per completion.
        ref_logps: (B,) summed reference log-probs of the same completions.
        yw_idxs: (T,) index into B of the preferred completion of each pair.
        yl_idxs: (T,) index into B of the dispreferred completion of each pair.
        beta: KL-penalty strength β.

    Returns:
        losses (T,) per pair, and rewards (B,) = ``β (πθ − πref)`` per completion, detached.
    """
    pi_logratios = pi_logps[yw_idxs] - pi_logps[yl_idxs]
    ref_logratios = ref_logps[yw_idxs] - ref_logps[yl_idxs]
    losses = -F.logsigmoid(beta * (pi_logratios - ref_logratios))
    rewards = beta * (pi_logps - ref_logps).detach()
    return losses, rewards


def reward_model_loss(rewards: Tensor, yw_idxs: Tensor, yl_idxs: Tensor) -> Tensor:
    """Bradley–Terry negative log-likelihood (DPO paper Eq. 2): ``-log σ(r(yw) − r(yl))``.

    Args:
        rewards: (B,) scalar reward per completion.
        yw_idxs, yl_idxs: (T,) indices into B of the preferred / dispreferred completions.

    Returns:
        (T,) per-pair losses.
    """
    return -F.logsigmoid(rewards[yw_idxs] - rewards[yl_idxs])


class PreferenceLoss(nn.Module):
    """Base class: per-pair losses from summed log-probs.

    Subclasses implement :meth:`forward` with the signature below; keyword arguments a loss does
    not need are accepted and ignored so the module can pass the same ones to every loss.
    """

    #: True when the loss never reads reference log-probs (SimPO, ORPO, SFT, ...).
    is_reference_free: bool = False

    def forward(
        self,
        policy_chosen_logps: Tensor,
        policy_rejected_logps: Tensor,
        reference_chosen_logps: Tensor | None,
        reference_rejected_logps: Tensor | None,
        **kwargs: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Args are (P,) summed log-probs; returns (losses, chosen_rewards, rejected_rewards), each (P,)."""
        raise NotImplementedError


class DPOLoss(PreferenceLoss):
    """Sigmoid DPO loss (https://arxiv.org/abs/2305.18290, Eq. 7).

    ``losses = -log σ(β ((πc − rc) − (πr − rr)))``, rewards ``β (π − r)`` (detached).

    Args:
        beta: β, the strength of the implicit KL penalty (paper: 0.1; 0.5 for IMDb).
    """

    def __init__(self, beta: float = 0.1) -> None:
        super().__init__()
        self.beta = beta

    def forward(
        self,
        policy_chosen_logps: Tensor,
        policy_rejected_logps: Tensor,
        reference_chosen_logps: Tensor | None,
        reference_rejected_logps: Tensor | None,
        **kwargs: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        chosen_logratios = policy_chosen_logps - reference_chosen_logps
        rejected_logratios = policy_rejected_logps - reference_rejected_logps
        losses = -F.logsigmoid(self.beta * (chosen_logratios - rejected_logratios))
        return losses, *implicit_rewards(self.beta, chosen_logratios, rejected_logratios)


def implicit_rewards(beta: float, chosen_logratios: Tensor, rejected_logratios: Tensor) -> tuple[Tensor, Tensor]:
    """DPO's implicit rewards ``β log(πθ/πref)`` for chosen and rejected, detached: (P,), (P,)."""
    return beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def pair_logps(logps: Tensor, chosen_idx: Tensor, rejected_idx: Tensor) -> tuple[Tensor, Tensor]:
    """Gather per-pair (chosen, rejected) values from per-completion values: (B,) -> (P,), (P,)."""
    return logps[chosen_idx], logps[rejected_idx]
