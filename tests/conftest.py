"""Shared fixtures: offline environment, a tiny tokenizer and model, CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Offline everything before any HF / W&B import: a hub miss otherwise retries for ~50 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets_cache"))
    yield
    # train() called in-process holds its run directory's lock until the process ends (the CLI
    # releases it per job): give it back, so CLI runs of later tests may use that directory.
    from dpo_lightning.run.rundir import release_run_dirs

    release_run_dirs()


@pytest.fixture(scope="session")
def tokenizer():
    from dpo_lightning.models.tokenizers import offline_sentiment_tokenizer

    return offline_sentiment_tokenizer(vocab_size=256, n=400)


def make_tiny_model(vocab_size: int, seed: int = 0, **overrides):
    from dpo_lightning.models.loading import load_causal_lm

    config = (
        dict(
            model_type="llama",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=False,
        )
        | overrides
    )
    return load_causal_lm(config=config, vocab_size=vocab_size, seed=seed)


@pytest.fixture
def tiny_model(tokenizer):
    return make_tiny_model(len(tokenizer))


def run_cli(
    args: list[str], tmp_path: Path, timeout: int = 300, check: bool = True, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run ``python -m dpo_lightning.train`` in a subprocess (never DDP inside pytest).

    With ``DPO_LIGHTNING_FAULTS`` set, the run gets the test-only fault injector
    (:mod:`tests.faults`)."""
    full_env = {**os.environ, "WANDB_DIR": str(tmp_path / "wandb"), **(env or {})}
    cmd = [sys.executable, "-m", "dpo_lightning.train", *args, *_fault_overrides(full_env)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"CLI failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def _fault_overrides(env) -> list[str]:
    from tests.faults import ENV, OVERRIDE

    return [OVERRIDE] if env.get(ENV) else []


def compose(overrides: list[str] | None = None, tmp_path: Path | None = None):
    """Compose the real config with ``hydra.compose`` (HydraConfig set, so interpolations work);
    with ``DPO_LIGHTNING_FAULTS`` set, with the test-only fault injector."""
    from hydra import compose as hcompose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    overrides = [*(overrides or []), *_fault_overrides(os.environ)]
    if tmp_path is not None:
        overrides.append(f"hydra.run.dir={tmp_path}")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hcompose("train", overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
    return cfg
