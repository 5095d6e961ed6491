"""The reference is the policy with its LoRA adapter switched off: one copy of the base weights.

With ``model.lora`` set, the policy is a ``peft`` model whose base weights are frozen; turning the
adapter off (``with model.disable_adapter():``) gives back exactly the initial model, which is
DPO's reference. Memory holds the base model once plus the small adapter, and no copy is made.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dpo_lightning.logps import CompletionStats
from dpo_lightning.reference.base import ReferenceStrategy


class AdapterReference(ReferenceStrategy):
    """Reference log-probs from the policy's base weights (adapter disabled), in eval mode."""

    def build(self, module: nn.Module) -> None:
        if not hasattr(module.policy, "disable_adapter"):
            raise ValueError(
                "reference=adapter needs a LoRA policy: set model.lora (e.g. experiment=lora, or "
                "model.lora='{r: 8, alpha: 16}')"
            )

    @torch.no_grad()
    def completion_logps(self, module: nn.Module, batch: dict[str, Any]) -> CompletionStats:
        policy = module.policy
        was_training = policy.training
        policy.eval()  # the reference never sees dropout, the adapter's included
        try:
            with policy.disable_adapter():
                return module.engine(policy, batch)
        finally:
            policy.train(was_training)
