"""What every training stage shares: a trainable policy and its optimizer and LR schedule."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn


class PolicyModule(L.LightningModule):
    """Base of the stage modules (``conf/stage/``: DPO, SFT, reward model).

    Args:
        policy: the model being trained.
        optimizer: ``params -> Optimizer`` (a Hydra ``_partial_``), called on the policy's
            trainable parameters only (never a frozen reference).
        scheduler: ``(optimizer=, num_training_steps=) -> LRScheduler`` or None; stepped per step.

    Subclasses implement ``_shared_step(batch, stage) -> loss`` (stage ``train`` or ``val``).
    """

    def __init__(
        self,
        policy: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
    ) -> None:
        super().__init__()
        self.policy = policy
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler

    def _shared_step(self, batch: dict[str, Any], stage: str) -> Tensor:
        raise NotImplementedError

    def log_stage(
        self, metrics: dict[str, Tensor], stage: str, batch_size: int, prog_bar: bool = False, **kwargs: Any
    ) -> None:
        """Log ``{stage}/{name}``: per step while training, per epoch (the mean over validation
        batches) otherwise, averaged over ranks (``sync_dist``)."""
        self.log_dict(
            {f"{stage}/{k}": v for k, v in metrics.items()},
            batch_size=batch_size,
            on_step=stage == "train",
            on_epoch=stage != "train",
            sync_dist=True,
            prog_bar=prog_bar,
            **kwargs,
        )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory([p for p in self.policy.parameters() if p.requires_grad])
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(
            optimizer=optimizer, num_training_steps=int(self.trainer.estimated_stepping_batches)
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "train/lr"},
        }
