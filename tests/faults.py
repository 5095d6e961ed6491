"""Deterministic fault injection for the reliability tests (test code: nothing in the package).

``DPO_LIGHTNING_FAULTS="kill@6,enospc@8,oom@2,nan@3"`` plus the config override
:data:`OVERRIDE` (``tests/conftest.py`` adds it whenever the variable is set) makes a run, at the
given optimizer step:

- ``kill@N``: SIGKILL itself at the start of the batch after step N (a crash: nothing flushed);
- ``enospc@N``: fail the checkpoint written after step N with ``OSError(ENOSPC)`` half-way
  through the write (a full disk);
- ``killwrite@N``: SIGKILL itself half-way through writing the checkpoint of step N;
- ``oom@N``: raise ``torch.OutOfMemoryError`` in the batch after step N (as CUDA would);
- ``nan@N``: make the gradients of the batch after step N NaN (a diverged step);
- ``nanval@N``: make the policy's output NaN in the final validation (``trainer.validate`` after
  fit) of a run that ended at step N (a model that breaks on held-out data).
- ``wait@N``: at the start of the batch after step N, create ``<run dir>/fault_waiting`` and
  wait until the test deletes it (at most :data:`WAIT_S` s): the test can signal a run that
  is known to be mid-training.

Timing-based kills are flaky; these land at the same point on every machine. Faults fire on a
job's first start only, not when a scheduler restarts it (``TORCHELASTIC_RESTART_COUNT`` /
``SLURM_RESTART_COUNT`` > 0): the restarted job must get past the step that killed it.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path
from typing import IO, Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn

from dpo_lightning.run.checkpointing import AtomicCheckpointIO

ENV = "DPO_LIGHTNING_FAULTS"
#: The Hydra override that adds :class:`FaultInjector` to a run's callbacks.
OVERRIDE = "+callbacks.faults._target_=tests.faults.FaultInjector"
WAIT_S = 120
RESTART_COUNTERS = ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT")


def planned(kind: str) -> int | None:
    """The step at which fault ``kind`` is planned, or None (always None in a restarted job)."""
    if any(os.environ.get(var, "0") not in ("", "0") for var in RESTART_COUNTERS):
        return None
    for item in os.environ.get(ENV, "").split(","):
        name, _, step = item.strip().partition("@")
        if name == kind and step:
            return int(step)
    return None


class FaultyCheckpointIO(AtomicCheckpointIO):
    """The production checkpoint writer, failing half-way through the planned writes."""

    def write(self, f: IO[bytes], checkpoint: dict[str, Any]) -> None:
        step = checkpoint.get("global_step")
        if step is not None and step in (planned("enospc"), planned("killwrite")):
            f.write(b"\0" * 1024)
            f.flush()
            if step == planned("killwrite"):
                os.kill(os.getpid(), signal.SIGKILL)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        super().write(f, checkpoint)


class FaultInjector(L.Callback):
    """Fires the planned faults (see the module docstring)."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After the run's own callbacks installed AtomicCheckpointIO in setup().
        if type(trainer.strategy.checkpoint_io) is AtomicCheckpointIO:
            trainer.strategy.checkpoint_io = FaultyCheckpointIO()

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if planned("kill") == step:
            os.kill(os.getpid(), signal.SIGKILL)
        if planned("wait") == step:
            marker = Path(trainer.default_root_dir) / "fault_waiting"
            marker.write_text(str(os.getpid()))
            deadline = time.monotonic() + WAIT_S
            while marker.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        if planned("oom") == step:
            raise torch.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 2.00 GiB (injected by DPO_LIGHTNING_FAULTS)"
            )

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if planned("nan") == trainer.global_step:
            for p in pl_module.parameters():
                if p.grad is not None:
                    p.grad.fill_(float("nan"))
                    break

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING and planned("nanval") == trainer.global_step:
            head = pl_module.policy.get_output_embeddings()
            with torch.no_grad():
                head.weight.fill_(float("nan"))
