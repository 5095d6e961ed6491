"""Crash-safe checkpoints and exact resume.

- :class:`AtomicCheckpointIO` writes through :func:`~dpo_lightning.run.files.atomic_write`
  (temp file + fsync + ``os.replace``): a crash or a full disk mid-write leaves the previous
  checkpoint intact; loads use ``torch.load(weights_only=True)``.
- :class:`RollingCheckpoint` is ``ModelCheckpoint`` keeping the ``keep_last`` newest files.
- :class:`ResumeState` adds to every checkpoint the run's config (to refuse a resume with a
  changed config), the package version and the python / numpy / torch RNG states, restores the
  RNGs on resume, and flushes the loggers so the metric history on disk matches the checkpoint.

Which checkpoint to resume from, and the metric history: :mod:`dpo_lightning.run.resume`.

The data-loader position is stored by Lightning itself: see
:mod:`dpo_lightning.data.resumable`. A frozen reference is never stored (see
``DPOModule.on_save_checkpoint``).
"""

from __future__ import annotations

import errno
import json
import random
from pathlib import Path
from typing import IO, Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

import dpo_lightning
from dpo_lightning.run.errors import UserError
from dpo_lightning.run.files import atomic_write

META_KEY = "dpo_lightning"  # top-level checkpoint key of our metadata


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (the previous one is kept)."""


# -- writing and reading ----------------------------------------------------------------------
class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temp file in the same folder, fsync, then ``os.replace``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        path = Path(path)
        try:
            atomic_write(path, lambda f: self.write(f, checkpoint))
        except OSError as err:
            reason = "disk full" if err.errno == errno.ENOSPC else err.strerror or str(err)
            kept = [p.name for p in sorted(path.parent.glob("*.ckpt"))]
            raise CheckpointWriteError(
                f"could not write checkpoint {path} ({reason}); previous checkpoints kept: "
                f"{kept or 'none'}; free space, then continue with resume=true"
            ) from err

    def write(self, f: IO[bytes], checkpoint: dict[str, Any]) -> None:
        """Serialise ``checkpoint`` into the open temp file (flushed and fsynced by the caller)."""
        torch.save(checkpoint, f)

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        # Our checkpoints hold tensors and plain containers only: never unpickle code.
        return torch.load(path, map_location=map_location, weights_only=True)


class RollingCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that, without a ``monitor``, keeps the ``keep_last`` newest checkpoints.

    (Lightning only allows ``save_top_k`` in -1/0/1 without a monitored metric, and setting
    ``monitor: step`` makes it postpone epoch-end saves to a validation that may never come.)
    ``last.ckpt`` is kept in addition. With a ``monitor``, it is a plain ``ModelCheckpoint``.

    Args:
        keep_last: newest periodic checkpoints to keep (None: follow ``save_top_k``).
        **kwargs: ``ModelCheckpoint`` arguments.
    """

    def __init__(self, keep_last: int | None = None, **kwargs: Any) -> None:
        self.keep_last = keep_last if kwargs.get("monitor") is None else None
        if self.keep_last is not None:
            if self.keep_last < 1:
                raise UserError(f"callbacks.checkpoint.keep_last must be >= 1, got {keep_last}")
            kwargs["save_top_k"] = -1  # we prune ourselves
        super().__init__(**kwargs)
        self._kept: list[str] = []

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        if self.keep_last is None or Path(filepath).stem == self.CHECKPOINT_NAME_LAST:
            return
        self._kept = [p for p in self._kept if p != filepath] + [filepath]
        while len(self._kept) > self.keep_last:
            self._remove_checkpoint(trainer, self._kept.pop(0))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "kept": list(self._kept)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._kept = list(state_dict.get("kept", []))


# -- what a checkpoint holds besides Lightning's own state ------------------------------------
def rng_states() -> dict[str, Any]:
    """Python, numpy and torch (CPU and CUDA) generator states, as weights_only-loadable types."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    states = {
        "python": random.getstate(),
        "numpy": (
            np_kind,
            torch.from_numpy(np_keys.astype(np.int64)),
            np_pos,
            np_has_gauss,
            np_gauss,
        ),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(_tuples(states["python"]))
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _tuples(value: Any) -> Any:
    # random.setstate needs tuples; a round trip through some serialisers gives lists.
    return tuple(_tuples(v) for v in value) if isinstance(value, list | tuple) else value


class ResumeState(L.Callback):
    """Stores config, version and RNG states in each checkpoint; restores the RNGs on resume.

    Also flushes every logger when a checkpoint is written and again once the checkpointed step's
    own metrics have been logged (the first batch after it), so rows on disk cover every step up to
    the checkpoint even when the process is killed later.

    Args:
        config: :func:`run_config` of the run.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self._rng_to_restore: dict[str, Any] | None = None
        self._flush_pending = False

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[META_KEY] = {
            "version": dpo_lightning.__version__,
            "config": json.dumps(self.config, sort_keys=True),
            "rng": rng_states(),
        }
        _flush(trainer)
        self._flush_pending = True

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        meta = checkpoint.get(META_KEY) or {}
        self._rng_to_restore = meta.get("rng")

    # Restored at the first resumed batch, not at load: Lightning draws from the RNGs while it
    # sets up, which the uninterrupted run did not do at this point.
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._rng_to_restore is not None:
            set_rng_states(self._rng_to_restore)
            self._rng_to_restore = None
        if self._flush_pending:
            _flush(trainer)
            self._flush_pending = False


def _flush(trainer: L.Trainer) -> None:
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.save()
