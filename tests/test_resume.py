"""Exact resume: a run SIGKILLed after a checkpoint and resumed equals an uninterrupted run.

Tiny model, 57 training pairs in batches of 8 (8 batches per epoch), 12 steps, a checkpoint
every 4 steps, validation every 6. ``DPO_LIGHTNING_FAULTS=kill@N`` makes the run SIGKILL itself
at the start of the batch after step N (deterministic, unlike a timed kill).
"""

from __future__ import annotations

import csv
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_cli
from tests.test_errors import _error

ARGS = [
    "data.generator.n=60",
    "data.batch_size=8",
    "trainer.max_steps=12",
    "trainer.val_check_interval=6",
    "trainer.log_every_n_steps=1",
    "callbacks.checkpoint.every_n_train_steps=4",
    "callbacks.progress_bar=null",
    "+logger.csv.flush_logs_every_n_steps=1",  # the killed run leaves rows after its checkpoint
]
ENV = {"OMP_NUM_THREADS": "1"}
# Wall-clock rates differ between any two runs, and ThroughputMonitor's own counters restart
# with the process (the run totals are RunTotals', in summary.json); everything else must match
# exactly.
TIMING = ("train/device/", "train/time", "train/batches", "train/samples", "train/lengths", "validate/")


def _metrics(run_dir: Path) -> list[dict[str, str]]:
    """Rows of metrics.csv without the timing columns (ThroughputMonitor's rows drop out)."""
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        rows = [{k: v for k, v in row.items() if not k.startswith(TIMING)} for row in csv.DictReader(f)]
    return [r for r in rows if any(v for k, v in r.items() if k not in ("epoch", "step"))]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "hf_model" / "model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    run_cli([f"hydra.run.dir={run_dir}", *ARGS], run_dir, env=ENV)
    return run_dir


def _killed_then_resumed(tmp_path: Path, fault: str, before_resume=None, args=ARGS) -> Path:
    run_dir = tmp_path / "run"
    killed = run_cli(
        [f"hydra.run.dir={run_dir}", *args],
        tmp_path,
        check=False,
        env={**ENV, "DPO_LIGHTNING_FAULTS": fault},
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (run_dir / "summary.json").exists()
    if before_resume is not None:
        before_resume(run_dir)
    run_cli([f"hydra.run.dir={run_dir}", *args, "resume=true"], tmp_path, env=ENV)
    return run_dir


def _assert_same_run(resumed: Path, uninterrupted: Path) -> None:
    a, b = _weights(uninterrupted), _weights(resumed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resume"
    rows_a, rows_b = _metrics(uninterrupted), _metrics(resumed)
    steps = [int(r["step"]) for r in rows_b if r.get("train/loss")]
    assert steps == list(range(12)), "every training step logged exactly once"
    assert rows_b == rows_a


def test_kill_mid_epoch_then_resume_is_bit_identical(tmp_path, uninterrupted):
    # Last checkpoint: step 4, half-way through epoch 0; killed during step 7.
    run_dir = _killed_then_resumed(tmp_path, "kill@6")
    _assert_same_run(run_dir, uninterrupted)
    # keep_last=2: step8 and step12 remain (step4 pruned), plus last.ckpt.
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt")) == [
        "last.ckpt",
        "step12.ckpt",
        "step8.ckpt",
    ]
    import json

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"].endswith("last.ckpt")
    assert summary["steps"] == 12


@pytest.mark.slow
def test_kill_after_epoch_boundary_then_resume_is_bit_identical(tmp_path, uninterrupted):
    # Last checkpoint: step 8 = the end of epoch 0; killed in epoch 1.
    _assert_same_run(_killed_then_resumed(tmp_path, "kill@10"), uninterrupted)


@pytest.mark.slow
def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, uninterrupted):
    # Killed half-way through writing step8.ckpt: last.ckpt is still step 4's (a temp file is
    # left behind), and the run resumed from it still ends bit-identical.
    run_dir = _killed_then_resumed(tmp_path, "killwrite@8", _only_step4)
    _assert_same_run(run_dir, uninterrupted)
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_kill_with_dropout_on_then_resume_is_bit_identical(tmp_path):
    # Dropout draws from the global torch RNG every step: equal only if the checkpoint's RNG
    # states are restored (without the restore the weights differ by ~6e-3).
    args = [*ARGS, "model.disable_dropout=false", "+model.config.attention_dropout=0.2"]
    baseline = tmp_path / "baseline"
    run_cli([f"hydra.run.dir={baseline}", *args], tmp_path, env=ENV)
    _assert_same_run(_killed_then_resumed(tmp_path, "kill@6", args=args), baseline)


def _only_step4(run_dir: Path) -> None:
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if not p.name.endswith(".json"))
    assert names[1:] == ["last.ckpt", "step4.ckpt"] and names[0].startswith(".step8.ckpt.tmp")
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4


def test_checkpoint_holds_training_state_not_the_reference(uninterrupted):
    ckpt = torch.load(uninterrupted / "checkpoints" / "last.ckpt", weights_only=True)
    state = ckpt["state_dict"]
    assert state and not any(k.startswith("reference_model.") for k in state)
    assert any(k.startswith("policy.") for k in state)
    assert ckpt["optimizer_states"] and ckpt["lr_schedulers"]
    assert ckpt["global_step"] == 12
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"epoch": 1, "batches": 4}
    ]  # 12 = 8 + 4
    meta = ckpt["dpo_lightning"]
    assert set(meta["rng"]) >= {"python", "numpy", "torch"} and meta["version"]


def test_resume_with_changed_config_fails_in_one_line(tmp_path, uninterrupted, capsys):
    line = _error(
        [*ARGS, "resume=true", "loss.beta=0.5"], uninterrupted.parent, capsys, run_dir=uninterrupted
    )
    assert line.startswith("dpo-train: error: checkpoint ") and "loss.beta: 0.1 -> 0.5" in line
    assert "resume with the original settings" in line


def test_resume_without_checkpoint_fails_in_one_line(tmp_path, capsys):
    line = _error(["resume=true"], tmp_path, capsys)
    assert "resume=true but" in line and "last.ckpt does not exist" in line
    assert "hydra.run.dir=<run dir>" in line
