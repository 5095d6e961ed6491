"""One run per run directory, and never a new run silently mixed with an older one.

:func:`claim_run_dir` (called by preflight, in the run's first process only: DDP ranks > 0 and
the processes of other nodes belong to the same run and share its claim):

- **Lock**: ``<run dir>/.dpo_lightning/lock`` is locked with ``flock`` for as long as the process
  lives. A second ``dpo-train`` in the same directory fails in one line naming the holder's PID
  and host. The kernel drops the lock when its process dies, however it dies, so the lock of a
  SIGKILLed run is taken over (a note names the dead holder); no PID guessing, no stale files to
  delete by hand. Where the filesystem has no ``flock``, a lock whose PID is gone on this host is
  taken over and any other is respected.
- **An earlier run**: a directory holding ``checkpoints/``, ``csv/metrics.csv``, ``summary.json``
  or ``hf_model/`` is refused unless the command continues that run (``resume=true``, or a
  ``ckpt_path`` inside the directory) or says ``overwrite=true``, which deletes those (and
  ``csv/``) first.
  Without this Lightning would delete the old metrics and write ``last-v1.ckpt`` beside the old
  ``last.ckpt``, which a later ``resume=true`` would pick up.
- **Hydra's record**: Hydra rewrites ``.hydra/`` before any of this runs; a claimed directory
  keeps a copy of it (``.dpo_lightning/hydra/``), and a refused command puts the owner's copy back.

:func:`release_run_dirs` unlocks: ``dpo-train`` at the end of each job, any process at exit, and
a process that calls ``train()`` again (one run at a time per process) first drops the locks of
its earlier calls.
"""

from __future__ import annotations

import atexit
import errno
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from dpo_lightning.run.errors import UserError
from dpo_lightning.run.files import atomic_write

STATE_DIR = ".dpo_lightning"
#: What a run leaves in its directory (besides Hydra's own files and this module's).
RUN_ARTEFACTS = ("checkpoints", "csv/metrics.csv", "summary.json", "hf_model")
#: Deleted by ``overwrite=true``.
CLEARED = ("checkpoints", "csv", "summary.json", "hf_model")
#: Environment variables that give a process's rank (torchrun, Lightning's launcher, SLURM, LSF).
RANK_VARS = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")

_held: dict[Path, int] = {}  # run dir -> open, flocked lock file descriptor


class RunDirInUseError(UserError):
    """Another live process holds the run directory's lock."""


class EarlierRunError(UserError):
    """The run directory holds an earlier run and the command neither continues nor replaces it."""


def is_first_process() -> bool:
    """True in the process that owns the run (global rank 0, or no distributed launch)."""
    return all(os.environ.get(var, "0").strip() in ("", "0") for var in RANK_VARS)


@contextmanager
def claim_run_dir(cfg: DictConfig) -> Iterator[None]:
    """Lock the run directory and refuse it when it holds an earlier run (module docstring);
    the checks run inside the ``with`` block (resume checks) may still refuse the command.

    A refused command (here or in the block) gives the lock back and puts the owner's
    ``.hydra/`` back; an accepted one keeps the lock, applies ``overwrite=true`` and keeps a copy
    of its own ``.hydra/``.
    """
    if not is_first_process():
        yield
        return
    run_dir = Path(cfg.paths.output_dir)
    # One train() at a time per process: locks of earlier calls (a sweep, a pipeline, a
    # notebook) belong to finished runs.
    release_run_dirs([d for d in _held if d != run_dir.resolve()])
    record = _hydra_record(run_dir)
    acquired = run_dir.resolve() not in _held
    try:
        lock_run_dir(run_dir)
        check_earlier_run(run_dir, cfg)
        yield
    except BaseException:
        if acquired:
            release_run_dirs([run_dir])
        _restore(run_dir, record)
        raise
    if cfg.get("overwrite"):
        clear_run(run_dir)
    _keep(run_dir, record)


# -- the lock ----------------------------------------------------------------------------------
def lock_path(run_dir: Path) -> Path:
    return run_dir / STATE_DIR / "lock"


def lock_run_dir(run_dir: Path) -> None:
    """Take the run directory's lock (re-entrant within a process), or raise naming the holder."""
    key = run_dir.resolve()
    if key in _held:
        return
    path = lock_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        holder = _read_holder(fd)
        if not _flock(fd, holder):
            raise RunDirInUseError(
                f"run directory {run_dir} is in use by PID {holder.get('pid', '?')} on "
                f"{holder.get('host', '?')} (since {holder.get('started', '?')}): wait for that run to "
                "end, or use another directory (hydra.run.dir=<dir>)"
            )
    except BaseException:
        os.close(fd)
        raise
    if holder:  # a lock file with content whose holder is gone: it was killed
        print(
            f"[dpo_lightning] {run_dir}: taking over the lock of PID {holder.get('pid')} on "
            f"{holder.get('host')} (no longer running)"
        )
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    os.fsync(fd)
    _held[key] = fd


def _flock(fd: int, holder: dict[str, Any]) -> bool:
    """Lock ``fd`` without waiting; False when a live process holds it."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as err:  # a filesystem without flock: judge by the recorded PID
        if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
        return not holder or (holder.get("host") == socket.gethostname() and not _alive(holder.get("pid")))


def _alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return True  # someone else's process (or an unreadable record): assume it runs
    return True


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except ValueError:
        return {"pid": "?", "host": "?"}


def release_run_dirs(run_dirs: list[Path] | None = None) -> None:
    """Unlock ``run_dirs`` (all held when None); an emptied lock file marks a clean release."""
    keys = list(_held) if run_dirs is None else [Path(d).resolve() for d in run_dirs]
    for key in keys:
        fd = _held.pop(key, None)
        if fd is not None:
            os.ftruncate(fd, 0)
            os.close(fd)  # drops the flock


atexit.register(release_run_dirs)


# -- an earlier run in the directory -----------------------------------------------------------
def earlier_run(run_dir: Path) -> list[str]:
    """The artefacts of an earlier run in ``run_dir`` (relative names), if any."""
    found = []
    for name in RUN_ARTEFACTS:
        path = run_dir / name
        if path.is_file() or (path.is_dir() and any(path.iterdir())):
            found.append(name)
    return found


def continues_run(run_dir: Path, cfg: DictConfig) -> bool:
    """``resume=true``, or a ``ckpt_path`` inside ``run_dir`` (a checkpoint of another directory
    starts a new history here: Lightning would write ``last-v1.ckpt`` beside an old one)."""
    ckpt = cfg.get("ckpt_path")
    return bool(cfg.get("resume")) or (bool(ckpt) and run_dir.resolve() in Path(ckpt).resolve().parents)


def check_earlier_run(run_dir: Path, cfg: DictConfig) -> None:
    continues = continues_run(run_dir, cfg)
    if cfg.get("overwrite") and continues:
        raise UserError("overwrite=true deletes the run that resume=true / ckpt_path continues: choose one")
    found = earlier_run(run_dir)
    if not found or continues or cfg.get("overwrite"):
        return
    has_last = (run_dir / "checkpoints" / "last.ckpt").exists()
    resume = "continue it with resume=true" if has_last else "(it has no checkpoints/last.ckpt to resume)"
    raise EarlierRunError(
        f"run directory {run_dir} holds an earlier run ({', '.join(found)}): {resume}; or start a "
        "new run in another directory (hydra.run.dir=<new dir>); or delete that run and start "
        "again here with overwrite=true"
    )


def clear_run(run_dir: Path) -> None:
    """``overwrite=true``: delete the earlier run's checkpoints, metrics, summary and export."""
    removed = []
    for name in CLEARED:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(name)
    if removed:
        print(f"[dpo_lightning] overwrite=true: deleted {', '.join(removed)} of the earlier run in {run_dir}")


# -- Hydra's record of the run -----------------------------------------------------------------
def _hydra_record(run_dir: Path) -> Path | None:
    """``.hydra/`` when Hydra writes it into ``run_dir`` (not for runs nested in another job)."""
    from hydra.core.hydra_config import HydraConfig

    try:
        hydra = HydraConfig.get()
        if hydra.output_subdir is None or Path(hydra.runtime.output_dir).resolve() != run_dir.resolve():
            return None
    except Exception:  # not under Hydra, or composed without a runtime (tests)
        return None
    return run_dir / hydra.output_subdir


def _keep(run_dir: Path, record: Path | None) -> None:
    _copy(record, run_dir / STATE_DIR / "hydra")


def _restore(run_dir: Path, record: Path | None) -> None:
    if record is not None and (run_dir / STATE_DIR / "hydra").is_dir():
        _copy(run_dir / STATE_DIR / "hydra", record)


def _copy(src: Path | None, dst: Path) -> None:
    if src is None or not src.is_dir():
        return
    for file in src.glob("*.yaml"):
        data = file.read_bytes()
        atomic_write(dst / file.name, lambda f, data=data: f.write(data))
