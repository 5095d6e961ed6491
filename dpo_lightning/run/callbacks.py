"""The callbacks every run gets: atomic checkpoints, resume state, the non-finite guards, the
pre-emption handler."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf

from dpo_lightning.run.checkpointing import AtomicCheckpointIO, ResumeState
from dpo_lightning.run.guards import FiniteValidation, NonFiniteGuard
from dpo_lightning.run.preemption import Preemption
from dpo_lightning.run.resume import run_config


class AtomicCheckpoints(L.Callback):
    """Installs :class:`AtomicCheckpointIO` on strategies that use plain ``torch.save``
    (sharded strategies keep their own distributed checkpoint I/O)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()


def reliability_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """Callbacks every run gets: atomic checkpoints, resume state (refusing changed data unless
    ``resume_on_changed_data``), the non-finite guards (training steps, final validation), and the
    pre-emption handler (``preemption.*``; it writes ``<run dir>/checkpoints/last.ckpt``)."""
    train_cfg = cfg.get("train") or {}
    preemption = OmegaConf.to_container(cfg.preemption, resolve=True) if cfg.get("preemption") else {}
    return [
        AtomicCheckpoints(),
        ResumeState(run_config(cfg), allow_changed_data=bool(cfg.get("resume_on_changed_data"))),
        NonFiniteGuard(train_cfg.get("on_nonfinite", "stop")),
        FiniteValidation(),
        Preemption(Path(cfg.paths.output_dir) / "checkpoints", **preemption),
    ]


def nonfinite_skipped(callbacks: list[Any]) -> int:
    return sum(c.skipped for c in callbacks if isinstance(c, NonFiniteGuard))
