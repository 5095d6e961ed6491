"""Checkpoint digests: every checkpoint has a ``<name>.sha256.json`` beside it, checked before
any resume, so a flipped bit, a truncated copy or a half-written folder is refused in one line
that names the newest checkpoint still intact.

- A **single-file** checkpoint (``last.ckpt``, ``step8.ckpt``) is hashed while it is written
  (:class:`HashingFile`: no second read), and its digest file is written after the checkpoint's
  bytes are on disk and *before* the rename that publishes them. The digest file accepts the new
  file and the file it replaces, so a crash between the two renames leaves the old checkpoint
  under a digest file that still accepts it: no crash makes an intact checkpoint look corrupt.
- A **sharded** checkpoint (a folder: FSDP2's per-rank ``torch.distributed.checkpoint`` shards,
  ``.metadata`` and Lightning's ``meta.pt``) is hashed file by file once every rank wrote it (by
  rank 0: distributed checkpoints need a filesystem every rank sees). DCP rewrites a folder in
  place, so its digest file is deleted before the rewrite: a crash mid-write leaves a folder
  without one, refused as incomplete (the write itself is not atomic; it is detected, not
  prevented). Missing, extra and changed files are all named.

Stdlib plus the two leaves ``errors`` and ``files``: any folder may import it.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import IO, Any

from dpo_lightning.run.errors import UserError
from dpo_lightning.run.files import atomic_write_text

SUFFIX = ".sha256.json"
FORMAT = 1
CHUNK = 8 << 20  # bytes read per hash update
KEEP_ACCEPTED = 4  # digests a file's record accepts: the new one + what the old record accepted


class CorruptCheckpointError(UserError):
    """A checkpoint does not match the digest recorded when it was written."""


def digest_path(checkpoint: str | Path) -> Path:
    """``<checkpoint>.sha256.json`` beside the file or folder."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name + SUFFIX)


class HashingFile:
    """A binary file wrapper that hashes (sha256) and counts every byte written through it."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.sha256.update(view)
        self.bytes += view.nbytes
        return self._f.write(view)

    def __getattr__(self, name: str) -> Any:  # flush, fileno, ...
        return getattr(self._f, name)


def file_digest(path: Path) -> dict[str, Any]:
    """``{"sha256": hex, "bytes": n}`` of a file, read in :data:`CHUNK` pieces."""
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            n += len(chunk)
    return {"sha256": h.hexdigest(), "bytes": n}


def read_record(checkpoint: str | Path) -> dict[str, Any] | None:
    """The digest record of ``checkpoint``, or None when it has none (or it is unreadable)."""
    try:
        record = json.loads(digest_path(checkpoint).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("format") == FORMAT else None


def write_file_record(checkpoint: Path, written: HashingFile, step: int | None) -> None:
    """Record the digest of a file about to be renamed onto ``checkpoint`` (call it before the
    rename): the new digest, plus the ones the old record accepted (the file still there)."""
    old = read_record(checkpoint)
    kept = old.get("accept", []) if old and old.get("kind") == "file" else []
    new = {"sha256": written.sha256.hexdigest(), "bytes": written.bytes}
    accept = [new, *[d for d in kept if d != new]][:KEEP_ACCEPTED]
    _write(checkpoint, {"kind": "file", "accept": accept}, step)


def write_folder_record(folder: Path, step: int | None) -> None:
    """Record the digest of every file in a complete sharded checkpoint ``folder``."""
    files = {p.relative_to(folder).as_posix(): file_digest(p) for p in _files(folder)}
    _write(folder, {"kind": "folder", "files": files}, step)


def drop_record(checkpoint: str | Path) -> None:
    digest_path(checkpoint).unlink(missing_ok=True)


def _write(checkpoint: Path, body: dict[str, Any], step: int | None) -> None:
    record = {"format": FORMAT, "global_step": step, "written": time.time(), **body}
    atomic_write_text(digest_path(checkpoint), json.dumps(record, indent=1) + "\n")


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def problem(checkpoint: str | Path) -> str | None:
    """What is wrong with ``checkpoint`` against its digest record, or None when it is intact."""
    checkpoint = Path(checkpoint)
    record = read_record(checkpoint)
    if record is None:
        return (
            f"it has no digest file {digest_path(checkpoint).name} (its write did not finish, or it was "
            "copied without it)"
        )
    if record["kind"] == "folder":
        return _folder_problem(checkpoint, record["files"]) if checkpoint.is_dir() else "it is not a folder"
    if not checkpoint.is_file():
        return "it is not a file"
    accepted = record["accept"]
    size = checkpoint.stat().st_size
    if size not in {d["bytes"] for d in accepted}:
        return f"it has {size} bytes, {accepted[0]['bytes']} were written"
    if file_digest(checkpoint) not in accepted:
        return "its sha256 differs from the one recorded when it was written"
    return None


def _folder_problem(folder: Path, expected: dict[str, dict[str, Any]]) -> str | None:
    found = {p.relative_to(folder).as_posix(): p for p in _files(folder)}
    if missing := sorted(set(expected) - set(found)):
        return f"files missing: {', '.join(missing)}"
    if extra := sorted(set(found) - set(expected)):
        return f"files not written with it: {', '.join(extra)}"
    changed = [name for name, path in found.items() if file_digest(path) != expected[name]]
    return f"files changed since they were written: {', '.join(changed)}" if changed else None


def newest_intact(checkpoint: str | Path) -> tuple[Path, int | None] | None:
    """The most recently written intact checkpoint beside ``checkpoint`` (not itself), with its
    step, or None."""
    checkpoint = Path(checkpoint)
    candidates = []
    for record_file in checkpoint.parent.glob(f"*{SUFFIX}"):
        other = record_file.with_name(record_file.name[: -len(SUFFIX)])
        record = read_record(other)
        if other != checkpoint and other.exists() and record is not None:
            candidates.append((record.get("written", 0), other, record.get("global_step")))
    for _, other, step in sorted(candidates, key=lambda c: c[0], reverse=True):
        if problem(other) is None:
            return other, step
    return None


def check_intact(checkpoint: str | Path) -> None:
    """Raise :class:`CorruptCheckpointError` (one line, naming the newest intact checkpoint)
    unless ``checkpoint`` matches its digest record."""
    issue = problem(checkpoint)
    if issue is None:
        return
    fallback = newest_intact(checkpoint)
    if fallback is None:
        hint = (
            f"no intact checkpoint is left in {Path(checkpoint).parent}: start again in a new run "
            "directory (hydra.run.dir=<new dir>) or here with overwrite=true"
        )
    else:
        path, step = fallback
        hint = f"the newest intact checkpoint is {path} (step {step}): resume from it with ckpt_path={path}"
    raise CorruptCheckpointError(f"checkpoint {checkpoint} is not intact ({issue}); {hint}")
