"""Resuming a run: which checkpoint, whether it may be used, and the metric history.

- :func:`resolve_ckpt_path` / :func:`check_checkpoint` turn ``resume=true`` or ``ckpt_path=...``
  into a checkpoint path, failing with one clear line when it is missing, damaged (it does not
  match the digest recorded when it was written: :mod:`dpo_lightning.run.integrity`; the newest
  intact checkpoint is named), not ours, from another version, or was trained with a different
  config (the differing keys are named). Changed *data* is caught once the data is loaded
  (:class:`~dpo_lightning.run.checkpointing.ResumeState`).
- :class:`MetricsHistory` keeps ``csv/metrics.csv`` rows written before the checkpoint's step
  (Lightning's CSVLogger would delete the file) and drops the ones after it, so a resumed run's
  history has no duplicated or missing steps.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

import dpo_lightning
from dpo_lightning.run.checkpointing import META_KEY
from dpo_lightning.run.errors import UserError
from dpo_lightning.run.integrity import check_intact, read_record
from dpo_lightning.run.rundir import is_first_process

# Config groups that define the trained model; a resume must not change any key in them.
RUN_DEFINING = ("seed", "model", "data", "loss", "reference", "optim", "trainer", "train", "online")
# Keys inside those groups that may differ between the run and its resume.
# Keys a resume may change. ``trainer.max_steps``: continuing a finished or killed run for longer
# is routine (the LR schedule is then rebuilt for the new length, so only an unchanged
# max_steps reproduces an uninterrupted run bit for bit).
RESUME_MAY_CHANGE = ("trainer.default_root_dir", "trainer.enable_progress_bar", "trainer.max_steps")
# Where the data comes from: may change too when the user opts in with resume_on_changed_data.
DATA_SOURCE = ("data.path", "data.name", "data.generator")


def run_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved run-defining config as ``{"dotted.key": value}`` (JSON-serialisable)."""
    flat: dict[str, Any] = {}
    for group in RUN_DEFINING:
        if group in cfg:
            value = cfg[group]
            _flatten(
                OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value,
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
        if not (path.is_file() or is_sharded_checkpoint(path)):
            raise UserError(
                f"ckpt_path={cfg.ckpt_path!r} does not exist (give a .ckpt file, or the folder of "
                "a sharded FSDP checkpoint)"
            )
        return str(path)
    if not cfg.get("resume"):
        return None
    run_dir = Path(cfg.paths.output_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    if not (last.is_file() or is_sharded_checkpoint(last)):
        raise UserError(
            f"resume=true but {last} does not exist: pass the run directory to continue with "
            "hydra.run.dir=<run dir> (it must hold checkpoints/last.ckpt), or use ckpt_path=<file>"
        )
    return str(last)


def is_sharded_checkpoint(path: Path) -> bool:
    """A distributed (FSDP2) checkpoint: a folder of per-rank shards plus Lightning's ``meta.pt``
    holding everything but the weights (our metadata included)."""
    return path.is_dir() and (path / _METADATA_FILENAME).is_file()


def check_checkpoint(path: str, cfg: DictConfig) -> dict[str, Any]:
    """Check ``path`` against its digest, load it (weights_only) and check it was written by this
    version with this config.

    The digest is checked by the run's first process only: DDP ranks started later by Lightning
    find it checked, and reading every byte once per rank would multiply the cost. A file without
    a digest record is first asked whether it is ours and of this version (the clearer message
    for a foreign or old checkpoint), then refused for the missing record.

    Returns the checkpoint's metadata (``global_step`` included).
    """
    verify = is_first_process()
    recorded = read_record(path) is not None
    if verify and recorded:  # before reading it: a damaged file's metadata says nothing reliable
        check_intact(path)
    sharded = is_sharded_checkpoint(Path(path))
    try:
        file = Path(path) / _METADATA_FILENAME if sharded else path
        ckpt = torch.load(file, map_location="cpu", weights_only=True, mmap=not sharded)
    except Exception as err:
        raise UserError(
            f"cannot read checkpoint {path}: {type(err).__name__}: {err}".splitlines()[0]
        ) from err
    meta = ckpt.get(META_KEY)
    if meta is None:
        raise UserError(f"checkpoint {path} was not written by dpo_lightning (no {META_KEY!r} metadata)")
    if meta["version"] != dpo_lightning.__version__:
        raise UserError(
            f"checkpoint {path} was written by dpo_lightning {meta['version']}, this is "
            f"{dpo_lightning.__version__}: resume with that version (or start a new run)"
        )
    if verify and not recorded:
        check_intact(path)
    diff = config_diff(json.loads(meta["config"]), run_config(cfg))
    if cfg.get("resume_on_changed_data"):
        diff = [d for d in diff if not _is_data_source(d.partition(":")[0])]
    if diff:
        more = f" (+{len(diff) - 4} more)" if len(diff) > 4 else ""
        raise UserError(
            f"checkpoint {path} was trained with a different config: {'; '.join(diff[:4])}{more}; "
            "resume with the original settings, or start a new run directory"
        )
    return {**meta, "global_step": int(ckpt.get("global_step", 0))}


def _is_data_source(key: str) -> bool:
    return any(key == k or key.startswith(f"{k}.") for k in DATA_SOURCE)


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
                self.rows = [r for r in csv.DictReader(f) if r.get("step") and int(r["step"]) < step]
            if step > 0 and not any(int(r["step"]) == step - 1 for r in self.rows):
                # Killed between writing the checkpoint and flushing that step's own metrics.
                print(f"[dpo_lightning] {metrics_file}: no rows for step {step} (lost in the crash)")

    def restore(self, loggers: list[Any]) -> None:
        """Write the kept rows back through the matching CSV logger (after it is created)."""
        if rank_zero_only.rank != 0:  # other ranks hold a dummy experiment; rank 0 writes
            return
        for logger in loggers:
            if isinstance(logger, CSVLogger) and Path(logger.log_dir) == self.metrics_file.parent:
                experiment = logger.experiment  # creating it deleted the old file
                # Drop empty cells: the writer fills missing keys with "" again.
                experiment.metrics[:0] = [{k: v for k, v in r.items() if v != ""} for r in self.rows]
                logger.save()  # on disk at once: a second crash must not lose the history


def csv_histories(loggers: list[Any], step: int) -> list[MetricsHistory]:
    """The kept history of every CSV logger (call before anything creates their writers)."""
    return [
        MetricsHistory(Path(lg.log_dir) / "metrics.csv", step) for lg in loggers if isinstance(lg, CSVLogger)
    ]
