"""Throughput: Lightning's ``ThroughputMonitor`` for the live rates, :class:`RunTotals` for the
totals ``summary.json`` reports.

The live metrics come from :class:`lightning.pytorch.callbacks.ThroughputMonitor`
(``conf/callbacks/default.yaml``) with :func:`batch_pairs` as its ``batch_size_fn`` and
:func:`batch_tokens` as its ``length_fn``: rolling ``train/device/samples_per_sec`` (pairs/s;
sequences/s for SFT on plain text),
``train/device/items_per_sec`` (real tokens/s), their job-wide versions under DDP/FSDP, and
``train/device/mfu`` on accelerators whose peak Lightning knows, from the stage's
``flops_per_batch``. What it does not keep — the totals of the whole run, across a resume — is
counted here.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch


def batch_pairs(batch: dict[str, Any]) -> int:
    """``ThroughputMonitor``'s samples: the preference pairs of a batch, or its sequences when it
    has none (SFT on plain text, the labelled rows of unpaired data)."""
    return int(batch["num_pairs"]) or int(batch["num_completions"])


def batch_tokens(batch: dict[str, Any]) -> int:
    """Real (non-pad) tokens the batch's forward reads (``ThroughputMonitor``'s items)."""
    return int(batch["num_tokens"])


class RunTotals(L.Callback):
    """Pairs, real tokens and seconds spent in training batches over the whole run (this rank):
    ``summary.json``'s ``pairs_per_sec`` / ``tokens_per_sec`` / ``pairs_trained``.

    Wall clock from batch start to batch end (CUDA synchronised); restored on resume.
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
        # A stage that builds its batch once it is on the device (online DPO samples it there,
        # before this hook) says when that began: its time is the batch's, too.
        started = getattr(pl_module, "batch_started_at", None)
        self._t0 = started if started is not None else time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._sync(pl_module)
        self.total_pairs += batch_pairs(batch)  # unpaired data: its labelled rows
        self.total_tokens += batch_tokens(batch)
        self.train_seconds += max(time.perf_counter() - self._t0, 1e-9)

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
