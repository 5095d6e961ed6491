"""DPO and the losses that reshape its margin ``Δ = (πc − πr) − (rc − rr)``.

All inputs are per-pair **summed** log-probs of shape (P,) (``πc`` = log πθ(yw|x), ``rc`` =
log πref(yw|x), likewise ``πr``/``rr`` for the rejected completion); every loss returns (P,)
per-pair losses, and rewards ``β (π − r)``. Formulas match TRL 1.16's ``DPOTrainer.dpo_loss`` for the
loss type named in each docstring.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from dpo_lightning.losses.base import (
    PairLogps,
    ReferenceLoss,
    batch_token_nll,
    check_label_smoothing,
    require_lengths,
    smoothed_sigmoid_loss,
)
from dpo_lightning.run.errors import check_number


class DPOLoss(ReferenceLoss):
    """Sigmoid DPO (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290, Eq. 7). TRL 1.16 ``sigmoid``.

    ``L = −log σ(β Δ)``.

    Args:
        beta: β, the strength of the implicit KL penalty (paper: 0.1; 0.5 for IMDb).
    """

    def pair_losses(self, pair: PairLogps) -> Tensor:
        return -F.logsigmoid(self.beta * pair.logits)


class ConservativeDPOLoss(ReferenceLoss):
    """cDPO: DPO with label smoothing ε (Mitchell 2023, https://ericmitchell.ai/cdpo.pdf).
    TRL 1.16 ``sigmoid`` with ``label_smoothing``.

    ``L = −(1 − ε) log σ(β Δ) − ε log σ(−β Δ)``: the expected DPO loss when each preference label
    is flipped with probability ε.
    """

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.1) -> None:
        super().__init__(beta)
        self.label_smoothing = check_label_smoothing(label_smoothing)

    def pair_losses(self, pair: PairLogps) -> Tensor:
        return smoothed_sigmoid_loss(self.beta * pair.logits, self.label_smoothing)


class RobustDPOLoss(ReferenceLoss):
    """Robust DPO (Chowdhury et al. 2024, https://arxiv.org/abs/2403.00409, Eq. 21). TRL 1.16 ``robust``.

    ``L = [−(1 − ε) log σ(β Δ) + ε log σ(−β Δ)] / (1 − 2ε)``: an unbiased estimate of the
    clean-label loss under label-flip noise ε (ε < 1/2).
    """

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.1) -> None:
        super().__init__(beta)
        self.label_smoothing = check_label_smoothing(label_smoothing)  # 1 − 2ε divides

    def pair_losses(self, pair: PairLogps) -> Tensor:
        z, eps = self.beta * pair.logits, self.label_smoothing
        return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


class HingeLoss(ReferenceLoss):
    """Hinge loss on the DPO margin (SLiC, Zhao et al. 2023, https://arxiv.org/abs/2305.10425).
    TRL 1.16 ``hinge``.

    ``L = max(0, 1 − β Δ)``; here β plays the role of 1/δ, the inverse margin.
    """

    def pair_losses(self, pair: PairLogps) -> Tensor:
        return torch.relu(1 - self.beta * pair.logits)


class IPOLoss(ReferenceLoss):
    """IPO (Azar et al. 2023, https://arxiv.org/abs/2310.12036, Eq. 17). TRL 1.16 ``ipo``.

    ``L = (Δ̄ − 1/(2β))²`` with length-averaged log-ratios
    ``Δ̄ = (πc − rc)/|yw| − (πr − rr)/|yl|`` (per-token averaging confirmed by IPO's authors; it
    makes β comparable across completion lengths). β is the paper's τ. Needs
    ``chosen_lengths``/``rejected_lengths``.
    """

    def pair_losses(self, pair: PairLogps) -> Tensor:
        require_lengths("IPOLoss", chosen_lengths=pair.chosen_lengths, rejected_lengths=pair.rejected_lengths)
        return (pair.normalized_logits - 1 / (2 * self.beta)) ** 2


class ExoPairLoss(ReferenceLoss):
    """EXO, pairwise (Ji et al. 2024, https://arxiv.org/abs/2402.00856, Eq. 16). TRL 1.16 ``exo_pair``.

    The reverse KL from the policy's preference distribution to the ε-smoothed label:
    ``L = σ(βΔ) (log σ(βΔ) − log(1 − ε)) + σ(−βΔ) (log σ(−βΔ) − log ε)``.

    Args:
        label_smoothing: ε > 0 (TRL 1.16 replaces 0 by 1e-3; here 0 is refused).
    """

    def __init__(self, beta: float = 0.1, label_smoothing: float = 1e-3) -> None:
        super().__init__(beta)
        self.label_smoothing = check_label_smoothing(label_smoothing, above=0, below=1)  # log ε

    def pair_losses(self, pair: PairLogps) -> Tensor:
        z, eps = self.beta * pair.logits, self.label_smoothing
        return torch.sigmoid(z) * (F.logsigmoid(z) - math.log(1 - eps)) + torch.sigmoid(-z) * (
            F.logsigmoid(-z) - math.log(eps)
        )


class DiscoPOPLoss(ReferenceLoss):
    """DiscoPOP / log-ratio modulated loss (Chan Lu et al. 2024, https://arxiv.org/abs/2406.08414,
    Eq. 5). TRL 1.16 ``discopop``.

    With ``z = βΔ`` and ``m = σ(z/τ)``: ``L = (1 − m)(−log σ(z)) + m exp(−z)``.

    Args:
        tau: τ, the temperature of the mixing coefficient (paper: 0.05).
    """

    def __init__(self, beta: float = 0.05, tau: float = 0.05) -> None:
        super().__init__(beta)
        self.tau = check_number("tau", tau, above=0)  # divides the margin

    def pair_losses(self, pair: PairLogps) -> Tensor:
        z = self.beta * pair.logits
        mod = torch.sigmoid(z / self.tau)
        return -F.logsigmoid(z) * (1 - mod) + torch.exp(-z) * mod


class SigmoidNormLoss(ReferenceLoss):
    """Length-normalised sigmoid DPO (as in SimPO's normalisation, https://arxiv.org/abs/2405.14734,
    but keeping the reference). TRL 1.16 ``sigmoid_norm``.

    ``L = −log σ(β [(πc − rc)/|yw| − (πr − rr)/|yl|])``. Needs completion lengths.
    """

    def pair_losses(self, pair: PairLogps) -> Tensor:
        require_lengths(
            "SigmoidNormLoss",
            chosen_lengths=pair.chosen_lengths,
            rejected_lengths=pair.rejected_lengths,
        )
        return -F.logsigmoid(self.beta * pair.normalized_logits)


class RPOLoss(ReferenceLoss):
    """RPO: DPO plus α × the NLL of the chosen completion (Pang et al. 2024,
    https://arxiv.org/abs/2404.19733, Eq. 3). TRL 1.16 ``sigmoid`` with ``rpo_alpha``.

    ``L_i = −log σ(β Δ_i) + α · (−πc_i / mean_j |yw_j|)``: the NLL term averages to the token-mean
    cross-entropy over the batch's chosen completions, as TRL 1.16's ``nll_loss``. Needs
    ``chosen_lengths``.

    Args:
        alpha: α, the NLL weight (paper: 1.0).
    """

    def __init__(self, beta: float = 0.1, alpha: float = 1.0) -> None:
        super().__init__(beta)
        self.alpha = check_number("alpha", alpha, minimum=0)

    def pair_losses(self, pair: PairLogps) -> Tensor:
        require_lengths("RPOLoss", chosen_lengths=pair.chosen_lengths)
        nll = batch_token_nll(pair.policy_chosen, pair.chosen_lengths)
        return -F.logsigmoid(self.beta * pair.logits) + self.alpha * nll
