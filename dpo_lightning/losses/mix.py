"""A weighted sum of preference losses (``loss=mix``), e.g. DPO + 0.2 × SFT, or IPO + APO."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from dpo_lightning.losses.base import PreferenceLoss
from dpo_lightning.run.errors import ConfigError, check_number


class MixLoss(PreferenceLoss):
    """``L = Σ_k w_k L_k``, per pair, over any losses of this package.

    TRL 1.16's equivalent is a list ``loss_type`` with ``loss_weights``.

    Reference-free only when every component is. The rewards (for the metrics) are those of the
    first component.

    Args:
        components: a list of ``{loss: PreferenceLoss, weight: float}`` (``conf/loss/mix.yaml``);
            each ``loss`` is built by Hydra from its own ``_target_``.
    """

    def __init__(self, components: Sequence[Mapping]) -> None:
        super().__init__()
        if not components:
            raise ConfigError("loss.components is empty: give a list of {loss: ..., weight: ...}")
        for i, comp in enumerate(components):
            if getattr(comp.get("loss"), "unpaired", False):
                raise ValueError(f"loss.components[{i}] is an unpaired loss: mix combines pairwise losses")
            if not isinstance(comp.get("loss"), PreferenceLoss) or "weight" not in comp:
                raise ConfigError(
                    f"loss.components[{i}] must be {{loss: <config with _target_>, weight: <num>}}"
                )
        self.losses = nn.ModuleList(comp["loss"] for comp in components)
        self.weights = [
            float(check_number(f"components.{i}.weight", comp["weight"], minimum=0))
            for i, comp in enumerate(components)
        ]

    @property
    def is_reference_free(self) -> bool:
        return all(loss.is_reference_free for loss in self.losses)

    @property
    def extra_inputs(self) -> frozenset[str]:
        return frozenset().union(*(loss.extra_inputs for loss in self.losses))

    @property
    def batch_coupled(self) -> bool:
        return any(loss.batch_coupled for loss in self.losses)

    def forward(
        self,
        policy_chosen_logps: Tensor,
        policy_rejected_logps: Tensor,
        reference_chosen_logps: Tensor | None,
        reference_rejected_logps: Tensor | None,
        **kwargs: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        total, rewards = 0.0, None
        for loss, weight in zip(self.losses, self.weights, strict=True):
            losses, chosen, rejected = loss(
                policy_chosen_logps,
                policy_rejected_logps,
                reference_chosen_logps,
                reference_rejected_logps,
                **kwargs,
            )
            total = total + weight * losses
            rewards = rewards or (chosen, rejected)
        return total, *rewards
