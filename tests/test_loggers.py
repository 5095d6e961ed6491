"""``logger=tensorboard`` / ``logger=mlflow`` beside csv: real files written offline, read back."""

from __future__ import annotations

import csv
import sys

import pytest

from dpo_lightning.reporting.loggers import mlflow_logger, tensorboard_logger
from dpo_lightning.run.errors import UserError
from tests.conftest import run_cli


def test_tensorboard_and_mlflow_write_what_csv_writes(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run_cli(["logger=[csv,tensorboard,mlflow]", "debug=fast", f"hydra.run.dir={run}"], tmp_path)
    rows = [r for r in csv.DictReader((run / "csv" / "metrics.csv").open()) if r.get("train/loss")]
    expected = [(int(r["step"]), float(r["train/loss"])) for r in rows]
    assert [s for s, _ in expected] == [0, 1, 2]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/rewards/accuracies", "val/loss"} <= set(events.Tags()["scalars"])
    scalars = events.Scalars("train/loss")
    assert [e.step for e in scalars] == [s for s, _ in expected]
    assert [e.value for e in scalars] == pytest.approx([v for _, v in expected])

    import mlflow

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = mlflow.MlflowClient(f"file:{run / 'mlruns'}")
    (found,) = client.search_runs([client.get_experiment_by_name("dpo-lightning").experiment_id])
    assert found.info.status == "FINISHED"
    history = client.get_metric_history(found.info.run_id, "train/loss")
    assert [m.step for m in history] == [s for s, _ in expected]
    assert [m.value for m in history] == pytest.approx([v for _, v in expected])
    assert found.data.params["loss/beta"] == "0.1"  # the resolved config, flattened
    assert "val/rewards/accuracies" in found.data.metrics


@pytest.mark.parametrize(
    ("factory", "module"), [(tensorboard_logger, "tensorboard"), (mlflow_logger, "mlflow")]
)
def test_a_missing_logger_package_is_one_line_with_the_install_command(
    factory, module, monkeypatch, tmp_path
):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    with pytest.raises(UserError, match=r"pip install 'dpo-lightning\[loggers\]'") as err:
        factory(save_dir=str(tmp_path))
    assert "\n" not in str(err.value)
