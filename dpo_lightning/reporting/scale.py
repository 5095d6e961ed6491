"""Callbacks for multi-process runs: global-batch arithmetic, and a per-rank data audit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L


def data_parallel_size(trainer: L.Trainer) -> int:
    """Ranks that see different data (the world size, less any tensor-parallel groups)."""
    try:
        return int(trainer.strategy.distributed_sampler_kwargs.get("num_replicas", 1))
    except (AttributeError, RuntimeError, AssertionError):  # single-device strategies have none
        return trainer.world_size


def global_batch_line(per_device: int, replicas: int, accumulation: int, unit: str = "pairs") -> str:
    total = per_device * replicas * accumulation
    return (
        f"global batch = {per_device} {unit} per device × {replicas} data-parallel ranks "
        f"× {accumulation} accumulation = {total} {unit} per optimizer step"
    )


class GlobalBatchSize(L.Callback):
    """Prints (rank 0) and logs the pairs per optimizer step when training starts."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        per_device = getattr(trainer.datamodule, "batch_size", None)
        if per_device is None:
            return
        replicas, accumulation = data_parallel_size(trainer), trainer.accumulate_grad_batches
        self.global_batch_size = per_device * replicas * accumulation
        if trainer.is_global_zero:
            unit = getattr(trainer.datamodule, "batch_unit", "pairs")  # prompt-only data: prompts
            print(f"[dpo_lightning] {global_batch_line(per_device, replicas, accumulation, unit)}")


class PairIdRecorder(L.Callback):
    """Debug: every rank writes the ``pair_row_ids`` it trained on, per step, to a JSON file.

    ``<dirpath>/rank{r}.json`` = ``[[row ids of step 0], [step 1], ...]`` (micro-batches in order).
    Used to prove data is sharded across ranks without duplicates or gaps
    (``debug=pair_ids``); costs nothing worth measuring but is off by default.
    """

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)
        self.batches: list[list[int]] = []

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.batches.append([int(i) for i in batch["pair_row_ids"].tolist()])

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        (self.dirpath / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.batches))
