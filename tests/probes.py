"""Test-only callbacks that record what a CLI run did inside its processes (nothing in the package).

Added to a run with ``+callbacks.probe._target_=tests.probes.ReferenceProbe
+callbacks.probe.dirpath=<dir>``: each rank writes ``<dir>/rank{r}.json``.
"""

from __future__ import annotations

import json
import resource
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.distributed.tensor import DTensor


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if isinstance(p, DTensor) else p


def _full_sum(model: torch.nn.Module) -> float:
    """Sum of every weight, gathered from the shards (collective under FSDP2)."""
    total = 0.0
    for p in model.parameters():
        full = p.full_tensor() if isinstance(p, DTensor) else p
        total += float(full.detach().double().sum())
    return total


class ReferenceProbe(L.Callback):
    """Where the reference's weights are, whether they train, and their sum before and after."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)
        self.info: dict[str, Any] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = pl_module.reference.model
        params = list(model.parameters())
        optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
        groups = [m._get_fsdp_state()._fsdp_param_group for m in model.modules() if hasattr(m, "reshard")]
        self.info = {
            "rank": trainer.global_rank,
            "sharded": all(isinstance(p, DTensor) for p in params),
            "local_numel": sum(_local(p).numel() for p in params),
            "full_numel": sum(p.numel() for p in params),
            "local_bytes": sum(_local(p).numel() * _local(p).element_size() for p in params),
            "devices": sorted({_local(p).device.type for p in params}),
            "offload_policies": sorted({type(g.offload_policy).__name__ for g in groups if g is not None}),
            "requires_grad": any(p.requires_grad for p in params),
            "in_optimizer": any(id(p) in optimized for p in params),
            "training": model.training,
            "sum_before": _full_sum(model),
        }

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.info["sum_after"] = _full_sum(pl_module.reference.model)
        self.info["training_at_end"] = pl_module.reference.model.training
        self.info["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.dirpath.mkdir(parents=True, exist_ok=True)
        (self.dirpath / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.info))
