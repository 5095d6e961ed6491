"""Unpaired losses: each completion carries its own label (desirable or not), no pairs.

Inputs are per-*row* summed log-probs (U,) of labelled completions — TRL 1.16's unpaired
preference rows ``{prompt, completion, label}`` — and the labels (U,) bool; every loss returns
``(losses, rewards, metrics)``: per-row losses (U,), detached implicit rewards (U,) and a dict of
scalar diagnostics (``kl``, ``delta``). Statistics that are batch-level by definition (KTO's
reference point, BCO's reward shift) are averaged over data-parallel ranks here, with
``torch.distributed`` when it is initialised: every rank gets the same value. Pure torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dpo_lightning.losses.base import check_beta
from dpo_lightning.run.errors import check_number

#: The paper's range for ``λ_D n_D / (λ_U n_U)`` (KTO, Ethayarajh et al. 2024, Eq. 8).
LOSS_AVERSION_RANGE = (1.0, 4 / 3)


def global_mean(values: Tensor) -> Tensor:
    """Mean of ``values`` (N,) over every data-parallel rank's values (detached): ``Σ / count``.

    Rows, not ranks, are weighted equally (a rank with fewer rows counts less); 0 when no rank has
    any value. Every rank must call it the same number of times (it is a collective).
    """
    values = values.detach().to(torch.promote_types(values.dtype, torch.float32))
    totals = torch.stack([values.sum(), values.new_tensor(values.numel())])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(totals)
    return (totals[0] / totals[1].clamp(min=1.0)).to(values.dtype)  # no rows anywhere: Σ = 0, mean 0


class UnpairedLoss(nn.Module):
    """Base of the losses on labelled completions; subclasses implement :meth:`forward`.

    The DPO stage reads :attr:`unpaired` (batches of labelled rows, not pairs) and
    :attr:`needs_mismatched` (forward each prompt with another example's completions too, for a
    KL estimate); never a name.
    """

    is_reference_free: bool = False
    unpaired: bool = True
    #: True when the loss reads ``policy_kl_logps`` / ``reference_kl_logps``: summed log-probs of
    #: mismatched rows (prompt i with the completions of example i − 1 of the same batch).
    needs_mismatched: bool = False
    extra_inputs: frozenset[str] = frozenset()

    def forward(
        self, policy_logps: Tensor, reference_logps: Tensor | None, labels: Tensor, **kwargs: Tensor
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """(U,) summed log-probs and bool labels in; (losses, rewards, metrics) out."""
        raise NotImplementedError

    def balance_warning(self, n_desirable: int, n_undesirable: int) -> str | None:
        """A warning when the training data's label counts call for other settings (or None)."""
        return None

    def logratios(self, policy_logps: Tensor, reference_logps: Tensor | None) -> Tensor:
        if reference_logps is None:
            raise ValueError(
                f"{type(self).__name__} needs reference log-probs; use a reference strategy other "
                "than reference=none"
            )
        return policy_logps - reference_logps


class KTOLoss(UnpairedLoss):
    """KTO (Ethayarajh et al. 2024, https://arxiv.org/abs/2402.01306, Eq. 7). TRL 1.16 ``KTOTrainer``
    with ``loss_type="kto"``.

    With ``r = log πθ(y|x) − log πref(y|x)`` and the reference point
    ``z_ref = max(0, mean_{(x_i, y_j), i ≠ j} [log πθ(y_j|x_i) − log πref(y_j|x_i)])`` — a
    batch estimate of KL(πθ‖πref) from mismatched prompt/completion rows, detached and averaged
    over ranks:

    ``L_i = λ_D (1 − σ(β (r_i − z_ref)))`` for a desirable row,
    ``L_i = λ_U (1 − σ(β (z_ref − r_i)))`` for an undesirable one (``λ_y − v(x, y)`` of the
    paper; the constant λ_y makes the loss ≥ 0). Rewards are ``β r``; metrics ``kl`` = z_ref.

    Args:
        beta: β, the value function's saturation (paper: 0.1).
        desirable_weight: λ_D. undesirable_weight: λ_U. For imbalanced data the paper asks for
            ``λ_D n_D / (λ_U n_U)`` in [1, 4/3] (:meth:`balance_warning` checks it at the start).
    """

    needs_mismatched = True

    def __init__(
        self, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0
    ) -> None:
        super().__init__()
        self.beta = check_beta(beta)
        self.desirable_weight = check_number("desirable_weight", desirable_weight, above=0)
        self.undesirable_weight = check_number("undesirable_weight", undesirable_weight, above=0)

    def forward(
        self, policy_logps: Tensor, reference_logps: Tensor | None, labels: Tensor, **kwargs: Tensor
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        policy_kl, reference_kl = kwargs.get("policy_kl_logps"), kwargs.get("reference_kl_logps")
        if policy_kl is None or reference_kl is None:
            raise ValueError(
                "KTOLoss needs policy_kl_logps and reference_kl_logps: summed log-probs of "
                "mismatched rows (the DPO stage forwards them, as needs_mismatched asks)"
            )
        r = self.logratios(policy_logps, reference_logps)
        kl = global_mean(policy_kl - reference_kl).clamp(min=0)
        desirable = self.desirable_weight * (1 - torch.sigmoid(self.beta * (r - kl)))
        undesirable = self.undesirable_weight * (1 - torch.sigmoid(self.beta * (kl - r)))
        return torch.where(labels, desirable, undesirable), self.beta * r.detach(), {"kl": kl}

    def balance_warning(self, n_desirable: int, n_undesirable: int) -> str | None:
        """Eq. 8's loss-aversion rule: ``λ_D n_D / (λ_U n_U)`` should lie in [1, 4/3]."""
        low, high = LOSS_AVERSION_RANGE
        if n_desirable == 0 or n_undesirable == 0:
            return (
                f"KTO: the training data has {n_desirable} desirable and {n_undesirable} "
                "undesirable rows; with one label only the loss never sees the other side"
            )
        ratio = self.desirable_weight * n_desirable / (self.undesirable_weight * n_undesirable)
        if low <= ratio <= high:
            return None
        d = n_undesirable * self.undesirable_weight / n_desirable
        u = n_desirable * self.desirable_weight / n_undesirable
        return (
            f"KTO: λ_D·n_D / (λ_U·n_U) = {self.desirable_weight}·{n_desirable} / "
            f"({self.undesirable_weight}·{n_undesirable}) = {ratio:.3g}, outside the paper's "
            f"[{low:g}, {high:.3g}] (Eq. 8): set loss.desirable_weight in [{d * low:.3g}, {d * high:.3g}] "
            f"or loss.undesirable_weight in [{u / high:.3g}, {u / low:.3g}] (not both)"
        )


class BCOLoss(UnpairedLoss):
    """BCO, unpaired (Jung et al. 2024, https://arxiv.org/abs/2404.04656). No TRL 1.16
    equivalent (its ``BCOTrainer`` was removed; TRL ≤ 0.2x computed the same loss).

    A binary classifier whose logit is the implicit reward ``r = β log(πθ(y|x)/πref(y|x))``,
    shifted by δ: ``L_i = −log σ(r_i − δ)`` for a desirable row and ``−log σ(−(r_i − δ))`` for
    an undesirable one. δ is the running mean, over the training steps so far, of each step's mean
    reward over all its rows on all ranks (updated before use, in training mode only; a buffer, so
    it is checkpointed and resumed; the same on every rank). Metrics: ``delta`` = δ.

    The paper's optional density-ratio classifier (underlying distribution matching) is not
    implemented: every row has weight 1.

    Args:
        beta: β, the reward scale.
    """

    def __init__(self, beta: float = 0.1) -> None:
        super().__init__()
        self.beta = check_beta(beta)
        self.register_buffer("running_mean", torch.zeros(()))
        self.register_buffer("num_batches", torch.zeros((), dtype=torch.long))

    def forward(
        self, policy_logps: Tensor, reference_logps: Tensor | None, labels: Tensor, **kwargs: Tensor
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        rewards = self.beta * self.logratios(policy_logps, reference_logps)
        if self.training:
            batch_mean = global_mean(rewards).to(self.running_mean)
            self.num_batches += 1
            self.running_mean += (batch_mean - self.running_mean) / self.num_batches
        delta = self.running_mean.to(rewards.dtype)
        losses = torch.where(labels, -F.logsigmoid(rewards - delta), -F.logsigmoid(-(rewards - delta)))
        return losses, rewards.detach(), {"delta": delta}
