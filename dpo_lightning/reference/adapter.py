"""The reference is the policy with its LoRA adapter switched off: one copy of the base weights.

With ``model.lora`` set, the policy is a ``peft`` model whose base weights are frozen; turning the
adapter off (``with model.disable_adapter():``) gives back exactly the initial model, which is
DPO's reference. Memory holds the base model once plus the small adapter, and no copy is made.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from dpo_lightning.engine import CompletionStats, EngineBatch, ForwardEngine
from dpo_lightning.reference.base import ReferenceStrategy, frozen_forward
from dpo_lightning.run.errors import ConfigError

NEEDS_LORA = (
    "reference=adapter needs a LoRA policy: set model.lora (e.g. experiment=lora, or "
    "model.lora='{r: 8, alpha: 16}'), or use reference=copy"
)


class AdapterReference(ReferenceStrategy):
    """Reference log-probs from the policy's base weights (adapter disabled), in eval mode."""

    def check_policy(self, lora: Any) -> None:
        if not lora:
            raise ConfigError(NEEDS_LORA)

    def build(self, policy: nn.Module) -> None:
        if not hasattr(policy, "disable_adapter"):
            raise ConfigError(NEEDS_LORA)

    def forward_params(self, policy: nn.Module) -> int:
        return sum(p.numel() for p in policy.parameters())  # the policy, adapter off

    def completion_logps(
        self, batch: EngineBatch, policy: nn.Module, engine: ForwardEngine
    ) -> CompletionStats:
        was_training = policy.training
        policy.eval()  # the reference never sees dropout, the adapter's included
        try:
            with policy.disable_adapter():
                return frozen_forward(engine, policy, batch)
        finally:
            policy.train(was_training)
