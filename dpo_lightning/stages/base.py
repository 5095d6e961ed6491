"""What every training stage shares: a trainable policy, its optimizer and LR schedule, the
forward engine, and one logging rule."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from dpo_lightning.engine import BatchReader, ForwardEngine, PaddedEngine


def model_flops_per_token(params: int, training: bool) -> float:
    """Model FLOPs per token: ``6N`` for a trained model (forward + backward), ``2N`` for a
    forward only (Kaplan et al. 2020, https://arxiv.org/abs/2001.08361; attention left out)."""
    return (6 if training else 2) * params


class PolicyModule(L.LightningModule):
    """Base of the stage modules (``conf/stage/``: DPO, SFT, reward model).

    Args:
        policy: the model being trained.
        optimizer: ``params -> Optimizer`` (a Hydra ``_partial_``), called on the policy's
            trainable parameters only (never a frozen reference).
        scheduler: ``(optimizer=, num_training_steps=) -> LRScheduler`` or None; stepped per step.
        engine: batch layout + forward (``conf/engine``; the same object built the DataModule's
            collator); default: padded rows. Resolved here, once, for this policy and the
            batch ``readers`` (``engine=auto`` picks packed or padded and the choice is logged).
        readers: other components reading the batches (a reference strategy), asked with this
            stage whether they need padded rows (:class:`~dpo_lightning.engine.BatchReader`).

    Subclasses implement ``_shared_step(batch, stage) -> loss`` (stage ``train`` or ``val``).
    """

    def __init__(
        self,
        policy: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        engine: ForwardEngine | None = None,
        readers: Sequence[BatchReader] = (),
    ) -> None:
        super().__init__()
        self.policy = policy
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.engine, note = (engine or PaddedEngine()).resolve(policy, [self, *readers])
        if note:
            rank_zero_info(note)
        #: Model FLOPs of the batch being processed: Lightning's ``ThroughputMonitor`` reads it
        #: (for ``mfu``) after every batch.
        self.flops_per_batch: float | None = None

    def padded_rows_reason(self) -> str | None:
        """Why this stage needs one padded row per completion (:class:`BatchReader`); None: it
        reads only the engine's per-completion statistics."""
        return None

    def forward_only_params(self) -> int:
        """Parameters read by the step's forward-only passes (a reference), per token."""
        return 0

    def flops_per_token(self, training: bool) -> float:
        """Model FLOPs per batch token: the policy trained (or evaluated) plus forward-only passes."""
        policy = sum(p.numel() for p in self.policy.parameters())
        forward_only = model_flops_per_token(self.forward_only_params(), training=False)
        return model_flops_per_token(policy, training) + forward_only

    @property
    def reference_model(self) -> nn.Module | None:
        """A frozen reference model this stage holds (for callbacks that score samples), or None."""
        return None

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
        self.flops_per_batch = self.flops_per_token(training=True) * int(batch["num_tokens"])
        return self._shared_step(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.flops_per_batch = self.flops_per_token(training=False) * int(batch["num_tokens"])
        self._shared_step(batch, "val")

    def optimizer_step(
        self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Callable[[], Any] | None = None
    ) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # Free the gradients as soon as they are applied. Lightning zeroes them just before the
        # next backward, so they would sit through the next forward beside its activations: the
        # size of the trainable weights again at the step's memory peak. Same numbers, less memory.
        optimizer.zero_grad(set_to_none=True)

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
