"""Crash-safe file writes: a reader sees the old file or the new one, never half of one.

A leaf module (stdlib and torch only): checkpoints, the reference cache and ``summary.json`` all
write through :func:`atomic_write`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch


def atomic_write(
    path: str | Path,
    write: Callable[[IO[bytes]], None],
    before_replace: Callable[[], None] | None = None,
) -> None:
    """``write(f)`` into a temporary file beside ``path``, fsync, then rename it over ``path``.

    The temporary file is ``.<name>.tmp<pid>``; on failure it is removed and the error raised,
    and after a success any temporary left by a killed writer is removed too. The folder is
    fsynced after the rename, so the new name survives a power loss. ``before_replace`` runs
    after the temporary file is complete on disk and before the rename (a checkpoint's digest
    file is written there, so no crash can leave a renamed file without its digest).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)  # atomic on POSIX
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    for stale in path.parent.glob(f".{path.name}.tmp*"):
        stale.unlink(missing_ok=True)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj)`` through :func:`atomic_write`."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | Path, text: str) -> None:
    """UTF-8 ``text`` through :func:`atomic_write`."""
    atomic_write(path, lambda f: f.write(text.encode()))


def fsync_dir(folder: Path) -> None:
    """fsync a folder (its entries), where the platform allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not supported on this platform / filesystem
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
