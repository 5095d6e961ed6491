"""Checkpoint digests (:mod:`dpo_lightning.run.integrity`): what is detected, and what is not
mistaken for damage.

Unit level: files written through the production :class:`AtomicCheckpointIO`, folders laid out as
FSDP2 writes them. The end-to-end runs are in ``tests/test_run_safety.py``.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from dpo_lightning.run.checkpointing import AtomicCheckpointIO
from dpo_lightning.run.errors import UserError
from dpo_lightning.run.integrity import (
    CorruptCheckpointError,
    HashingFile,
    check_intact,
    digest_path,
    file_digest,
    newest_intact,
    problem,
    write_folder_record,
)


def _save(path, step: int, value: float = 1.0) -> None:
    AtomicCheckpointIO().save_checkpoint({"global_step": step, "w": torch.full((256,), value)}, path)


def _flip(path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if offset is None else offset] ^= 0x01  # one bit
    path.write_bytes(bytes(data))


def test_hashing_file_hashes_exactly_what_it_writes(tmp_path):
    with open(tmp_path / "f", "wb") as f:
        hashed = HashingFile(f)
        hashed.write(b"abc")
        hashed.write(memoryview(b"defg"))
        hashed.flush()
    assert {"sha256": hashed.sha256.hexdigest(), "bytes": hashed.bytes} == file_digest(tmp_path / "f")
    assert hashed.bytes == 7


def test_written_checkpoint_has_a_record_of_its_bytes(tmp_path):
    path = tmp_path / "last.ckpt"
    _save(path, step=4)
    record = json.loads(digest_path(path).read_text())
    assert record["kind"] == "file" and record["global_step"] == 4
    assert record["accept"][0] == file_digest(path)  # hashed while written = hashed after
    assert problem(path) is None


@pytest.mark.parametrize("damage", ["bit flip", "truncated", "appended", "no record"])
def test_damaged_file_is_detected(tmp_path, damage):
    path = tmp_path / "last.ckpt"
    _save(path, step=4)
    if damage == "bit flip":
        _flip(path)
        expected = "sha256 differs"
    elif damage == "truncated":
        os.truncate(path, path.stat().st_size - 100)
        expected = "bytes"
    elif damage == "appended":
        path.write_bytes(path.read_bytes() + b"\0")
        expected = "bytes"
    else:
        digest_path(path).unlink()
        expected = "no digest file last.ckpt.sha256.json"
    assert expected in problem(path)


def test_a_flip_anywhere_is_detected(tmp_path):
    # Zip headers, pickle and tensor bytes alike: the first, a middle and the last byte.
    path = tmp_path / "a.ckpt"
    _save(path, step=1)
    size = path.stat().st_size
    for offset in (0, size // 2, size - 1):
        _flip(path, offset)
        assert problem(path) is not None, offset
        _flip(path, offset)  # undo
        assert problem(path) is None


def test_crash_between_record_and_rename_keeps_the_old_file_valid(tmp_path, monkeypatch):
    """The record is written before the rename; killed in between, the old file is still there
    and still accepted (not reported as damaged), and the next save starts clean."""
    path = tmp_path / "last.ckpt"
    _save(path, step=4)
    old = file_digest(path)

    real_replace = os.replace

    def killed(src, dst):  # the record's rename goes through; the process dies before the file's
        if str(dst).endswith(".ckpt"):
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        _save(path, step=8, value=2.0)
    monkeypatch.undo()
    record = json.loads(digest_path(path).read_text())
    assert record["global_step"] == 8 and old in record["accept"]  # new record, old file
    assert torch.load(path, weights_only=True)["global_step"] == 4
    assert problem(path) is None
    _save(path, step=12, value=3.0)
    assert problem(path) is None and torch.load(path, weights_only=True)["global_step"] == 12
    assert len(json.loads(digest_path(path).read_text())["accept"]) <= 4


def test_refusal_names_the_newest_intact_checkpoint(tmp_path, monkeypatch):
    times = iter(range(100))
    monkeypatch.setattr("dpo_lightning.run.integrity.time.time", lambda: float(next(times)))
    for step in (2, 4):
        _save(tmp_path / f"step{step}.ckpt", step=step)
    _save(tmp_path / "last.ckpt", step=4)
    _flip(tmp_path / "last.ckpt")
    assert newest_intact(tmp_path / "last.ckpt") == (tmp_path / "step4.ckpt", 4)
    with pytest.raises(CorruptCheckpointError) as err:
        check_intact(tmp_path / "last.ckpt")
    line = str(err.value)
    assert "\n" not in line and isinstance(err.value, UserError)
    assert f"{tmp_path / 'last.ckpt'} is not intact (its sha256 differs" in line
    assert f"the newest intact checkpoint is {tmp_path / 'step4.ckpt'} (step 4)" in line
    assert f"ckpt_path={tmp_path / 'step4.ckpt'}" in line

    _flip(tmp_path / "step4.ckpt")  # then the next one back
    assert newest_intact(tmp_path / "last.ckpt") == (tmp_path / "step2.ckpt", 2)
    _flip(tmp_path / "step2.ckpt")
    with pytest.raises(CorruptCheckpointError, match=r"no intact checkpoint is left in .*overwrite=true"):
        check_intact(tmp_path / "last.ckpt")


def test_removing_a_checkpoint_removes_its_record(tmp_path):
    path = tmp_path / "step2.ckpt"
    _save(path, step=2)
    AtomicCheckpointIO().remove_checkpoint(path)
    assert list(tmp_path.iterdir()) == []


# -- sharded (folder) checkpoints ----------------------------------------------------------------
def _sharded(folder):
    """The layout FSDP2 writes: one .distcp per rank, DCP's .metadata, Lightning's meta.pt."""
    folder.mkdir()
    for name, size in (("__0_0.distcp", 3000), ("__1_0.distcp", 3000), (".metadata", 200)):
        (folder / name).write_bytes(os.urandom(size))
    torch.save({"global_step": 2}, folder / "meta.pt")
    write_folder_record(folder, step=2)
    return folder


@pytest.mark.parametrize(
    "damage,expected",
    [
        (lambda f: _flip(f / "__1_0.distcp"), "files changed since they were written: __1_0.distcp"),
        (lambda f: (f / "__0_0.distcp").unlink(), "files missing: __0_0.distcp"),
        (lambda f: (f / "__2_0.distcp").write_bytes(b"x"), "files not written with it: __2_0.distcp"),
        (lambda f: digest_path(f).unlink(), "no digest file"),
    ],
    ids=["changed shard", "missing shard", "extra shard", "no record"],
)
def test_damaged_sharded_checkpoint_is_detected(tmp_path, damage, expected):
    folder = _sharded(tmp_path / "last.ckpt")
    assert problem(folder) is None
    damage(folder)
    assert expected in problem(folder)


def test_sharded_checkpoint_has_no_record_while_it_is_rewritten(tmp_path):
    """``RollingCheckpoint`` deletes a folder's record before DCP rewrites it in place and
    records it again once written: killed in between, the folder is refused as incomplete."""
    from types import SimpleNamespace

    from dpo_lightning.run.checkpointing import RollingCheckpoint

    folder = _sharded(tmp_path / "last.ckpt")
    callback = RollingCheckpoint(dirpath=str(tmp_path), keep_last=None)

    def killed_mid_write(path, weights_only=False):
        (folder / "__0_0.distcp").write_bytes(b"half")
        raise KeyboardInterrupt

    def completes(path, weights_only=False):
        (folder / "__0_0.distcp").write_bytes(b"all of it")

    strategy = SimpleNamespace(reduce_boolean_decision=lambda decision, all=True: decision)
    trainer = SimpleNamespace(is_global_zero=True, global_step=3, loggers=[], strategy=strategy)
    trainer.save_checkpoint = killed_mid_write
    with pytest.raises(KeyboardInterrupt):
        callback._save_checkpoint(trainer, str(folder))
    assert "no digest file last.ckpt.sha256.json" in problem(folder)
    trainer.save_checkpoint = completes
    callback._save_checkpoint(trainer, str(folder))
    assert problem(folder) is None
    assert json.loads(digest_path(folder).read_text())["global_step"] == 3
