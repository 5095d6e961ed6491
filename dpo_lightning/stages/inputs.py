"""Optional loss inputs beyond summed log-probs: what each needs from the forwards, how it is built.

A loss names the inputs it reads in ``extra_inputs``; the DPO stage asks the policy's and the
reference's forwards for exactly the engine outputs listed here (nothing more is computed for a
loss that names none) and passes the built tensors as keyword arguments. The stage never checks a
loss by name: adding an input is one entry in :data:`EXTRA_INPUTS`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from dpo_lightning.engine import CompletionStats
from dpo_lightning.run.errors import UserError

#: (policy stats, reference stats or None, chosen_idx (P,), rejected_idx (P,)) -> keyword inputs
Builder = Callable[[CompletionStats, CompletionStats | None, Tensor, Tensor], dict[str, Tensor]]


@dataclass(frozen=True)
class ExtraInput:
    """One optional input: the engine outputs it needs from each model, and its builder."""

    policy: frozenset[str]
    reference: frozenset[str]
    build: Builder


def shared_logps(
    policy: CompletionStats, reference: CompletionStats | None, ci: Tensor, ri: Tensor
) -> dict[str, Tensor]:
    """Log-probs of each pair's first ``min(|yw|, |yl|)`` tokens (LD-DPO), per pair (P,).

    The shared length is per pair, so a completion ranked against several others (K-wise) is cut
    at each pair's own length.
    """
    shared = torch.minimum(policy.lengths[ci], policy.lengths[ri])
    out = {
        "policy_chosen_shared_logps": policy.prefix_logps(ci, shared),
        "policy_rejected_shared_logps": policy.prefix_logps(ri, shared),
    }
    if reference is not None:
        out["reference_chosen_shared_logps"] = reference.prefix_logps(ci, shared)
        out["reference_rejected_shared_logps"] = reference.prefix_logps(ri, shared)
    return out


def log_sum_sq_probs(
    policy: CompletionStats, reference: CompletionStats | None, ci: Tensor, ri: Tensor
) -> dict[str, Tensor]:
    """The policy's ``Σ_t log Σ_v p_t(v)²`` of each pair's completions (WPO), (P,) each."""
    return {
        "chosen_log_sum_sq_probs": policy.log_sum_sq_probs[ci],
        "rejected_log_sum_sq_probs": policy.log_sum_sq_probs[ri],
    }


EXTRA_INPUTS: dict[str, ExtraInput] = {
    "shared_logps": ExtraInput(frozenset({"token_logps"}), frozenset({"token_logps"}), shared_logps),
    "log_sum_sq_probs": ExtraInput(frozenset({"log_sum_sq_probs"}), frozenset(), log_sum_sq_probs),
}


def extra_inputs(names: Iterable[str], loss_name: str) -> list[ExtraInput]:
    """The registry entries a loss asks for; a one-line error for a name nobody builds."""
    unknown = sorted(set(names) - set(EXTRA_INPUTS))
    if unknown:
        raise UserError(
            f"loss {loss_name} asks for inputs {unknown} that no stage builds; known: {sorted(EXTRA_INPUTS)}"
        )
    return [EXTRA_INPUTS[n] for n in sorted(set(names))]
