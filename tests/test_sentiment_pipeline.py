"""dpo-sentiment configs compose; the generation callback logs; the miniature runs end to end."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from dpo_lightning.sentiment.callback import GenerationLogger, first_distinct
from dpo_lightning.sentiment.rewards import VaderReward
from tests.conftest import CONF_DIR, REPO, compose


def compose_pipeline(overrides: list[str], run_dir: Path):
    from hydra import compose as hcompose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hcompose(
            "sentiment",
            overrides=[*overrides, f"hydra.run.dir={run_dir}", f"paths.output_dir={run_dir}"],
            return_hydra_config=True,
        )
        HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.mark.parametrize("pipeline", ["miniature", "paper"])
def test_pipeline_configs_compose_with_their_training_overrides(pipeline, tmp_path):
    """Every stage's dpo-train override list composes against conf/train.yaml."""
    from dpo_lightning.sentiment.stages import compose_train_config

    cfg = compose_pipeline([f"pipeline={pipeline}"], tmp_path)
    paths = [
        "model.name_or_path=/m",
        "data.path=/d",
        f"paths.output_dir={tmp_path}",
        "paths.group=g",
    ]
    sft = compose_train_config([*cfg.sft.overrides, *paths])
    dpo = compose_train_config([*cfg.dpo.overrides, *paths, "loss.beta=0.5"])
    assert sft.stage.module._target_.endswith("SFTModule")
    assert sft.data.format._target_.endswith("TextFormat")
    assert dpo.stage.module._target_.endswith("DPOModule") and dpo.loss.beta == 0.5
    assert dpo.data.path == "/d" and dpo.model.name_or_path == "/m"
    if pipeline == "paper":  # the paper's settings (§6.1, App. B/C.1)
        assert cfg.base.name_or_path == "gpt2-large" and cfg.corpus.path == "stanfordnlp/imdb"
        assert cfg.reward.name_or_path == "siebert/sentiment-roberta-large-english"
        assert cfg.sample.k == 4 and cfg.label.pairing._target_.endswith("AllPairs")
        assert dpo.optim.optimizer._target_ == "torch.optim.RMSprop" and dpo.optim.optimizer.lr == 1e-6
        assert dpo.optim.scheduler.num_warmup_steps == 150 and dpo.data.batch_size == 64
        assert list(cfg.dpo.betas) == [0.05, 0.1, 1.0, 5.0]
    else:
        assert cfg.reward._target_.endswith("VaderReward") and len(cfg.dpo.betas) == 3


def test_first_distinct():
    assert first_distinct([[1, 2], [1, 2], [3], [4], [5]], 3) == [[1, 2], [3], [4]]


class TableLogger:
    """Any logger with W&B's ``log_table`` signature."""

    def __init__(self) -> None:
        self.tables = []

    def log_table(self, key, columns, data):
        self.tables.append((key, columns, data))


def test_generation_callback_logs_reward_kl_and_table(tokenizer):
    from types import SimpleNamespace

    from dpo_lightning.data.datamodule import PreferenceDataModule
    from dpo_lightning.data.synthetic import sentiment_pairs
    from dpo_lightning.losses import DPOLoss
    from dpo_lightning.stages.dpo import DPOModule
    from tests.conftest import make_tiny_model

    dm = PreferenceDataModule(tokenizer, generator=lambda: sentiment_pairs(60), val_fraction=0.2)
    dm.setup("fit")
    module = DPOModule(
        make_tiny_model(len(tokenizer)), DPOLoss(), optimizer=lambda p: torch.optim.SGD(p, lr=0.1)
    )
    logged = {}
    module.log = lambda name, value, **kw: logged.__setitem__(name, value)
    table = TableLogger()
    trainer = SimpleNamespace(
        sanity_checking=False, datamodule=dm, loggers=[table], global_step=7, is_global_zero=True
    )
    cb = GenerationLogger(VaderReward(), every_n_validations=2, num_prompts=3, max_new_tokens=6)
    rng_before = torch.get_rng_state()
    cb.on_validation_epoch_end(trainer, module)
    assert torch.equal(torch.get_rng_state(), rng_before)  # training's RNG stream untouched
    assert logged["val/gen_kl"] == 0.0  # policy == reference before any update
    assert -1.0 <= logged["val/gen_reward"] <= 1.0
    key, columns, data = table.tables[0]
    assert key == "val/generations" and columns[:4] == ["step", "prompt", "completion", "reward"]
    assert len(data) == 3 and data[0][0] == 7
    assert sum(r[3] for r in data) / 3 == pytest.approx(logged["val/gen_reward"], abs=1e-6)
    cb.on_validation_epoch_end(trainer, module)  # 2nd validation: skipped (every 2)
    assert len(table.tables) == 1
    cb.on_validation_epoch_end(trainer, module)
    assert len(table.tables) == 2


def test_generation_callback_config_composes():
    cfg = compose(["callbacks=generation"])
    assert cfg.callbacks.generation._target_.endswith("GenerationLogger")
    assert "checkpoint" in cfg.callbacks  # the default callbacks stay


# -- slow: the whole miniature with reduced sizes, then the frontier notebook on its output ----
SMALL = [
    "corpus.n=1500",
    "prompts.n_train=96",
    "prompts.n_eval=24",
    "sample.max_new_tokens=24",
    'sft.extra=["trainer.max_steps=60","trainer.val_check_interval=30"]',
    "dpo.betas=[0.1,0.5]",
    'dpo.extra=["trainer.max_steps=12","trainer.val_check_interval=6"]',
]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    from dpo_lightning.sentiment.pipeline import run_pipeline

    run = tmp_path_factory.mktemp("sentiment")
    summary = run_pipeline(compose_pipeline(SMALL, run))
    return run, summary


@pytest.mark.slow
def test_miniature_pipeline_end_to_end(small_run):
    from dpo_lightning.sentiment.frontier import read_frontier_csv

    run, summary = small_run
    rows = read_frontier_csv(run / "frontier.csv")
    assert [r["label"] for r in rows] == [
        "sft",
        "best_of_n",
        "dpo_beta_0.1",
        "dpo_beta_0.5",
        "online_beta_0.1",
        "online_beta_0.5",
    ]
    # The same reward budget: the offline data set's N × K calls, measured from each online run.
    assert {r["reward_calls"] for r in rows[2:]} == {96 * 4} == {summary["data"]["completions"]}
    assert summary["verdict"]["rule"] and len(summary["verdict"]["points"]) == 2
    assert all(s["steps"] == 96 // 8 for s in summary["online"].values())
    assert rows[0]["kl"] == 0.0 and rows[1]["reward"] >= rows[0]["reward"]
    assert all(r["reward"] is not None and -1 <= r["reward"] <= 1 for r in rows)
    assert (run / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    for stage in (
        "corpus",
        "sft/hf_model",
        "samples",
        "pairs",
        "dpo/beta_0.1/hf_model",
        "dpo/beta_0.5/summary.json",
        "prompts",
        "online/beta_0.1/hf_model",
        "online/beta_0.5/summary.json",
    ):
        assert (run / stage).exists(), stage
    assert summary["data"]["pairs"] > 0 and json.loads((run / "summary.json").read_text())["points"]


def _execute_notebook(name: str, env: dict[str, str], timeout: int = 600) -> None:
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(REPO / "notebooks" / name, as_version=4)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits the environment
    try:
        NotebookClient(
            nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}
        ).execute()
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@pytest.mark.slow
def test_frontier_notebook_executes(small_run, tmp_path):
    run, _ = small_run
    _execute_notebook("frontier.ipynb", {"DPO_SENTIMENT_RUN": str(run)})
    assert (run / "frontier_notebook.png").exists()


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path):
    _execute_notebook(
        "quickstart.ipynb",
        {
            "DPO_NOTEBOOK_RUN_DIR": str(tmp_path / "run"),
            "DPO_NOTEBOOK_OVERRIDES": "trainer.max_steps=12 trainer.val_check_interval=6 "
            "data.generator.n=200 trainer.log_every_n_steps=2 callbacks.checkpoint=null",
        },
    )
    assert (tmp_path / "run" / "metrics.png").exists()
