"""TR-DPO: a reference that follows the policy (Gorbatovski et al. 2024, https://arxiv.org/abs/2404.09656).

Every ``sync_steps`` optimizer steps the frozen copy is moved toward the policy,
``θref ← α θ + (1 − α) θref`` (soft update, α < 1) or replaced by it (hard update, α = 1).
TRL 1.16's equivalent: ``sync_ref_model=True``, ``ref_model_mixup_alpha``, ``ref_model_sync_steps``.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn

from dpo_lightning.reference.base import CopyReference
from dpo_lightning.run.errors import check_number


@torch.no_grad()
def soft_update(target: nn.Module, source: nn.Module, alpha: float) -> None:
    """``target ← α · source + (1 − α) · target``, parameter by parameter (buffers copied)."""
    for t, s in zip(target.parameters(), source.parameters(), strict=True):
        t.lerp_(s.detach().to(t.dtype), alpha)
    for t, s in zip(target.buffers(), source.buffers(), strict=True):
        t.copy_(s)


class SyncReference(CopyReference):
    """A frozen copy of the policy, updated toward it every ``sync_steps`` steps (TR-DPO).

    Unlike ``copy``, the reference changes during training, so it is kept in checkpoints.

    Args:
        alpha: α in (0, 1]: weight of the policy in the update (1 = hard update; TRL 1.16 default 0.6).
        sync_steps: N, optimizer steps between updates (TR-DPO τ; TRL 1.16 default 512).
    """

    rebuilt_on_start = False  # the reference is state: checkpoint it

    def __init__(self, alpha: float = 0.6, sync_steps: int = 512) -> None:
        super().__init__()
        self.alpha = check_number("alpha", alpha, above=0, maximum=1, hint="1 = copy the policy")
        self.sync_steps = check_number("sync_steps", sync_steps, minimum=1, integer=True)

    def callbacks(self) -> list[L.Callback]:
        return [ReferenceSync(self)]

    def sync(self, policy: nn.Module) -> None:
        """One TR-DPO update of the reference toward ``policy``."""
        soft_update(self.model, policy, self.alpha)


class ReferenceSync(L.Callback):
    """Calls :meth:`SyncReference.sync` with the stage's policy every ``sync_steps`` steps."""

    def __init__(self, reference: SyncReference) -> None:
        self.reference = reference
        self.last_synced = 0

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step = trainer.global_step  # optimizer steps: gradient accumulation is counted once
        if step > self.last_synced and step % self.reference.sync_steps == 0:
            self.reference.sync(pl_module.policy)
            self.last_synced = step

    def state_dict(self) -> dict[str, Any]:
        return {"last_synced": self.last_synced}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_synced = state_dict["last_synced"]
