"""Crash-safe checkpoints and exact resume.

- :class:`AtomicCheckpointIO` writes through :func:`~dpo_lightning.run.files.atomic_write`
  (temp file + fsync + ``os.replace``): a crash or a full disk mid-write leaves the previous
  checkpoint intact; it hashes the bytes as they are written and records the digest beside the
  file (:mod:`dpo_lightning.run.integrity`); loads use ``torch.load(weights_only=True)``.
- :class:`RollingCheckpoint` is ``ModelCheckpoint`` keeping the ``keep_last`` newest files; it
  records the digests of sharded (folder) checkpoints once every rank wrote them.
- :class:`ResumeState` adds to every checkpoint the run's config (to refuse a resume with a
  changed config), the data fingerprint (to refuse a resume on changed data), the package version
  and the python / numpy / torch RNG states, restores the RNGs on resume, and flushes the loggers
  so the metric history on disk matches the checkpoint.

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
from dpo_lightning.run import integrity
from dpo_lightning.run.errors import UserError
from dpo_lightning.run.files import atomic_write

META_KEY = "dpo_lightning"  # top-level checkpoint key of our metadata


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (the previous one is kept)."""


class DataChangedError(UserError):
    """A resume on data that differs from the checkpoint's (without ``resume_on_changed_data``)."""


# -- writing and reading ----------------------------------------------------------------------
class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temp file in the same folder, fsync, then ``os.replace``; the digest
    of the bytes written is recorded beside the file before the rename."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        path = Path(path)
        hashed: list[integrity.HashingFile] = []

        def write(f: IO[bytes]) -> None:
            hashed.append(integrity.HashingFile(f))
            self.write(hashed[0], checkpoint)

        def record() -> None:
            integrity.write_file_record(path, hashed[0], checkpoint.get("global_step"))

        try:
            atomic_write(path, write, before_replace=record)
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

    def remove_checkpoint(self, path: Any) -> None:
        super().remove_checkpoint(path)
        integrity.drop_record(path)


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
        # A sharded checkpoint is rewritten in place: no digest until every rank wrote it again.
        if trainer.is_global_zero and Path(filepath).is_dir():
            integrity.drop_record(filepath)
        pruned: list[str] = []
        if self.keep_last is not None and Path(filepath).stem != self.CHECKPOINT_NAME_LAST:
            # Decided before the save: the list stored in this checkpoint is what stays after it.
            kept = [p for p in self._kept if p != filepath] + [filepath]
            pruned, self._kept = kept[: -self.keep_last], kept[-self.keep_last :]
        super()._save_checkpoint(trainer, filepath)
        # Collective (every rank calls this): the decision is rank 0's, and once every rank took
        # part every shard is on disk.
        folder = trainer.strategy.reduce_boolean_decision(
            trainer.is_global_zero and Path(filepath).is_dir(), all=False
        )
        if folder and trainer.is_global_zero:
            integrity.write_folder_record(Path(filepath), trainer.global_step)
        for old in pruned:
            self._remove_checkpoint(trainer, old)

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


# -- the data a checkpoint was trained on ------------------------------------------------------
#: DataModule attribute of each split whose fingerprint a checkpoint stores.
SPLITS = {"train": "train_set", "validation": "val_set"}


def data_fingerprint(datamodule: Any) -> dict[str, dict[str, Any]] | None:
    """``{split: {"rows": n, "fingerprint": hex}}`` of the tokenized splits, or None for a
    DataModule without ``datasets`` splits.

    The fingerprint is the DataModule's own digest of each split's content (its rows in order,
    the tokenizer and the length limits: ``PreferenceDataModule.fingerprints``), else the
    ``datasets`` fingerprint of the split: any change of a row's text, order or count changes it,
    and only in the split that changed.
    """
    own = getattr(datamodule, "fingerprints", None) or {}
    out = {}
    for split, attr in SPLITS.items():
        ds = getattr(datamodule, attr, None)
        fingerprint = own.get(split) or getattr(ds, "_fingerprint", None)
        if fingerprint is None:
            return None
        out[split] = {"rows": len(ds), "fingerprint": fingerprint}
    return out


def data_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between two :func:`data_fingerprint` values, one phrase per split."""
    changes = []
    for split in SPLITS:
        before, after = saved.get(split) or {}, now.get(split) or {}
        if before.get("fingerprint") == after.get("fingerprint"):
            continue
        rows = (before.get("rows"), after.get("rows"))
        same = f"same {rows[0]} rows, content differs"
        changes.append(f"{split}: {f'{rows[0]} -> {rows[1]} rows' if rows[0] != rows[1] else same}")
    return changes


class ResumeState(L.Callback):
    """Stores config, data fingerprint, version and RNG states in each checkpoint; on resume
    refuses changed data and restores the RNGs.

    Also flushes every logger when a checkpoint is written and again once the checkpointed step's
    own metrics have been logged (the first batch after it), so rows on disk cover every step up to
    the checkpoint even when the process is killed later.

    Args:
        config: :func:`run_config` of the run.
        allow_changed_data: resume even when the data differs from the checkpoint's (the
            ``resume_on_changed_data`` key); the changes are printed.
    """

    def __init__(self, config: dict[str, Any], allow_changed_data: bool = False) -> None:
        self.config = config
        self.allow_changed_data = allow_changed_data
        self._rng_to_restore: dict[str, Any] | None = None
        self._flush_pending = False
        self._data: dict[str, Any] | None = None

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[META_KEY] = {
            "version": dpo_lightning.__version__,
            "config": json.dumps(self.config, sort_keys=True),
            "rng": rng_states(),
            "data": self._fingerprint(trainer),
        }
        _flush(trainer)
        self._flush_pending = True

    def _fingerprint(self, trainer: L.Trainer) -> dict[str, Any] | None:
        if self._data is None:  # the splits do not change during a run
            self._data = data_fingerprint(trainer.datamodule)
        return self._data

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        meta = checkpoint.get(META_KEY) or {}
        self._check_data(trainer, meta.get("data"))
        self._rng_to_restore = meta.get("rng")

    def _check_data(self, trainer: L.Trainer, saved: dict[str, Any] | None) -> None:
        now = self._fingerprint(trainer)
        changes = data_changes(saved, now) if saved is not None and now is not None else []
        if not changes:
            return
        if not self.allow_changed_data:
            raise DataChangedError(
                f"checkpoint {trainer.ckpt_path} was trained on other data ({'; '.join(changes)}): "
                "resume with the original data, start a new run directory, or set "
                "resume_on_changed_data=true to continue on the new data"
            )
        if trainer.is_global_zero:
            print(
                f"[dpo_lightning] resume_on_changed_data=true: resuming on changed data: {'; '.join(changes)}"
            )

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
