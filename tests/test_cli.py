"""The Hydra CLI end to end: compose, a short run, a multirun, W&B offline."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpo_lightning.losses import DPOLoss
from tests.conftest import compose, run_cli

FAST = [
    "trainer.max_steps=3",
    "trainer.val_check_interval=3",
    "trainer.limit_val_batches=2",
    "data.generator.n=200",
    "trainer.log_every_n_steps=1",
    "callbacks.progress_bar=null",
]


def test_default_config_composes_and_instantiates(tmp_path):
    cfg = compose([], tmp_path)
    assert cfg.model.name_or_path is None and cfg.loss.beta == 0.1
    assert isinstance(instantiate(cfg.loss), DPOLoss)
    for key in (
        "model.name_or_path",
        "data.path",
        "data.batch_size",
        "data.max_length",
        "trainer.max_steps",
        "trainer.accelerator",
        "trainer.devices",
        "seed",
    ):
        node, _, leaf = key.rpartition(".")
        assert leaf in (OmegaConf.select(cfg, node) if node else cfg), key
    paper = compose(["experiment=paper"], tmp_path)
    assert paper.optim.optimizer._target_ == "torch.optim.RMSprop"
    assert paper.optim.optimizer.lr == 1e-6 and paper.optim.scheduler.num_warmup_steps == 150
    assert paper.data.batch_size == 64 and paper.loss.beta == 0.1


def test_short_cli_run_writes_summary_export_and_wandb(tmp_path):
    run_dir = tmp_path / "run"
    run_cli([*FAST, "logger=wandb", f"hydra.run.dir={run_dir}"], tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3
    for key in (
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "logits/chosen",
        "logits/rejected",
        "grad_weight",
    ):
        assert key in summary["train"] and key in summary["val"], key
    assert summary["pairs_per_sec"] > 0 and summary["wall_seconds"] > 0
    assert summary["rows_dropped"] == 0 and "data" in summary
    assert Path(summary["checkpoint"]).exists()
    model = AutoModelForCausalLM.from_pretrained(run_dir / "hf_model")
    tok = AutoTokenizer.from_pretrained(run_dir / "hf_model")
    ids = tok("Review of Open Water:", return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(input_ids=ids).logits).all()
    # W&B wrote an offline run with the metrics
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_multirun_two_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    run_cli(
        ["--multirun", "loss.beta=0.1,0.5", *FAST, "logger=csv", f"hydra.sweep.dir={sweep}"],
        tmp_path,
    )
    summaries = sorted(sweep.glob("*/summary.json"))
    assert len(summaries) == 2
    got = sorted(
        yaml.safe_load((s.parent / ".hydra" / "config.yaml").read_text())["loss"]["beta"] for s in summaries
    )
    assert got == [0.1, 0.5]
    for s in summaries:
        assert (s.parent / "hf_model" / "config.json").exists()
        assert (s.parent / "csv" / "metrics.csv").exists()


@pytest.mark.slow
def test_default_run_learns_the_preference(tmp_path):
    """`dpo-train` with no arguments: held-out reward accuracy ends ≥ 0.8, under 3 minutes."""
    run_dir = tmp_path / "default"
    run_cli([f"hydra.run.dir={run_dir}"], tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["val"]["rewards/accuracies"] >= 0.8
    assert summary["wall_seconds"] < 180
