"""DPO and the losses that reshape its margin ``Δ = (πc − πr) − (rc − rr)``.

All inputs are per-pair **summed** log-probs of shape (P,) (``πc`` = log πθ(yw|x), ``rc`` =
log πref(yw|x), likewise ``πr``/``rr`` for the rejected completion); every loss returns (P,)
per-pair losses, and rewards ``β (π − r)``. Each docstring names the TRL 1.16 ``DPOTrainer``
``loss_type`` with the same formula (a branch of ``DPOTrainer._compute_loss``, with the default
``f_divergence_type="reverse_kl"``), or says where TRL 1.16 differs.
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
    length_desensitized,
    require_lengths,
    smoothed_sigmoid_loss,
)
from dpo_lightning.run.errors import check_choice, check_number


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

    ``L = −(1 − ε) log σ(β Δ) − ε log σ(−β Δ)``: the expected DPO loss when each preference label
    is flipped with probability ε.

    No TRL 1.16 equivalent: its ``sigmoid`` ignores ``label_smoothing`` (which TRL 1.16 reads only
    for ``robust``, ``exo_pair``, ``aot`` and ``aot_unpaired``); older TRL releases applied it in
    ``sigmoid`` as here. TRL 1.16's ``robust`` is a different loss (:class:`RobustDPOLoss`).
    """

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.1) -> None:
        super().__init__(beta)
        self.label_smoothing = check_label_smoothing(label_smoothing)

    def pair_losses(self, pair: PairLogps) -> Tensor:
        return smoothed_sigmoid_loss(self.beta * pair.logits, self.label_smoothing)


class RobustDPOLoss(ReferenceLoss):
    """Robust DPO (Chowdhury et al. 2024, https://arxiv.org/abs/2403.00409, Eq. 21). TRL 1.16 ``robust``.

    ``L = [−(1 − ε) log σ(β Δ) + ε log σ(−β Δ)] / (1 − 2ε)``: an unbiased estimate of the
    clean-label loss under label-flip noise ε (ε < 1/2). ε outside [0, 1/2) is refused here;
    TRL 1.16 only logs a warning and trains on.
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
        label_smoothing: ε in (0, 1), refused otherwise: ``log ε`` is −inf at 0. TRL 1.16 refuses
            ε = 0 too (a ValueError recommending 1e-3; its default ε is 0, so ``exo_pair`` needs it
            set), but lets ε ≥ 1 through to NaN losses.
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
    https://arxiv.org/abs/2404.19733, Eq. 3).

    ``L_i = −log σ(β Δ_i) + α · (−πc_i / mean_j |yw_j|)``: the NLL term averages to the token-mean
    cross-entropy over the batch's chosen completions. TRL 1.16 has no ``rpo_alpha`` (older TRL
    releases had); its equivalent is ``loss_type=["sigmoid", "sft"]`` with
    ``loss_weights=[1.0, α]`` (its ``sft`` branch is that token-mean NLL), equal in the batch mean.
    Needs ``chosen_lengths``.

    Args:
        alpha: α, the NLL weight (paper: 1.0).
    """

    def __init__(self, beta: float = 0.1, alpha: float = 1.0) -> None:
        super().__init__(beta)
        self.alpha = check_number("alpha", alpha, minimum=0)

    def pair_losses(self, pair: PairLogps) -> Tensor:
        require_lengths("RPOLoss", chosen_lengths=pair.chosen_lengths)
        nll = batch_token_nll(pair.policy_chosen, pair.chosen_lengths, pair.mean_chosen_length)
        return -F.logsigmoid(self.beta * pair.logits) + self.alpha * nll


def _reverse_kl(logratio: Tensor, alpha: float) -> Tensor:
    return logratio  # f(u) = u log u: f'(u) = log u + 1 (the constant cancels in Δ)


def _forward_kl(logratio: Tensor, alpha: float) -> Tensor:
    return 1 - torch.exp(-logratio)  # f(u) = −log u: f'(u) = −1/u (+1, cancels)


def _js(logratio: Tensor, alpha: float) -> Tensor:
    return math.log(2) + F.logsigmoid(logratio)  # f'(u) = log(2u / (1 + u))


def _alpha(logratio: Tensor, alpha: float) -> Tensor:
    if abs(alpha - 1) < 1e-6:  # the limit α → 1 is log u: reverse KL
        return logratio
    # exp overflows past ~88 in fp32 (~11 for an fp16 result): clamp the exponent, as TRL 1.16
    # does, computing in fp32 at least.
    work = torch.promote_types(logratio.dtype, torch.float32)
    t = ((alpha - 1) * logratio.to(work)).clamp(max=11.0 if logratio.dtype == torch.float16 else 80.0)
    return ((torch.exp(t) - 1) / (alpha - 1)).to(logratio.dtype)


#: ``f'`` of each f-divergence's generator as a function of the log-ratio ``log u = log πθ/πref``
#: (the additive constants of ``f'`` cancel in the chosen − rejected difference).
F_DIVERGENCES = {"reverse_kl": _reverse_kl, "forward_kl": _forward_kl, "js": _js, "alpha": _alpha}


class FDivergenceDPOLoss(ReferenceLoss):
    """f-DPO: DPO under an f-divergence constraint (Wang et al. 2023, https://arxiv.org/abs/2309.16240).
    TRL 1.16 ``sigmoid`` with ``f_divergence_type`` / ``f_alpha_divergence_coef``.

    ``L = −log σ(β [f'(πc/rc) − f'(πr/rr)])`` where ``f'`` is the derivative of the divergence's
    generator at the probability ratio ``u = πθ(y|x)/πref(y|x)``:

    * ``reverse_kl``: ``log u`` (= DPO);
    * ``forward_kl``: ``1 − 1/u``;
    * ``js`` (Jensen–Shannon): ``log 2 + log σ(log u)``;
    * ``alpha``: ``(u^(α−1) − 1)/(α − 1)``, TRL 1.16's parameterisation (α → 1: reverse KL,
      α = 0: forward KL). The paper writes the same family as ``(1 − u^(−a))/a`` with
      ``a = 1 − α``; both agree at the default α = 0.5.

    Rewards are DPO's ``β log(πθ/πref)``, as TRL 1.16 logs them.

    Args:
        divergence: ``reverse_kl`` | ``forward_kl`` | ``js`` | ``alpha``.
        alpha: α of the α-divergence (read only with ``divergence=alpha``).
    """

    def __init__(self, beta: float = 0.1, divergence: str = "reverse_kl", alpha: float = 0.5) -> None:
        super().__init__(beta)
        self.divergence = check_choice("divergence", divergence, tuple(F_DIVERGENCES))
        self.alpha = check_number("alpha", alpha, minimum=0)  # α = 0: forward KL; α → 1: reverse KL

    def pair_losses(self, pair: PairLogps) -> Tensor:
        f_prime = F_DIVERGENCES[self.divergence]
        delta = f_prime(pair.chosen_logratios, self.alpha) - f_prime(pair.rejected_logratios, self.alpha)
        return -F.logsigmoid(self.beta * delta)


class LDDPOLoss(DPOLoss):
    """LD-DPO: DPO on length-desensitised log-probs (Liu et al. 2024, https://arxiv.org/abs/2409.06411).
    TRL 1.16 ``sigmoid`` with ``ld_alpha``.

    Each completion's log-prob keeps its first ``l = min(|yw|, |yl|)`` tokens (the length the pair
    shares) in full and the rest scaled by α, for policy and reference alike:
    ``log π_LD(y) = log π(y_{≤l}) + α · log π(y_{>l})``, then
    ``L = −log σ(β [(π_LD(yw) − r_LD(yw)) − (π_LD(yl) − r_LD(yl))])``. α = 1 is DPO; α = 0 reads
    only the shared length. ``l`` is per pair, so a completion ranked against several others
    (K-wise) is split at each pair's own length. Rewards are ``β`` × the LD log-ratios (TRL 1.16).

    Needs the keyword inputs ``policy_chosen_shared_logps``, ``policy_rejected_shared_logps``,
    ``reference_chosen_shared_logps``, ``reference_rejected_shared_logps`` (P,): the summed
    log-probs of the first ``l`` tokens (the stage computes them: ``extra_inputs``).

    Args:
        alpha: α in [0, 1], the weight of the tokens past the shared length (TRL 1.16 ``ld_alpha``).
    """

    extra_inputs = frozenset({"shared_logps"})

    def __init__(self, beta: float = 0.1, alpha: float = 0.5) -> None:
        super().__init__(beta)
        self.alpha = check_number("alpha", alpha, minimum=0, maximum=1)  # a down-weighting factor

    def forward(
        self,
        policy_chosen_logps: Tensor,
        policy_rejected_logps: Tensor,
        reference_chosen_logps: Tensor | None,
        reference_rejected_logps: Tensor | None,
        **kwargs: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        if reference_chosen_logps is None or reference_rejected_logps is None:
            return super().forward(policy_chosen_logps, policy_rejected_logps, None, None, **kwargs)
        totals = {
            "policy_chosen": policy_chosen_logps,
            "policy_rejected": policy_rejected_logps,
            "reference_chosen": reference_chosen_logps,
            "reference_rejected": reference_rejected_logps,
        }
        missing = [f"{k}_shared_logps" for k in totals if kwargs.get(f"{k}_shared_logps") is None]
        if missing:
            raise ValueError(
                f"LDDPOLoss needs the keyword argument(s) {missing}: summed log-probs of each pair's "
                "first min(|yw|, |yl|) tokens (the DPO stage passes them, as extra_inputs asks)"
            )
        desensitized = [
            length_desensitized(v, kwargs[f"{k}_shared_logps"], self.alpha) for k, v in totals.items()
        ]
        return super().forward(*desensitized, **kwargs)
