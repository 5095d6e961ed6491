"""Callbacks Lightning does not ship: preference-pair throughput."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch


class PairThroughput(L.Callback):
    """Logs ``train/pairs_per_sec`` and ``train/tokens_per_sec`` (real, non-pad tokens).

    Measured per optimizer step, wall clock from batch start to batch end (CUDA synchronised),
    and accumulated for ``summary.json`` (``total_pairs``, ``total_tokens``, ``train_seconds``).
    """

    def __init__(self) -> None:
        self.total_pairs = 0
        self.total_tokens = 0
        self.train_seconds = 0.0
        self._t0 = 0.0

    def _sync(self, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._sync(pl_module)
        self._t0 = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._sync(pl_module)
        dt = max(time.perf_counter() - self._t0, 1e-9)
        pairs, tokens = int(batch["num_pairs"]), int(batch["num_tokens"])
        self.total_pairs += pairs
        self.total_tokens += tokens
        self.train_seconds += dt
        # Per-rank rates summed over ranks = the job's rate.
        pl_module.log_dict(
            {"train/pairs_per_sec": pairs / dt, "train/tokens_per_sec": tokens / dt},
            on_step=True,
            on_epoch=False,
            reduce_fx="sum",
            sync_dist=False,
            batch_size=pairs,
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "total_pairs": self.total_pairs,
            "total_tokens": self.total_tokens,
            "train_seconds": self.train_seconds,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.total_pairs = state_dict["total_pairs"]
        self.total_tokens = state_dict["total_tokens"]
        self.train_seconds = state_dict["train_seconds"]
