"""No fault loses or corrupts a run: damaged checkpoints, changed data, two runs in one directory,
a re-run over an old run, NaN at the end (README "Crash-safe runs and resume").

Each test is the scenario a user hits: run, break something, run again. Runs are in-process
(``train()`` under the CLI's error wrapper) where the point is what the second command does;
the lock test uses real ``dpo-train`` processes (a live holder, then a SIGKILLed one).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpo_lightning.train import train
from tests.conftest import REPO, run_cli
from tests.test_errors import _compose, _error

RUN = [
    "data.batch_size=8",
    "trainer.val_check_interval=4",
    "trainer.log_every_n_steps=1",
    "callbacks.progress_bar=null",
    "callbacks.checkpoint.every_n_train_steps=2",
]
SMALL = ["data.generator.n=60", *RUN]


def _train(run_dir: Path, *overrides: str, base: list[str] = SMALL) -> dict:
    """One in-process run (as ``dpo-train`` would); returns its summary.json."""
    train(_compose([*base, *overrides, f"paths.output_dir={run_dir}"], run_dir))
    return json.loads((run_dir / "summary.json").read_text())


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


# -- 1. damaged checkpoints ----------------------------------------------------------------------
def test_byte_flipped_last_ckpt_is_refused_and_the_named_one_resumes(tmp_path, capsys):
    run = tmp_path / "run"
    _train(run, "trainer.max_steps=4")  # step2.ckpt, step4.ckpt, last.ckpt (step 4)
    _flip(run / "checkpoints" / "last.ckpt")  # today: resumes silently, weights ~3e38
    line = _error([*SMALL, "trainer.max_steps=6", "resume=true"], tmp_path, capsys, run_dir=run)
    step4 = run / "checkpoints" / "step4.ckpt"
    assert f"checkpoint {run / 'checkpoints' / 'last.ckpt'} is not intact (its sha256 differs" in line
    assert f"the newest intact checkpoint is {step4} (step 4): resume from it with ckpt_path={step4}" in line
    # The command the message gives works, and the run goes on from step 4.
    summary = _train(run, "trainer.max_steps=6", f"ckpt_path={step4}")
    assert summary["steps"] == 6 and summary["resumed_from"] == str(step4)
    weights = load_file(run / "hf_model" / "model.safetensors")
    assert all(torch.isfinite(w).all() and w.abs().max() < 100 for w in weights.values())
    # A checkpoint of ours without its digest record (copied alone) is refused too.
    (run / "checkpoints" / "last.ckpt.sha256.json").unlink()
    line = _error([*SMALL, "trainer.max_steps=8", "resume=true"], tmp_path, capsys, run_dir=run)
    assert "is not intact (it has no digest file last.ckpt.sha256.json" in line
    assert f"the newest intact checkpoint is {run / 'checkpoints' / 'step6.ckpt'} (step 6)" in line


# -- 2. changed data ---------------------------------------------------------------------------------
def _pairs(path: Path, n: int = 40, edit: int | None = None, reverse: bool = False) -> str:
    rows = [
        {"prompt": f"Review {i}:", "chosen": f" a great film, {i}", "rejected": f" a dull film, {i}"}
        for i in range(n)
    ]
    if edit is not None:
        rows[edit]["chosen"] = " an edited answer"
    path.write_text("".join(json.dumps(r) + "\n" for r in (rows[::-1] if reverse else rows)))
    return f"data.path={path}"


def test_resume_on_changed_data_is_refused_unless_opted_in(tmp_path, capsys):
    run, data, other = tmp_path / "run", tmp_path / "pairs.jsonl", tmp_path / "other.jsonl"

    def args(path: Path, *more: str) -> list[str]:
        return [*RUN, "data=file", f"data.path={path}", f"data.cache_dir={tmp_path / 'cache'}", *more]

    _pairs(data)
    _train(run, "trainer.max_steps=2", base=args(data))  # 40 rows: 38 train, 2 validation
    _pairs(data, edit=0)  # same file, same row count, one row edited: today resumes silently
    line = _error(args(data, "trainer.max_steps=4", "resume=true"), tmp_path, capsys, run_dir=run)
    assert "was trained on other data (validation: same 2 rows, content differs)" in line  # row 0 is held out
    assert "resume_on_changed_data=true to continue on the new data" in line
    _pairs(data, n=44)  # rows added
    line = _error(args(data, "trainer.max_steps=4", "resume=true"), tmp_path, capsys, run_dir=run)
    assert "(train: 38 -> 41 rows; validation: 2 -> 3 rows)" in line
    summary = _train(
        run, "trainer.max_steps=4", "resume=true", "resume_on_changed_data=true", base=args(data)
    )
    assert summary["steps"] == 4
    out = capsys.readouterr().out
    assert "resume_on_changed_data=true: resuming on changed data: train: 38 -> 41 rows" in out
    # Opting in also lets the data source itself change (another file); without it, no.
    _pairs(other, n=44, edit=1)
    line = _error(args(other, "trainer.max_steps=6", "resume=true"), tmp_path, capsys, run_dir=run)
    assert f"data.path: '{data}' -> '{other}'" in line
    opted = args(other, "trainer.max_steps=6", "resume=true", "resume_on_changed_data=true")
    assert _train(run, base=opted)["steps"] == 6


def test_data_fingerprint_sees_edits_order_and_count_not_the_file_name(tokenizer, tmp_path):
    from dpo_lightning.data.datamodule import PreferenceDataModule
    from dpo_lightning.run.checkpointing import data_changes, data_fingerprint

    def fingerprint(name: str, **kw) -> dict:
        path = tmp_path / name
        _pairs(path, **kw)
        dm = PreferenceDataModule(tokenizer, path=str(path), max_length=64, cache_dir=str(tmp_path / "c"))
        dm.setup("fit")
        return data_fingerprint(dm)

    base = fingerprint("a.jsonl")
    assert base["train"]["rows"] == 38 and base["validation"]["rows"] == 2
    assert data_changes(base, fingerprint("b.jsonl")) == []  # same rows, another file
    assert data_changes(base, fingerprint("c.jsonl", n=39))[0] == "train: 38 -> 37 rows"  # (and the split)
    assert data_changes(base, fingerprint("d.jsonl", edit=5)) == ["train: same 38 rows, content differs"]
    assert data_changes(base, fingerprint("e.jsonl", reverse=True)) != []  # reordered


# -- 4. a new run over an old one --------------------------------------------------------------------
def test_rerun_without_resume_is_refused_then_overwrite_really_replaces_the_run(tmp_path, capsys):
    run = tmp_path / "run"
    _train(run, "trainer.max_steps=4")
    before = {p.name for p in (run / "checkpoints").glob("*.ckpt")}
    metrics = (run / "csv" / "metrics.csv").read_text()
    line = _error([*SMALL, "trainer.max_steps=2"], tmp_path, capsys, run_dir=run)
    assert (
        f"run directory {run} holds an earlier run (checkpoints, csv/metrics.csv, summary.json, hf_model)"
        in line
    )
    assert "continue it with resume=true" in line and "hydra.run.dir=<new dir>" in line
    assert "overwrite=true" in line
    # Refused before touching anything: no last-v1.ckpt, the old metrics kept.
    assert {p.name for p in (run / "checkpoints").glob("*.ckpt")} == before
    assert (run / "csv" / "metrics.csv").read_text() == metrics

    summary = _train(
        run, "trainer.max_steps=2", "callbacks.checkpoint.every_n_train_steps=1", "overwrite=true"
    )
    assert "overwrite=true: deleted checkpoints, csv, summary.json, hf_model" in capsys.readouterr().out
    assert summary["steps"] == 2
    assert sorted(p.name for p in (run / "checkpoints").glob("*.ckpt")) == [
        "last.ckpt",
        "step1.ckpt",
        "step2.ckpt",
    ]
    with open(run / "csv" / "metrics.csv", newline="") as f:
        steps = [int(row["step"]) for row in csv.DictReader(f) if row.get("train/loss")]
    assert steps == [0, 1]  # only the new run's rows
    # resume=true now continues the new run (step 2), not the old one (step 4).
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    summary = _train(run, "trainer.max_steps=3", "callbacks.checkpoint.every_n_train_steps=1", "resume=true")
    assert summary["steps"] == 3
    line = _error([*SMALL, "resume=true", "overwrite=true"], tmp_path, capsys, run_dir=run)
    assert "choose one" in line


def test_checkpoint_of_another_dir_does_not_continue_this_one(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    _train(a, "trainer.max_steps=2")
    _train(b, "trainer.max_steps=2")
    line = _error(
        [*SMALL, "trainer.max_steps=4", f"ckpt_path={a / 'checkpoints' / 'last.ckpt'}"],
        tmp_path,
        capsys,
        run_dir=b,
    )
    assert "holds an earlier run" in line


# -- 5. NaN at the end ---------------------------------------------------------------------------------
def test_nan_final_validation_is_an_error_not_a_null(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DPO_LIGHTNING_FAULTS", "nanval@4")  # today: summary.json with "loss": null
    run = tmp_path / "run"
    line = _error([*SMALL, "trainer.max_steps=4"], tmp_path, capsys, run_dir=run)
    assert "the final validation is not finite at step 4 (" in line
    assert "val/loss=nan" in line and "val/rewards/margins=nan" in line
    assert not (run / "summary.json").exists() and not (run / "hf_model").exists()
    assert (run / "checkpoints" / "last.ckpt").is_file()


# -- 3. one run per directory: real processes -------------------------------------------------------
ENV = {"OMP_NUM_THREADS": "1"}


def _holder(run_dir: Path, tmp_path: Path) -> subprocess.Popen:
    """A long ``dpo-train`` in ``run_dir``, returned once it holds the lock."""
    cmd = [
        sys.executable,
        "-m",
        "dpo_lightning.train",
        f"hydra.run.dir={run_dir}",
        *SMALL,
        "trainer.max_steps=100000",
    ]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env={**os.environ, **ENV}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    lock = run_dir / ".dpo_lightning" / "lock"
    deadline = time.monotonic() + 240
    while not (lock.is_file() and lock.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, "the holder did not start"
        time.sleep(0.5)
    return proc


def test_second_run_in_a_live_dir_is_refused_and_a_killed_runs_lock_is_taken_over(tmp_path, capsys):
    run = tmp_path / "run"
    holder = _holder(run, tmp_path)
    try:
        assert json.loads((run / ".dpo_lightning" / "lock").read_text())["pid"] == holder.pid
        second = run_cli(
            [f"hydra.run.dir={run}", *SMALL, "trainer.max_steps=2"], tmp_path, check=False, env=ENV
        )
        assert second.returncode == 2, second.stderr[-2000:]
        line = second.stderr.strip().splitlines()[-1]
        assert line.startswith(f"dpo-train: error: run directory {run} is in use by PID {holder.pid} on ")
        assert "Traceback" not in second.stderr
        # Hydra rewrote the holder's .hydra/ before the refusal: it is put back.
        assert "trainer.max_steps=100000" in (run / ".hydra" / "overrides.yaml").read_text()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The killed run left its lock file behind: the next run takes it over (and says so).
    _train(run, "trainer.max_steps=2", "overwrite=true")
    assert f"taking over the lock of PID {holder.pid}" in capsys.readouterr().out


def test_without_flock_the_lock_is_judged_by_its_pid(tmp_path, monkeypatch, capsys):
    """Filesystems without ``flock`` (ENOLCK): a dead PID on this host is taken over; a live one,
    or one on another host (which cannot be checked), is respected."""
    import errno
    import fcntl
    import socket

    from dpo_lightning.run.rundir import RunDirInUseError, lock_path, lock_run_dir, release_run_dirs

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    dead = subprocess.Popen(["true"])
    dead.wait()
    alive = subprocess.Popen(["sleep", "60"])
    try:
        for n, (pid, host, refused) in enumerate(
            [
                (dead.pid, socket.gethostname(), False),
                (alive.pid, socket.gethostname(), True),
                (dead.pid, "elsewhere", True),
            ]
        ):
            run = tmp_path / str(n)
            lock_path(run).parent.mkdir(parents=True)
            lock_path(run).write_text(json.dumps({"pid": pid, "host": host, "started": "then"}))
            if refused:
                with pytest.raises(RunDirInUseError, match=f"in use by PID {pid} on {host}"):
                    lock_run_dir(run)
            else:
                lock_run_dir(run)
                assert f"taking over the lock of PID {pid}" in capsys.readouterr().out
                assert json.loads(lock_path(run).read_text())["pid"] == os.getpid()
                release_run_dirs([run])
                assert lock_path(run).read_text() == ""
    finally:
        alive.kill()
        alive.wait()
