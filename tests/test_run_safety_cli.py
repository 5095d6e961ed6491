"""Run-directory safety where several processes or jobs share a command: DDP (all ranks of one run
in one directory: one lock, one claim), multirun (each job its own directory and lock), and the
sharded FSDP2 checkpoints (``trainer=fsdp_cpu``) verified file by file. Real ``dpo-train``
processes (multi-process runs never inside pytest)."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.conftest import run_cli
from tests.test_errors import _error
from tests.test_run_safety import _flip

pytestmark = pytest.mark.slow

ENV = {"OMP_NUM_THREADS": "1"}
FAST = [
    "debug=fast",
    "data.generator.n=120",
    "data.batch_size=4",
    "callbacks.progress_bar=null",
    "callbacks.checkpoint.every_n_train_steps=1",
]


def test_ddp_ranks_share_one_claim_resume_and_refusal(tmp_path, capsys):
    """Rank 1 re-executes the command in the directory rank 0 claimed (and already wrote to): it
    must neither find it locked nor see an earlier run, on a fresh start and on a resume."""
    run = tmp_path / "run"
    args = [f"hydra.run.dir={run}", "trainer=ddp_cpu", *FAST]
    run_cli([*args, "trainer.max_steps=2"], tmp_path, timeout=400, env=ENV)
    proc = run_cli([*args, "trainer.max_steps=3", "resume=true"], tmp_path, timeout=400, env=ENV)
    assert json.loads((run / "summary.json").read_text())["steps"] == 3
    assert "Restored all states" in proc.stdout + proc.stderr
    assert (run / ".dpo_lightning" / "lock").read_text() == ""  # released cleanly
    line = _error(["trainer=ddp_cpu", *FAST], tmp_path, capsys, run_dir=run)  # before any rank starts
    assert "holds an earlier run" in line


def test_multirun_jobs_each_lock_their_own_dir_and_a_rerun_sweep_is_refused_per_job(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", f"hydra.sweep.dir={sweep}", *FAST, "trainer.max_steps=1", "loss.beta=0.1,0.2"]
    run_cli(args, tmp_path, env=ENV)
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit())
    assert len(jobs) == 2
    for job in jobs:
        assert json.loads((job / "summary.json").read_text())["steps"] == 1
        assert (job / ".dpo_lightning" / "lock").read_text() == ""
        kept = yaml.safe_load((job / ".dpo_lightning" / "hydra" / "overrides.yaml").read_text())
        assert f"loss.beta={'0.1' if job.name.startswith('0') else '0.2'}" in kept
    summaries = [(job / "summary.json").read_text() for job in jobs]
    run_cli(args, tmp_path, env=ENV)  # the same sweep again, into the same job dirs
    for job, summary in zip(jobs, summaries, strict=True):
        assert "holds an earlier run" in (job / "train.log").read_text()
        assert (job / "summary.json").read_text() == summary  # untouched


def test_fsdp2_sharded_checkpoint_is_verified_file_by_file(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["trainer=fsdp_cpu", *FAST, "trainer.max_steps=2"]
    run_cli([f"hydra.run.dir={run}", *args], tmp_path, timeout=400, env=ENV)
    ckpts = run / "checkpoints"
    last = ckpts / "last.ckpt"
    record = json.loads((ckpts / "last.ckpt.sha256.json").read_text())
    assert last.is_dir() and record["kind"] == "folder" and record["global_step"] == 2
    assert sorted(record["files"]) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    # keep_last=2 with a checkpoint every step: step1 and step2 kept, each with its record.
    assert sorted(p.name for p in ckpts.iterdir()) == [
        "last.ckpt",
        "last.ckpt.sha256.json",
        "step1.ckpt",
        "step1.ckpt.sha256.json",
        "step2.ckpt",
        "step2.ckpt.sha256.json",
    ]
    _flip(last / "__1_0.distcp")  # rank 1's shard
    line = _error([*args, "trainer.max_steps=3", "resume=true"], tmp_path, capsys, run_dir=run)
    assert f"checkpoint {last} is not intact (files changed since they were written: __1_0.distcp)" in line
    assert f"the newest intact checkpoint is {ckpts / 'step2.ckpt'} (step 2)" in line
    (last / "__1_0.distcp").unlink()
    line = _error([*args, "trainer.max_steps=3", "resume=true"], tmp_path, capsys, run_dir=run)
    assert "files missing: __1_0.distcp" in line
    # The named checkpoint resumes under FSDP2 (ranks > 0 skip the check rank 0 made).
    step2 = ckpts / "step2.ckpt"
    run_cli(
        [f"hydra.run.dir={run}", *args, "trainer.max_steps=3", f"ckpt_path={step2}"],
        tmp_path,
        timeout=400,
        env=ENV,
    )
    assert json.loads((run / "summary.json").read_text())["steps"] == 3
