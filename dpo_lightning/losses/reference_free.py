"""Reference-free losses: SimPO, ORPO and SFT never read reference log-probs.

They say so with ``is_reference_free = True``, which the reference strategy checks
(``reference=none`` is required with them) and the module reads to skip the reference forward.
Inputs are per-pair summed log-probs (P,) and the completion token counts
``chosen_lengths``/``rejected_lengths`` (P,).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dpo_lightning.losses.base import (
    PairLogps,
    ReferenceFreeLoss,
    batch_token_nll,
    check_beta,
    check_label_smoothing,
    per_token,
    smoothed_sigmoid_loss,
)
from dpo_lightning.run.errors import check_number


class SimPOLoss(ReferenceFreeLoss):
    """SimPO (Meng et al. 2024, https://arxiv.org/abs/2405.14734, Eq. 6).
    TRL 1.16 ``trl.experimental.cpo.CPOTrainer`` with ``loss_type="simpo"`` and ``cpo_alpha=0``
    (its default ``cpo_alpha=1.0`` adds the chosen NLL; TRL 1.16's ``DPOTrainer`` has no SimPO).

    ``L = −log σ(β πc/|yw| − β πr/|yl| − γ)`` (label-smoothed with ε as in that trainer); rewards
    are the length-normalised ``β π/|y|``.

    Args:
        beta: β, the reward scale (paper: 2.0–2.5).
        gamma: γ, the target reward margin (TRL 1.16's ``simpo_gamma``, default 0.5).
        label_smoothing: ε.
    """

    def __init__(self, beta: float = 2.0, gamma: float = 0.5, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.beta = check_beta(beta)
        self.gamma = check_number("gamma", gamma, minimum=0)  # a target margin: < 0 rewards losing
        self.label_smoothing = check_label_smoothing(label_smoothing)

    def pair_losses(self, pair: PairLogps) -> Tensor:
        margin = per_token(pair.policy_chosen, pair.chosen_lengths) - per_token(
            pair.policy_rejected, pair.rejected_lengths
        )
        return smoothed_sigmoid_loss(self.beta * margin - self.gamma, self.label_smoothing)

    def rewards(self, pair: PairLogps) -> tuple[Tensor, Tensor]:
        chosen, rejected = super().rewards(pair)
        return self.beta * chosen, self.beta * rejected


class ORPOLoss(ReferenceFreeLoss):
    """ORPO (Hong et al. 2024, https://arxiv.org/abs/2403.07691, Eq. 6–7).
    TRL 1.16 ``trl.experimental.orpo.ORPOTrainer``.

    With per-token log-probs ``c = πc/|yw|``, ``r = πr/|yl|`` and odds ``odds(p) = p/(1 − p)``:
    ``L = NLL(yw) − λ log σ(log odds(e^c) − log odds(e^r))``,
    ``log odds(e^c) − log odds(e^r) = (c − r) − (log(1 − e^c) − log(1 − e^r))``. The NLL term
    averages to the token-mean cross-entropy over the batch's chosen completions (TRL 1.16's
    ``policy_nll_loss``). Rewards are ``λ c``, ``λ r``.

    Args:
        beta: λ, the odds-ratio weight (TRL 1.16's ``beta``; paper: 0.1).
    """

    def __init__(self, beta: float = 0.1) -> None:
        super().__init__()
        self.beta = check_beta(beta)

    def pair_losses(self, pair: PairLogps) -> Tensor:
        c = per_token(pair.policy_chosen, pair.chosen_lengths)
        r = per_token(pair.policy_rejected, pair.rejected_lengths)
        log_odds = (c - r) - (torch.log1p(-torch.exp(c)) - torch.log1p(-torch.exp(r)))
        nll = batch_token_nll(pair.policy_chosen, pair.chosen_lengths, pair.mean_chosen_length)
        return nll - self.beta * F.logsigmoid(log_odds)

    def rewards(self, pair: PairLogps) -> tuple[Tensor, Tensor]:
        chosen, rejected = super().rewards(pair)
        return self.beta * chosen, self.beta * rejected


class SFTLoss(ReferenceFreeLoss):
    """Supervised fine-tuning on the chosen completions: NLL of yw (TRL 1.16 ``DPOTrainer``
    ``sft`` loss type).

    ``L_i = −πc_i / mean_j |yw_j|``, whose mean over the batch is the token-mean cross-entropy
    ``−Σ πc / Σ |yw|``. The rejected completion is ignored. Rewards (for the metrics only) are the
    per-token log-probs, so ``rewards/accuracies`` still says how often the policy prefers yw.
    """

    def pair_losses(self, pair: PairLogps) -> Tensor:
        return batch_token_nll(pair.policy_chosen, pair.chosen_lengths, pair.mean_chosen_length)
