"""Crash-safe checkpoints and exact resume.

- :class:`AtomicCheckpointIO` writes ``<file>.tmp`` + fsync + ``os.replace``: a crash or a full
  disk mid-write leaves the previous checkpoint intact; loads use ``torch.load(weights_only=True)``.
- :class:`ResumeState` adds to every checkpoint the run's config (to refuse a resume with a
  changed config), the package version and the python / numpy / torch RNG states, restores the
  RNGs on resume, and flushes the loggers so the metric history on disk matches the checkpoint.
- :func:`resolve_ckpt_path` / :func:`check_checkpoint` turn ``resume=true`` or ``ckpt_path=...``
  into a checkpoint path, failing with one clear line when it cannot be used.
- :class:`MetricsHistory` keeps ``csv/metrics.csv`` rows written before the checkpoint's step
  (Lightning's CSVLogger would delete the file) and drops the ones after it, so a resumed run's
  history has no duplicated or missing steps.

The data-loader position is stored by Lightning itself: see
:mod:`dpo_lightning.data.resumable`. The frozen reference is never stored (see
``DPOModule.on_save_checkpoint``).
"""

from __future__ import annotations

import csv
import errno
import json
import os
import random
import signal
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf

import dpo_lightning
from dpo_lightning import faults
from dpo_lightning.errors import UserError

META_KEY = "dpo_lightning"  # top-level checkpoint key of our metadata
# Config groups that define the trained model; a resume must not change any key in them.
RUN_DEFINING = ("seed", "model", "data", "loss", "reference", "optim", "trainer", "train")
# Keys inside those groups that may differ between the run and its resume.
RESUME_MAY_CHANGE = ("trainer.default_root_dir", "trainer.enable_progress_bar")


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (the previous one is kept)."""


# -- writing and reading ----------------------------------------------------------------------
class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temp file in the same folder, fsync, then ``os.replace``."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None
    ) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                _maybe_fail_write(f, checkpoint)
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)  # atomic on POSIX: readers see the old or the new file
            _fsync_dir(path.parent)
            for stale in path.parent.glob(f".{path.name}.tmp*"):  # left by a killed writer
                stale.unlink(missing_ok=True)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            reason = "disk full" if err.errno == errno.ENOSPC else err.strerror or str(err)
            kept = [p.name for p in sorted(path.parent.glob("*.ckpt"))]
            raise CheckpointWriteError(
                f"could not write checkpoint {path} ({reason}); previous checkpoints kept: "
                f"{kept or 'none'}; free space (or set paths.output_dir elsewhere) and continue "
                "with resume=true"
            ) from err

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        # Our checkpoints hold tensors and plain containers only: never unpickle code.
        return torch.load(path, map_location=map_location, weights_only=True)


def _maybe_fail_write(f: Any, checkpoint: dict[str, Any]) -> None:
    """Fault injection (tests): a full disk, or a SIGKILL, half-way through this write."""
    step = checkpoint.get("global_step")
    if step is None or step not in (faults.planned("enospc"), faults.planned("killwrite")):
        return
    f.write(b"\0" * 1024)
    f.flush()
    if step == faults.planned("killwrite"):
        os.kill(os.getpid(), signal.SIGKILL)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not supported on this platform / filesystem
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


# -- what a checkpoint must agree on -----------------------------------------------------------
def run_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved run-defining config as ``{"dotted.key": value}`` (JSON-serialisable)."""
    flat: dict[str, Any] = {}
    for group in RUN_DEFINING:
        if group in cfg:
            value = cfg[group]
            _flatten(
                OmegaConf.to_container(value, resolve=True)
                if OmegaConf.is_config(value)
                else value,
                group,
                flat,
            )
    return {k: v for k, v in flat.items() if k not in RESUME_MAY_CHANGE}


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(v, f"{prefix}.{k}", out)
    else:
        out[prefix] = value


def config_diff(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``key: saved -> now`` for every key that differs (missing keys shown as <unset>)."""
    keys = sorted(set(saved) | set(now))
    unset = "<unset>"
    return [
        f"{k}: {saved.get(k, unset)!r} -> {now.get(k, unset)!r}"
        for k in keys
        if saved.get(k, unset) != now.get(k, unset)
    ]


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """The checkpoint to resume from: ``ckpt_path``, or ``<run dir>/checkpoints/last.ckpt``."""
    if cfg.get("ckpt_path"):
        path = Path(cfg.ckpt_path)
        if not path.is_file():
            raise UserError(f"ckpt_path={cfg.ckpt_path!r} does not exist (give a .ckpt file)")
        return str(path)
    if not cfg.get("resume"):
        return None
    run_dir = Path(cfg.paths.output_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    if not last.is_file():
        raise UserError(
            f"resume=true but {last} does not exist: pass the run directory to continue with "
            "hydra.run.dir=<run dir> (it must hold checkpoints/last.ckpt), or use ckpt_path=<file>"
        )
    return str(last)


def check_checkpoint(path: str, cfg: DictConfig) -> dict[str, Any]:
    """Load ``path`` (weights_only) and check it was written by this version with this config.

    Returns the checkpoint's metadata (``global_step`` included).
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise UserError(
            f"cannot read checkpoint {path}: {type(err).__name__}: {err}".splitlines()[0]
        ) from err
    meta = ckpt.get(META_KEY)
    if meta is None:
        raise UserError(
            f"checkpoint {path} was not written by dpo_lightning (no {META_KEY!r} metadata)"
        )
    if meta["version"] != dpo_lightning.__version__:
        raise UserError(
            f"checkpoint {path} was written by dpo_lightning {meta['version']}, this is "
            f"{dpo_lightning.__version__}: resume with that version (or start a new run)"
        )
    diff = config_diff(json.loads(meta["config"]), run_config(cfg))
    if diff:
        more = f" (+{len(diff) - 4} more)" if len(diff) > 4 else ""
        raise UserError(
            f"checkpoint {path} was trained with a different config: {'; '.join(diff[:4])}{more}; "
            "resume with the original settings, or start a new run directory"
        )
    return {**meta, "global_step": int(ckpt.get("global_step", 0))}


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


# -- metric history across a resume ------------------------------------------------------------
class MetricsHistory:
    """Rows of a CSV logger's ``metrics.csv`` logged before ``step`` (read before the logger
    deletes the file), written back in front of the resumed run's rows.

    Lightning labels a step's rows with the number of optimizer steps before it, so a checkpoint
    after ``step`` steps keeps rows labelled ``< step``; the resumed run logs the rest again.
    """

    def __init__(self, metrics_file: Path, step: int) -> None:
        self.metrics_file = metrics_file
        self.rows: list[dict[str, str]] = []
        if metrics_file.is_file():
            with open(metrics_file, newline="") as f:
                self.rows = [
                    r for r in csv.DictReader(f) if r.get("step") and int(r["step"]) < step
                ]
            if step > 0 and not any(int(r["step"]) == step - 1 for r in self.rows):
                # Killed between writing the checkpoint and flushing that step's own metrics.
                print(
                    f"[dpo_lightning] {metrics_file}: no rows for step {step} (lost in the crash)"
                )

    def restore(self, loggers: list[Any]) -> None:
        """Write the kept rows back through the matching CSV logger (after it is created)."""
        for logger in loggers:
            if isinstance(logger, CSVLogger) and Path(logger.log_dir) == self.metrics_file.parent:
                experiment = logger.experiment  # creating it deleted the old file
                # Drop empty cells: the writer fills missing keys with "" again.
                experiment.metrics[:0] = [
                    {k: v for k, v in r.items() if v != ""} for r in self.rows
                ]
                logger.save()  # on disk at once: a second crash must not lose the history


def csv_histories(loggers: list[Any], step: int) -> list[MetricsHistory]:
    """The kept history of every CSV logger (call before anything creates their writers)."""
    return [
        MetricsHistory(Path(lg.log_dir) / "metrics.csv", step)
        for lg in loggers
        if isinstance(lg, CSVLogger)
    ]
