"""``dpo-sentiment`` checks every stage's settings before the first stage runs (issue 12 §2): a bad
β or a bad stage override used to fail after minutes of corpus, SFT and sampling."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from dpo_lightning.run.errors import EXIT_CODE, report_errors
from tests.conftest import CONF_DIR, REPO


def _pipeline_error(overrides: list[str], tmp_path: Path, capsys) -> str:
    from hydra import compose as hcompose
    from hydra import initialize_config_dir

    from dpo_lightning.sentiment.pipeline import run_pipeline

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hcompose("sentiment", overrides=[*overrides, f"paths.output_dir={tmp_path / 'run'}"])
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exc, report_errors("dpo-sentiment"):
        run_pipeline(cfg)
    assert exc.value.code == EXIT_CODE and time.perf_counter() - start < 20
    assert not (tmp_path / "run" / "corpus").exists()  # no stage ran
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["dpo.betas=[0.1,abc]"], "dpo.betas.1='abc': must be a finite number > 0"),
        (["dpo.betas=[-1]"], "dpo.betas.0=-1: must be a finite number > 0"),
        (["sample.k=1"], "sample.k=1: must be an integer ≥ 2"),
        (['dpo.extra=["data.batch_size=0"]'], "the dpo (β=0.1) stage: data.batch_size=0"),
        (['sft.extra=["optim.optimizer.lr=-1"]'], "the sft stage: optim.optimizer.lr=-1"),
        (['sft.extra=["trainer.max_stepz=5"]'], "the sft stage's overrides do not compose"),
    ],
)
def test_sentiment_stage_settings_fail_before_the_first_stage(overrides, message, tmp_path, capsys):
    line = _pipeline_error(overrides, tmp_path, capsys)
    assert line.startswith("dpo-sentiment: error: ") and message in line, line


def test_sentiment_cli_bad_beta_is_one_line(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dpo_lightning.sentiment.pipeline",
            "dpo.betas=[abc]",
            f"hydra.run.dir={tmp_path}/run",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == EXIT_CODE, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("dpo-sentiment: error: dpo.betas.0='abc'")
    assert not (tmp_path / "run" / "corpus").exists()
