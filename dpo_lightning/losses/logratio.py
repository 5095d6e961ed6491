"""Losses on the chosen and rejected log-ratios ``a = πc − rc`` and ``b = πr − rr`` separately
(or on batch-sorted margins), rather than on DPO's single margin ``Δ = a − b``.

All inputs are per-pair summed log-probs (P,); every loss returns (P,) losses and rewards
``β a``, ``β b``. Each docstring names the TRL 1.16 ``DPOTrainer`` ``loss_type`` with the same
formula (a branch of ``DPOTrainer._compute_loss``), or says where TRL 1.16 differs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dpo_lightning.losses.base import PairLogps, ReferenceLoss, check_label_smoothing, smoothed_sigmoid_loss


class NCAPairLoss(ReferenceLoss):
    """NCA, pairwise (Chen et al. 2024, https://arxiv.org/abs/2402.05369, Eq. 10). TRL 1.16 ``nca_pair``.

    With ``c = β a``, ``r = β b``: ``L = −log σ(c) − ½ log σ(−c) − ½ log σ(−r)``; optimises
    absolute likelihoods, so the chosen log-prob is pushed up rather than only the margin.
    """

    def pair_losses(self, pair: PairLogps) -> Tensor:
        c, r = self.beta * pair.chosen_logratios, self.beta * pair.rejected_logratios
        return -F.logsigmoid(c) - 0.5 * F.logsigmoid(-c) - 0.5 * F.logsigmoid(-r)


class BCOPairLoss(ReferenceLoss):
    """BCO, pairwise (Jung et al. 2024, https://arxiv.org/abs/2404.04656, Eq. 11), with the
    paper's reward shift.

    A binary classifier of chosen vs rejected rewards with a shift δ:
    ``L = −log σ(β a − δ) − log σ(−(β b − δ))``, where δ is the running mean, over the training
    batches seen so far, of each batch's mean reward ``mean(β a ∪ β b)`` (updated before use,
    in training mode only; kept per process and in checkpoints).

    TRL 1.16 ``bco_pair`` has no shift: ``L = −log σ(β a) − log σ(−β b)`` (δ = 0). The two agree
    only while δ is 0 (a fresh loss in eval mode); after the first training batch they differ.
    """

    def __init__(self, beta: float = 0.1) -> None:
        super().__init__(beta)
        self.register_buffer("running_mean", torch.zeros(()))
        self.register_buffer("num_batches", torch.zeros((), dtype=torch.long))

    def pair_losses(self, pair: PairLogps) -> Tensor:
        c, r = self.beta * pair.chosen_logratios, self.beta * pair.rejected_logratios
        if self.training:
            batch_mean = torch.cat([c, r]).mean().detach().to(self.running_mean)
            self.num_batches += 1
            self.running_mean += (batch_mean - self.running_mean) / self.num_batches
        delta = self.running_mean
        return -F.logsigmoid(c - delta) - F.logsigmoid(-(r - delta))


class SPPOHardLoss(ReferenceLoss):
    """SPPO with hard labels (Wu et al. 2024, https://arxiv.org/abs/2405.00675, Eq. 4.7 with
    P(yw ≻ yl) = 1). TRL 1.16 ``sppo_hard``.

    ``L = (a − 1/(2β))² + (b + 1/(2β))²``: regresses each log-ratio to ±1/(2β).
    """

    def pair_losses(self, pair: PairLogps) -> Tensor:
        half = 0.5 / self.beta
        return (pair.chosen_logratios - half) ** 2 + (pair.rejected_logratios + half) ** 2


class AOTLoss(ReferenceLoss):
    """AOT, paired (Melnyk et al. 2024, https://arxiv.org/abs/2406.05882). TRL 1.16 ``aot``.

    Distributional alignment by 1-D optimal transport: sort the batch's policy margins ``πc − πr``
    and reference margins ``rc − rr`` separately, then
    ``L = −(1 − ε) log σ(β d) − ε log σ(−β d)``, ``d = sorted(πc − πr) − sorted(rc − rr)``.
    Pair i's loss depends on the whole batch.
    """

    batch_coupled = True

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0) -> None:
        super().__init__(beta)
        self.label_smoothing = check_label_smoothing(label_smoothing)

    def pair_losses(self, pair: PairLogps) -> Tensor:
        policy = torch.sort(pair.policy_chosen - pair.policy_rejected, dim=0).values
        reference = torch.sort(pair.reference_chosen - pair.reference_rejected, dim=0).values
        return smoothed_sigmoid_loss(self.beta * (policy - reference), self.label_smoothing)


class AOTUnpairedLoss(AOTLoss):
    """AOT, unpaired (Melnyk et al. 2024, https://arxiv.org/abs/2406.05882). TRL 1.16 ``aot_unpaired``
    (``aot_pair`` in older releases).

    Sorts chosen and rejected log-ratios independently:
    ``L = −(1 − ε) log σ(β d) − ε log σ(−β d)``, ``d = sorted(a) − sorted(b)``, for data whose
    chosen and rejected completions are not matched pairs.
    """

    def pair_losses(self, pair: PairLogps) -> Tensor:
        chosen = torch.sort(pair.chosen_logratios, dim=0).values
        rejected = torch.sort(pair.rejected_logratios, dim=0).values
        return smoothed_sigmoid_loss(self.beta * (chosen - rejected), self.label_smoothing)


class APOZeroLoss(ReferenceLoss):
    """APO-zero (D'Oosterlinck et al. 2024, https://arxiv.org/abs/2408.06266, Eq. 7).
    TRL 1.16 ``apo_zero``.

    ``L = (1 − σ(β a)) + σ(β b)``: raise the chosen likelihood, lower the rejected one; for chosen
    completions better than the model's own outputs.
    """

    def pair_losses(self, pair: PairLogps) -> Tensor:
        return (
            1
            - torch.sigmoid(self.beta * pair.chosen_logratios)
            + torch.sigmoid(self.beta * pair.rejected_logratios)
        )


class APODownLoss(ReferenceLoss):
    """APO-down (D'Oosterlinck et al. 2024, https://arxiv.org/abs/2408.06266, Eq. 8).
    TRL 1.16 ``apo_down``.

    ``L = σ(β a) + (1 − σ(β (a − b)))``: lower both likelihoods, the rejected one more; for chosen
    completions worse than the model's own outputs.
    """

    def pair_losses(self, pair: PairLogps) -> Tensor:
        return torch.sigmoid(self.beta * pair.chosen_logratios) + 1 - torch.sigmoid(self.beta * pair.logits)
