"""Preference losses: the shared pieces (index-API functions, base class, small helpers).

Two layers:

* pure functions with the shapes of the DPO authors' reference code
  (https://github.com/eric-mitchell/direct-preference-optimization):
  :func:`dpo_loss` and :func:`reward_model_loss` take one log-prob (or reward) per
  *completion* and index tensors that say which completion beats which, so K ranked
  completions of one prompt are forwarded once and give up to K(K-1)/2 pairs;
* one small ``nn.Module`` per loss, built by ``hydra.utils.instantiate(cfg.loss)``. Every loss
  takes per-*pair* summed log-probs and returns ``(losses, chosen_rewards, rejected_rewards)``,
  each of shape (P,). The training loop reduces and logs; it never checks a loss by name, it
  reads what the class declares (:attr:`PreferenceLoss.is_reference_free`, ``unpaired``,
  ``extra_inputs``, ``batch_coupled``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from dpo_lightning.run.errors import check_number

BETA_HINT = "β scales the implicit reward: β = 0 trains nothing, β < 0 trains toward the rejected answers"


def check_beta(beta: float) -> float:
    """β > 0 and finite (every loss with a β), else :class:`~dpo_lightning.run.errors.SettingError`."""
    return check_number("beta", beta, above=0, hint=BETA_HINT)


def check_label_smoothing(eps: float, *, above: float | None = None, below: float = 0.5) -> float:
    """ε, a label-flip probability: in [0, 0.5) by default (ε = 0.5 makes chosen and rejected
    interchangeable, so nothing is learned)."""
    minimum = None if above is not None else 0
    return check_number("label_smoothing", eps, minimum=minimum, above=above, below=below)


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
    #: False: the loss reads pairs. Unpaired losses (KTO, BCO: labelled completions) say True.
    unpaired: bool = False
    #: Optional keyword inputs beyond summed log-probs and lengths, computed only when a loss
    #: names them here: ``"shared_logps"`` (``policy_chosen_shared_logps`` ...: log-probs of each
    #: pair's first min(|yw|, |yl|) tokens, LD-DPO) and ``"log_sum_sq_probs"``
    #: (``chosen_log_sum_sq_probs`` / ``rejected_log_sum_sq_probs``: the policy's
    #: ``Σ_t log Σ_v p_t(v)²``, WPO).
    extra_inputs: frozenset[str] = frozenset()
    #: True when pair i's loss depends on the other pairs of the batch (AOT sorts the batch), so
    #: a per-pair weight does not attach to the pair it was computed for.
    batch_coupled: bool = False

    def forward(
        self,
        policy_chosen_logps: Tensor,
        policy_rejected_logps: Tensor,
        reference_chosen_logps: Tensor | None,
        reference_rejected_logps: Tensor | None,
        **kwargs: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(P,) summed log-probs in; (losses, chosen_rewards, rejected_rewards), each (P,), out."""
        raise NotImplementedError


@dataclass
class PairLogps:
    """The inputs of one batch of pairs, each (P,): summed log-probs and completion token counts.

    ``mean_chosen_length`` (0-d) is ``Σ |yw| / P`` over the *global* batch (every data-parallel
    rank) when the caller knows it; None means this batch's own mean (one process).
    """

    policy_chosen: Tensor
    policy_rejected: Tensor
    reference_chosen: Tensor | None = None
    reference_rejected: Tensor | None = None
    chosen_lengths: Tensor | None = None
    rejected_lengths: Tensor | None = None
    mean_chosen_length: Tensor | None = None

    @property
    def chosen_logratios(self) -> Tensor:
        """``log πθ(yw|x) − log πref(yw|x)`` (P,)."""
        return self.policy_chosen - self.reference_chosen

    @property
    def rejected_logratios(self) -> Tensor:
        """``log πθ(yl|x) − log πref(yl|x)`` (P,)."""
        return self.policy_rejected - self.reference_rejected

    @property
    def logits(self) -> Tensor:
        """DPO's margin ``(πc − πr) − (rc − rr)``, which sigmoid-family losses scale by β: (P,)."""
        return self.chosen_logratios - self.rejected_logratios

    @property
    def normalized_logits(self) -> Tensor:
        """The length-normalised margin ``(πc − rc)/|yw| − (πr − rr)/|yl|`` (IPO, sigmoid_norm):
        (P,); needs both completion lengths."""
        return per_token(self.chosen_logratios, self.chosen_lengths) - per_token(
            self.rejected_logratios, self.rejected_lengths
        )


class ReferenceLoss(PreferenceLoss):
    """Base of the losses on log-ratios to a reference: subclasses write :meth:`pair_losses`.

    Rewards are DPO's implicit ``β (log πθ − log πref)`` (detached), as TRL 1.16's ``DPOTrainer`` logs
    them for every loss type.

    Args:
        beta: β (each subclass's docstring says what it scales).
    """

    def __init__(self, beta: float = 0.1) -> None:
        super().__init__()
        self.beta = check_beta(beta)

    def forward(
        self,
        policy_chosen_logps: Tensor,
        policy_rejected_logps: Tensor,
        reference_chosen_logps: Tensor | None,
        reference_rejected_logps: Tensor | None,
        **kwargs: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        if reference_chosen_logps is None or reference_rejected_logps is None:
            raise ValueError(
                f"{type(self).__name__} needs reference log-probs; use a reference strategy other "
                "than reference=none, or a reference-free loss (simpo, orpo, sft)"
            )
        pair = PairLogps(
            policy_chosen_logps,
            policy_rejected_logps,
            reference_chosen_logps,
            reference_rejected_logps,
            kwargs.get("chosen_lengths"),
            kwargs.get("rejected_lengths"),
            kwargs.get("mean_chosen_length"),
        )
        losses = self.pair_losses(pair)
        return losses, *implicit_rewards(self.beta, pair.chosen_logratios, pair.rejected_logratios)

    def pair_losses(self, pair: PairLogps) -> Tensor:
        """(P,) per-pair losses."""
        raise NotImplementedError


class ReferenceFreeLoss(PreferenceLoss):
    """Base of losses that never read reference log-probs: write :meth:`pair_losses`."""

    is_reference_free = True

    def forward(
        self,
        policy_chosen_logps: Tensor,
        policy_rejected_logps: Tensor,
        reference_chosen_logps: Tensor | None = None,
        reference_rejected_logps: Tensor | None = None,
        **kwargs: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        pair = PairLogps(
            policy_chosen_logps,
            policy_rejected_logps,
            chosen_lengths=kwargs.get("chosen_lengths"),
            rejected_lengths=kwargs.get("rejected_lengths"),
            mean_chosen_length=kwargs.get("mean_chosen_length"),
        )
        require_lengths(
            type(self).__name__,
            chosen_lengths=pair.chosen_lengths,
            rejected_lengths=pair.rejected_lengths,
        )
        return self.pair_losses(pair), *self.rewards(pair)

    def pair_losses(self, pair: PairLogps) -> Tensor:
        """(P,) per-pair losses."""
        raise NotImplementedError

    def rewards(self, pair: PairLogps) -> tuple[Tensor, Tensor]:
        """Detached (P,), (P,) scores used for the reward metrics; default: per-token log-probs."""
        return (
            per_token(pair.policy_chosen, pair.chosen_lengths).detach(),
            per_token(pair.policy_rejected, pair.rejected_lengths).detach(),
        )


def implicit_rewards(
    beta: float, chosen_logratios: Tensor, rejected_logratios: Tensor
) -> tuple[Tensor, Tensor]:
    """DPO's implicit rewards ``β log(πθ/πref)`` for chosen and rejected, detached: (P,), (P,)."""
    return beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def batch_token_nll(
    chosen_logps: Tensor, chosen_lengths: Tensor, mean_length: Tensor | None = None
) -> Tensor:
    """Per-pair NLL whose mean over pairs is the token-mean NLL of the chosen completions.

    ``-log π(yw_i) / mean_j |yw_j|``: averaging this over the P pairs gives
    ``-Σ log π(yw) / Σ |yw|``, the token-mean cross-entropy of the batch's chosen completions:
    TRL 1.16's ``DPOTrainer`` ``sft`` branch, and the ``nll_loss`` of its experimental ORPO / CPO
    trainers. Shapes (P,), (P,) -> (P,).

    ``mean_length`` (0-d): the mean over the global batch (all data-parallel ranks) instead of
    this batch's. With it, the mean over the global pairs is the global token mean exactly, so W
    ranks × b pairs give the loss of one process × W·b pairs (a per-rank mean length would weigh
    each rank's tokens by 1/its own length).
    """
    mean = chosen_lengths.float().mean() if mean_length is None else mean_length
    return -chosen_logps / mean.clamp(min=1.0)


def per_token(logps: Tensor, lengths: Tensor) -> Tensor:
    """Length-normalised (mean per token) log-probs: (P,), (P,) -> (P,)."""
    return logps / lengths.clamp(min=1.0)


def length_desensitized(total: Tensor, shared: Tensor, alpha: float) -> Tensor:
    """LD-DPO's log-likelihood: the shared-length part plus α × the rest (P,), (P,) -> (P,).

    ``log π_LD(y) = log π(y_{≤l}) + α (log π(y) − log π(y_{≤l}))``, l = min(|yw|, |yl|)
    (Liu et al. 2024, https://arxiv.org/abs/2409.06411; TRL 1.16 ``ld_alpha``).
    """
    return shared + alpha * (total - shared)


def smoothed_sigmoid_loss(logits: Tensor, label_smoothing: float) -> Tensor:
    """``-(1 − ε) log σ(z) − ε log σ(−z)``: the sigmoid loss if labels flip with probability ε."""
    return -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing


def require_lengths(name: str, **tensors: Tensor | None) -> None:
    """One clear error when a length-normalised loss is called without completion lengths."""
    missing = [k for k, v in tensors.items() if v is None]
    if missing:
        raise ValueError(f"{name} needs the keyword argument(s) {missing} (completion token counts)")
