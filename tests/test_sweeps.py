"""Sweeps: one run dir and W&B run per job, grouped; failures isolated; Optuna; submitit."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from tests.conftest import compose, run_cli

FAST = [
    "debug=fast",
    "data.generator.n=200",
    "callbacks.checkpoint=null",
    "callbacks.progress_bar=null",
    "+trainer.enable_checkpointing=false",
]
ENV = {"OMP_NUM_THREADS": "1"}


def _jobs(sweep_dir: Path) -> list[Path]:
    return sorted(
        (p for p in sweep_dir.iterdir() if p.is_dir() and p.name[0].isdigit()),
        key=lambda p: int(p.name.split("_")[0]),
    )


def _wandb_run(job: Path) -> tuple[str, set[bytes]]:
    """(run id, W&B group names found in the offline run's records) of the job's one run."""
    runs = list((job / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    records = next(runs[0].glob("run-*.wandb")).read_bytes()
    groups = set(re.findall(rb"train-\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", records))
    return runs[0].name.rsplit("-", 1)[1], groups


@pytest.fixture
def fresh_launch(monkeypatch):
    """The CLI must create the launch id itself (pytest may have imported train.py)."""
    monkeypatch.delenv("DPO_LIGHTNING_LAUNCH_ID", raising=False)


def test_slurm_and_optuna_presets_compose():
    cfg = compose(["launcher=slurm", "hydra.launcher.gpus_per_node=4", "hydra.launcher.nodes=2"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.tasks_per_node, cfg.trainer.devices, cfg.trainer.num_nodes) == (4, 4, 2)
    assert {"partition", "timeout_min", "gpus_per_node", "nodes"} <= set(launcher)
    cfg = compose(["hparams_search=optuna"])
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert cfg.optimized_metric == "val/rewards/accuracies"
    assert set(cfg.hydra.sweeper.params) == {"loss.beta", "optim.optimizer.lr"}


@pytest.mark.slow
def test_single_run_failure_exits_non_zero(tmp_path):
    proc = run_cli(
        [f"hydra.run.dir={tmp_path / 'run'}", *FAST, "model.attn_implementation=bogus"],
        tmp_path,
        check=False,
        env=ENV,
    )
    assert proc.returncode != 0
    assert "bogus" in proc.stderr


@pytest.mark.slow
def test_failed_job_does_not_stop_the_sweep_and_each_job_has_its_wandb_run(tmp_path, fresh_launch):
    sweep = tmp_path / "sweep"
    # Job 0 fails in trainer.fit, after its W&B run was opened (an injected NaN gradient with
    # on_nonfinite=stop); job 1 skips that step, finishes, and must get its own W&B run.
    run_cli(
        [
            "-m",
            f"hydra.sweep.dir={sweep}",
            *FAST,
            "logger=wandb",
            "train.on_nonfinite=stop,skip",
        ],
        tmp_path,
        env={**ENV, "DPO_LIGHTNING_FAULTS": "nan@1"},
    )
    failed, ok = _jobs(sweep)
    log = (failed / "train.log").read_text()
    assert "job 0 failed" in log and "Traceback" in log and "non-finite gradient" in log
    assert not (failed / "summary.json").exists()
    assert json.loads((ok / "summary.json").read_text())["steps"] == 3
    (id0, groups0), (id1, groups1) = _wandb_run(failed), _wandb_run(ok)
    assert id0 != id1
    assert len(groups0) == 1 and groups0 == groups1


@pytest.mark.slow
def test_optuna_sweep_of_three_trials(tmp_path):
    sweep = tmp_path / "optuna"
    run_cli(
        [
            f"hydra.sweep.dir={sweep}",
            "hparams_search=optuna",
            "hydra.sweeper.n_trials=3",
            *FAST,
            "optimized_metric=val/loss",
            "hydra.sweeper.direction=minimize",
            f"hydra.sweeper.storage=sqlite:///{tmp_path / 'optuna.db'}",  # resumable study
        ],
        tmp_path,
        env=ENV,
        timeout=600,
    )
    jobs = _jobs(sweep)
    assert len(jobs) == 3
    losses = [json.loads((j / "summary.json").read_text())["val"]["loss"] for j in jobs]
    betas = {yaml.safe_load((j / ".hydra" / "config.yaml").read_text())["loss"]["beta"] for j in jobs}
    assert len(betas) == 3  # three different suggestions
    assert (tmp_path / "optuna.db").exists()
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(min(losses))


@pytest.mark.slow
def test_submitit_local_launcher_runs_jobs_in_their_own_processes_one_wandb_group(tmp_path, fresh_launch):
    sweep = tmp_path / "submitit"
    run_cli(
        [
            "-m",
            "launcher=submitit_local",
            f"hydra.sweep.dir={sweep}",
            *FAST,
            "logger=wandb",
            "loss.beta=0.05,0.1",
        ],
        tmp_path,
        env=ENV,
        timeout=600,
    )
    jobs = _jobs(sweep)
    assert len(jobs) == 2 and all((j / "summary.json").exists() for j in jobs)
    assert (sweep / ".submitit").is_dir()
    (id0, groups0), (id1, groups1) = (_wandb_run(j) for j in jobs)
    # ${now:} would differ here: each job process resolves it again, seconds apart.
    assert id0 != id1 and len(groups0) == 1 and groups0 == groups1
