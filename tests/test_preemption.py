"""Pre-emption → checkpoint → requeue → exact resume through the project's own resume path.

Fast tests drive :class:`~dpo_lightning.run.preemption.Preemption` on Lightning's BoringModel with
a signal the process sends itself. The slow test is the SLURM story end to end on CPU: a running
``dpo-train`` in a fake SLURM job (the environment SLURM sets plus a stub ``scontrol`` on PATH
that records its arguments) gets SIGUSR1 from the test, checkpoints after the step in flight,
requeues the job and exits; the requeued start (``SLURM_RESTART_COUNT=1``, the same command line,
no ``resume=true``) resumes from that checkpoint through preflight's checks and ends with weights
bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from dpo_lightning.run.preemption import Preempted, Preemption, signal_number, slurm_job_id
from dpo_lightning.run.restarts import detected_restart, restart_counted, shared_store_warning
from tests.conftest import REPO, _fault_overrides
from tests.test_resume import ARGS, ENV, _assert_same_run, _weights


def _stub_scontrol(folder: Path, exit_code: int = 0) -> Path:
    """An ``scontrol`` that appends its arguments to ``calls.txt`` beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    stub = folder / "scontrol"
    stub.write_text(f'#!/bin/sh\necho "$@" >> "{folder}/calls.txt"\nexit {exit_code}\n')
    stub.chmod(0o755)
    return folder / "calls.txt"


class _SignalSelf(L.Callback):
    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def _fit_until_signal(tmp_path: Path, signum: int, accumulate: int = 1) -> Preempted:
    ckpt_dir = tmp_path / "checkpoints"
    trainer = L.Trainer(
        max_steps=20,
        accumulate_grad_batches=accumulate,
        callbacks=[Preemption(ckpt_dir), _SignalSelf(3, signum)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
    )
    with pytest.raises(Preempted) as caught:
        trainer.fit(BoringModel())
    return caught.value


@pytest.mark.parametrize(("name", "requeued"), [("SIGUSR1", True), ("SIGUSR2", True), ("SIGTERM", False)])
def test_signal_checkpoints_after_the_step_in_flight_then_exits(tmp_path, monkeypatch, name, requeued):
    calls = _stub_scontrol(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    signum = signal_number(name)
    seen = []
    before = signal.signal(signum, lambda s, f: seen.append(s))  # the handler the process had

    try:
        err = _fit_until_signal(tmp_path, signum)
        os.kill(os.getpid(), signum)  # after fit, the signal reaches that handler again
    finally:
        signal.signal(signum, before)

    assert err.code == 128 + signum
    # Signalled during the batch of step 4: that step finishes, then the checkpoint.
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 4
    assert (calls.read_text().split() if calls.exists() else []) == (["requeue", "4242"] if requeued else [])
    assert seen == [signum]


def test_signal_inside_an_accumulation_window_waits_for_the_optimizer_step(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    err = _fit_until_signal(tmp_path, signal.SIGTERM, accumulate=3)
    assert err.code == 128 + signal.SIGTERM
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 4  # not after a micro-batch of step 5
    progress = ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]
    assert progress["processed"] == 12  # 4 steps × 3 micro-batches


def test_requeue_needs_a_signal_that_is_caught():
    from dpo_lightning.run.errors import SettingError

    with pytest.raises(SettingError, match=r"^preemption.requeue_on=\['SIGUSR1'\]: must be signals"):
        Preemption("ckpts", signals=["SIGTERM"], requeue_on=["USR1"])
    with pytest.raises(SettingError, match=r"^preemption.signals='SIGUSR3': must be a signal name"):
        Preemption("ckpts", signals=["SIGUSR3"])
    with pytest.raises(SettingError, match=r"^preemption.requeue_on='USR9': must be a signal name"):
        Preemption("ckpts", signals=["SIGTERM"], requeue_on=["USR9"])


def test_slurm_job_ids():
    assert slurm_job_id({"SLURM_JOB_ID": "17"}) == "17"
    array = {"SLURM_JOB_ID": "18", "SLURM_ARRAY_JOB_ID": "9", "SLURM_ARRAY_TASK_ID": "3"}
    assert slurm_job_id(array) == "9_3"
    assert slurm_job_id({}) is None
    assert slurm_job_id({"SLURM_JOB_ID": "17; rm -rf /"}) is None  # never passed to a shell anyway


def test_restart_detection(tmp_path, monkeypatch):
    assert restart_counted({"SLURM_RESTART_COUNT": "0"}) is None
    assert restart_counted({"SLURM_RESTART_COUNT": "2"}).startswith("SLURM requeue 2")
    assert restart_counted({"TORCHELASTIC_RESTART_COUNT": "1"}).startswith("torchrun restart 1")
    # torchrun's membership-change restarts keep the count at 0: the agent's marker tells them.
    env = {"TORCHELASTIC_RUN_ID": "job7", "TORCHELASTIC_RESTART_COUNT": "0", "LOCAL_RANK": "0"}
    assert detected_restart(tmp_path, env) is None  # first start: leaves the marker
    assert "started this run before" in detected_restart(tmp_path, env)
    assert detected_restart(tmp_path, {**env, "TORCHELASTIC_RUN_ID": "job8"}) is None  # another job
    assert detected_restart(tmp_path, {}) is None  # no scheduler at all


def test_restartable_torchrun_with_a_shared_store_is_warned():
    shared = {"TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_MAX_RESTARTS": "3"}
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in shared_store_warning(shared)
    assert shared_store_warning({**shared, "TORCHELASTIC_USE_AGENT_STORE": "False"}) is None  # opted out
    assert shared_store_warning({**shared, "TORCHELASTIC_MAX_RESTARTS": "0"}) is None  # cannot restart
    assert shared_store_warning({}) is None  # not under torchrun


# -- the SLURM story end to end ----------------------------------------------------------------
def _fake_slurm_env(tmp_path: Path) -> dict[str, str]:
    """What SLURM sets for a one-task job (enough for Lightning to detect SLURM), and the stub."""
    return {
        **os.environ,
        **ENV,
        "WANDB_DIR": str(tmp_path / "wandb"),
        "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "dpo-test",
        "SLURM_NTASKS": "1",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_NODELIST": "localhost",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
    }


@pytest.mark.slow
def test_slurm_signal_requeue_then_exact_resume(tmp_path, uninterrupted):
    """SIGUSR1 from outside while step 6 runs → last.ckpt after step 6, ``scontrol requeue 4242``,
    exit 138 → the requeued start resumes by itself → bit-identical weights and metric history."""
    calls = _stub_scontrol(tmp_path / "bin")
    run_dir = tmp_path / "run"
    env = _fake_slurm_env(tmp_path)
    args = [sys.executable, "-m", "dpo_lightning.train", f"hydra.run.dir={run_dir}", *ARGS]
    faulty = {**env, "DPO_LIGHTNING_FAULTS": "wait@5"}
    proc = subprocess.Popen(
        [*args, *_fault_overrides(faulty)],
        cwd=REPO,
        env=faulty,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    marker = run_dir / "fault_waiting"
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marker.exists(), proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGUSR1)  # mid-training: the run waits at the start of step 6
    marker.unlink()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGUSR1, err[-3000:]
    assert "pre-empted (SIGUSR1) after step 6" in err and "requeued SLURM job 4242" in err
    assert calls.read_text().split() == ["requeue", "4242"]
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    assert not list(run_dir.rglob("hpc_ckpt_*.ckpt"))  # Lightning's own requeue path stayed out
    assert not (run_dir / "summary.json").exists()

    # The requeued job: same command, SLURM_RESTART_COUNT=1, no resume=true, no faults.
    restarted = subprocess.run(
        args, cwd=REPO, env={**env, "SLURM_RESTART_COUNT": "1"}, capture_output=True, text=True, timeout=400
    )
    assert restarted.returncode == 0, restarted.stderr[-4000:]
    assert "SLURM requeue 1 (SLURM_RESTART_COUNT=1): resuming from" in restarted.stdout
    _assert_same_run(run_dir, uninterrupted)
    diff = max((_weights(run_dir)[k] - w).abs().max().item() for k, w in _weights(uninterrupted).items())
    print(f"\n[equivalence] SLURM pre-emption + requeue resume vs uninterrupted: max |Δw| = {diff:.3g}")

    # The restart goes through the resume checks: a changed setting is refused in one line.
    changed = subprocess.run(
        [*args, "loss.beta=0.5"],
        cwd=REPO,
        env={**env, "SLURM_RESTART_COUNT": "2"},
        capture_output=True,
        text=True,
        timeout=200,
    )
    assert changed.returncode == 2
    assert "was trained with a different config: loss.beta: 0.1 -> 0.5" in changed.stderr


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    from tests.conftest import run_cli

    run_dir = tmp_path_factory.mktemp("uninterrupted")
    run_cli([f"hydra.run.dir={run_dir}", *ARGS], run_dir, env=ENV)
    return run_dir


def test_launcher_slurm_sets_the_signal_and_requeue_settings(tmp_path):
    from dpo_lightning.run.callbacks import reliability_callbacks
    from tests.conftest import compose

    cfg = compose(["launcher=slurm", f"paths.output_dir={tmp_path}"])
    assert cfg.hydra.launcher.signal_delay_s == 300 and cfg.hydra.launcher.additional_parameters.requeue
    (preemption,) = [c for c in reliability_callbacks(cfg) if isinstance(c, Preemption)]
    assert preemption.requeue_on == {signal.SIGUSR2}  # submitit's --signal
    assert set(preemption.signals) == {signal.SIGUSR2, signal.SIGTERM}
    default_cfg = compose([f"paths.output_dir={tmp_path}"])
    default = next(c for c in reliability_callbacks(default_cfg) if isinstance(c, Preemption))
    assert default.requeue_on == {signal.SIGUSR1, signal.SIGUSR2}
