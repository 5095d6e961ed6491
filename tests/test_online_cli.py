"""stage=online_dpo through the CLI: a prompt-only fixture, exact resume after a kill, DDP."""

from __future__ import annotations

import csv
import json
import math
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, run_cli

PROMPTS = REPO / "tests" / "fixtures" / "prompts.jsonl"  # 24 {prompt} rows
LENGTH_REWARD = [  # a Python callable on texts as the reward
    "online/reward=text",
    "online.reward.fn={_target_: tests.online_fakes.length_score, _partial_: true}",
]
SMALL = [
    "stage=online_dpo",
    "data=prompts",
    f"data.path={PROMPTS}",
    "data.batch_size=4",  # 22 train prompts (2 held out): 6 batches per epoch, the last of 2
    "data.eval_batch_size=4",
    "data.max_length=64",
    "online.k=3",
    "online.generation.max_new_tokens=10",
    "trainer.log_every_n_steps=1",
    "callbacks.progress_bar=null",
    "optim.optimizer.lr=3e-3",
]
ENV = {"OMP_NUM_THREADS": "1"}
# Wall-clock values (and ThroughputMonitor's restarted counters) differ between any two runs.
TIMING = (
    "train/device/",
    "train/time",
    "train/batches",
    "train/samples",
    "train/lengths",
    "validate/",
    "train/online/gen_tokens_per_s",
    "train/online/gen_fraction",
    "val/online/gen_tokens_per_s",
)


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        rows = [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in csv.DictReader(f)]
    return [r for r in rows if any(v for k, v in r.items() if k not in ("epoch", "step"))]


def _train_rows(run_dir: Path) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    for r in _rows(run_dir):
        for k, v in r.items():
            if k.startswith("train/") and v:
                out.setdefault(int(r["step"]), {})[k[6:]] = float(v)
    return out


def test_cli_trains_online_on_a_prompt_only_fixture(tmp_path):
    run_dir = tmp_path / "run"
    args = [*SMALL, *LENGTH_REWARD, "trainer.max_steps=3", "trainer.val_check_interval=3"]
    proc = run_cli([f"hydra.run.dir={run_dir}", *args], tmp_path, env=ENV)
    assert "global batch = 4 prompts per device" in proc.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3
    train, val = summary["train"], summary["val"]
    assert train["online/reward_calls"] == 3 * 4 * 3  # steps × prompts × K
    for key in ("online/reward_mean", "online/reward_std", "online/pairs", "online/ties", "online/kl"):
        assert train[key] is not None and val[key] is not None, key
    assert 0 < train["online/gen_fraction"] < 1 and train["online/gen_tokens_per_s"] > 0
    assert train["rewards/accuracies"] is not None and val["loss"] is not None
    # The callbacks saw the sampled batch: pairs trained and the prompts' data report.
    assert summary["pairs_trained"] > 0
    assert summary["data"][str(PROMPTS)]["rows_kept"] == 24
    assert (run_dir / "hf_model" / "model.safetensors").exists()
    steps = _train_rows(run_dir)
    assert sorted(steps) == [0, 1, 2]
    assert steps[0]["online/kl"] == 0.0  # step 0: the policy is its reference
    assert all(s["online/pairs"] + s["online/ties"] <= 4 * 3 for s in steps.values())  # ≤ K(K-1)/2 each


def test_built_in_default_runs(tmp_path):
    """The README's ``dpo-train stage=online_dpo`` (built-in prompts, VADER), a few steps."""
    run_dir = tmp_path / "run"
    run_cli(
        [f"hydra.run.dir={run_dir}", "stage=online_dpo", "debug=fast", "online.generation.max_new_tokens=8"],
        tmp_path,
        env=ENV,
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["train"]["online/reward_calls"] == 3 * 8 * 4


# ---- exact resume ------------------------------------------------------------------------------
RESUME = [
    *SMALL,
    *LENGTH_REWARD,
    "trainer.max_steps=8",  # crosses the epoch boundary (6 batches per epoch)
    "trainer.val_check_interval=4",
    "callbacks.checkpoint.every_n_train_steps=3",
    "+logger.csv.flush_logs_every_n_steps=1",
]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "hf_model" / "model.safetensors")


def test_kill_then_resume_is_bit_identical(tmp_path):
    """Killed in step 5 (last checkpoint: step 3, mid-epoch), resumed: the samples, the weights
    and every logged value equal the uninterrupted run's."""
    baseline = tmp_path / "baseline"
    run_cli([f"hydra.run.dir={baseline}", *RESUME], tmp_path, env=ENV)
    run_dir = tmp_path / "run"
    killed = run_cli(
        [f"hydra.run.dir={run_dir}", *RESUME],
        tmp_path,
        check=False,
        env={**ENV, "DPO_LIGHTNING_FAULTS": "kill@4"},
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3 and ckpt["online_dpo"]["train_batches"] == 3
    run_cli([f"hydra.run.dir={run_dir}", *RESUME, "resume=true"], tmp_path, env=ENV)
    a, b = _weights(baseline), _weights(run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _rows(run_dir) == _rows(baseline)
    assert sorted(_train_rows(run_dir)) == list(range(8))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["train"]["online/reward_calls"] == 8 * 4 * 3 - 2 * 3  # the 6th batch has 2 prompts


# ---- DDP ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ddp_each_rank_samples_its_prompts_and_metrics_are_global(tmp_path):
    """2 CPU processes. Rank 1's reward always ties (it never has a pair), rank 0's ties at its
    3rd call (so step 2 has no pair on any rank and is skipped): the run neither hangs nor
    trains on nothing, and every logged value is the global one."""
    run_dir = tmp_path / "run"
    args = [
        *SMALL,
        "online/reward=custom",
        "online.reward._target_=tests.online_fakes.RankTies",
        "trainer=ddp_cpu",
        "data.batch_size=2",  # 2 ranks × 2 prompts: 22 prompts = 6 steps (the last: 2 + 1 padded)
        "trainer.max_steps=6",
        "trainer.val_check_interval=6",
        "callbacks.checkpoint=null",
        "+trainer.enable_checkpointing=false",
        f"+callbacks.recorder={{_target_: tests.online_fakes.RolloutRecorder, dirpath: {run_dir}/rollouts}}",
    ]
    run_cli([f"hydra.run.dir={run_dir}", *args], tmp_path, timeout=500, env=ENV)
    ranks = [json.loads((run_dir / "rollouts" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["weights"] == ranks[1]["weights"]  # one model
    logged = _train_rows(run_dir)
    seen: list[int] = []
    calls = 0
    for step, (b0, b1) in enumerate(zip(ranks[0]["batches"], ranks[1]["batches"], strict=True)):
        assert b0["step"] == b1["step"] == step
        assert not set(b0["prompt_rows"]) & set(b1["prompt_rows"])  # each rank its own prompts
        seen += b0["prompt_rows"] + b1["prompt_rows"]
        assert b1["pairs"] == 0  # rank 1 always ties
        row = logged[step]
        assert row["online/pairs"] == b0["pairs"] + b1["pairs"]
        assert row["online/ties"] == b0["ties"] + b1["ties"]
        mean = (b0["reward_sum"] + b1["reward_sum"]) / (b0["completions"] + b1["completions"])
        assert row["online/reward_mean"] == pytest.approx(mean, rel=1e-5)
        calls += b0["completions"] + b1["completions"]
        assert row["online/reward_calls"] == calls  # cumulative, both ranks
        assert b0["batch_pairs"] == b0["pairs"]  # callbacks read the sampled batch
        if step == 2:  # no pair anywhere: no loss value, a zero gradient, no update
            assert row["online/pairs"] == 0 and math.isnan(row["loss"]) and row["grad_norm"] == 0.0
        else:
            assert row["online/pairs"] > 0 and math.isfinite(row["loss"]) and row["grad_norm"] > 0
    assert len(seen) == len(set(seen)) == 22  # one epoch: every train prompt once, on one rank


@pytest.mark.slow
def test_reward_model_folder_and_iterative_reference_from_the_cli(tmp_path, tokenizer):
    """The README's command with local stand-ins: an SFT folder, a ``stage=reward_model``-style
    export as the reward, and iterative DPO (reference refreshed every 2 steps: KL restarts at 0)."""
    from dpo_lightning.stages.reward_model import reward_model_from_causal_lm
    from tests.conftest import make_tiny_model

    make_tiny_model(len(tokenizer), seed=0).save_pretrained(tmp_path / "sft")
    reward_model_from_causal_lm(make_tiny_model(len(tokenizer), seed=5)).save_pretrained(tmp_path / "rm")
    for folder in ("sft", "rm"):
        tokenizer.save_pretrained(tmp_path / folder)
    run_dir = tmp_path / "run"
    args = [
        *SMALL,
        "model=hf",
        f"model.name_or_path={tmp_path / 'sft'}",
        "online/reward=reward_model",
        f"online.reward.path={tmp_path / 'rm'}",
        "reference=iterative",
        "reference.sync_steps=2",
        "optim.scheduler.num_warmup_steps=0",  # step 0 already moves the policy
        "trainer.max_steps=4",
        "trainer.val_check_interval=4",
    ]
    run_cli([f"hydra.run.dir={run_dir}", *args], tmp_path, env=ENV)
    steps = _train_rows(run_dir)
    assert steps[0]["online/kl"] == 0.0 and steps[1]["online/kl"] != 0.0
    assert steps[2]["online/kl"] == 0.0 and steps[3]["online/kl"] != 0.0  # refreshed after step 2
    assert all(math.isfinite(s["online/reward_mean"]) for s in steps.values())


@pytest.mark.slow
def test_fsdp2_on_cpu_samples_with_sharded_weights(tmp_path):
    """trainer=fsdp_cpu (FSDP2, 2 processes): generation runs on the sharded policy with
    ``synced_gpus`` (every rank steps until all are done), then trains; both ranks' prompts count."""
    run_dir = tmp_path / "run"
    args = [*SMALL, *LENGTH_REWARD, "trainer=fsdp_cpu", "trainer.max_steps=3", "trainer.val_check_interval=3"]
    run_cli([f"hydra.run.dir={run_dir}", *args], tmp_path, timeout=500, env=ENV)
    steps = _train_rows(run_dir)
    assert steps[0]["online/kl"] == 0.0 and all(math.isfinite(s["loss"]) for s in steps.values())
    # 22 train prompts, 11 per rank: batches of 4, 4, 3 per rank, K = 3 each, summed over ranks
    assert [s["online/reward_calls"] for s in steps.values()] == [24.0, 48.0, 66.0]
    assert (run_dir / "hf_model" / "model.safetensors").exists()


# ---- the offline stage's reliability promises --------------------------------------------------
IN_PROCESS = [
    "stage=online_dpo",  # built-in prompts, VADER
    "data.generator.n=60",
    "data.batch_size=4",
    "online.k=3",
    "online.generation.max_new_tokens=8",
    "trainer.max_steps=3",
    "trainer.val_check_interval=3",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "callbacks.progress_bar=null",
]


def test_nonfinite_gradient_stops_naming_the_sampled_rows(tmp_path, capsys, monkeypatch):
    from tests.test_errors import _error

    monkeypatch.setenv("DPO_LIGHTNING_FAULTS", "nan@1")
    line = _error(IN_PROCESS, tmp_path, capsys)
    assert "non-finite gradient" in line and "at step 2 (epoch 0, batch 1), data rows [" in line
    assert not (tmp_path / "run" / "summary.json").exists()


def test_nonfinite_gradient_skip_counts_in_summary(tmp_path, monkeypatch):
    from dpo_lightning.train import train
    from tests.test_errors import _compose

    monkeypatch.setenv("DPO_LIGHTNING_FAULTS", "nan@1")
    run_dir = tmp_path / "run"
    train(_compose([*IN_PROCESS, "train.on_nonfinite=skip", f"paths.output_dir={run_dir}"], run_dir))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["nonfinite_steps_skipped"] == 1 and summary["steps"] == 3
    assert summary["train"]["online/reward_calls"] == 3 * 4 * 3


def test_preference_data_is_refused_before_training(tmp_path, capsys):
    from tests.test_errors import _error

    line = _error(["stage=online_dpo", "data=sentiment", "data.generator.n=40"], tmp_path, capsys)
    assert "stage=online_dpo samples its completions and trains on prompt-only data" in line
    assert not list((tmp_path / "run").rglob("metrics.csv"))  # stopped before the first step
