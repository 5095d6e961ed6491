"""Issue 12 §2: every known bad input fails with ``dpo-train: error: <one line naming the key or
file and what to do>``, exit code 2, before any model work (``build_policy`` is made to fail the
test if reached), within seconds.

Each case fed a Python traceback (exit 1) before: data files (empty, blank lines, csv header
only, one row, all rows invalid under skip, capitalised csv headers, missing / mistyped paths),
settings (batch sizes, lengths, steps, lr, seed, devices, enum typos, β for every loss, the
adapter reference without LoRA), W&B online with a bad key, and ``dpo-sentiment`` stage settings.
"""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path

import pytest
import yaml
from omegaconf import open_dict

import dpo_lightning.train as train_mod
from dpo_lightning.run.errors import EXIT_CODE, report_errors
from dpo_lightning.train import train
from tests.conftest import CONF_DIR, REPO, compose, run_cli
from tests.standins import write_pairs

FAST = [
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=1",
    "callbacks.progress_bar=null",
]


@pytest.fixture
def no_model(monkeypatch):
    """Reaching the model is a test failure: every error here must come before it."""
    monkeypatch.setattr(train_mod, "build_policy", lambda *a, **k: pytest.fail("the model was built"))


def _cfg(overrides: list[str], run_dir: Path):
    small = [] if any(o.startswith("data=") for o in overrides) else ["data.generator.n=48"]
    cfg = compose([*FAST, *small, *overrides, f"paths.output_dir={run_dir}"], run_dir)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def _error(overrides: list[str], tmp_path: Path, capsys, prog: str = "dpo-train") -> str:
    """train() under report_errors: the one error line (exit code, no traceback, < 10 s)."""
    cfg = _cfg(overrides, tmp_path / "run")
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exc, report_errors(prog):
        train(cfg)
    assert exc.value.code == EXIT_CODE
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith(f"{prog}: error: ") and "Traceback" not in "\n".join(lines)
    assert time.perf_counter() - start < 10
    assert not (tmp_path / "run" / "checkpoints").exists()
    return lines[-1]


def _summary(overrides: list[str], run_dir: Path) -> dict:
    train(_cfg(overrides, run_dir))
    return json.loads((run_dir / "summary.json").read_text())


# -- data files ------------------------------------------------------------------------------------
def _file(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("empty.jsonl", "", "has no rows (an empty file"),
        ("blank.jsonl", "\n  \n\n", "has no rows (an empty file, blank lines only"),
        ("header.csv", "prompt,chosen,rejected\n", "has no rows (an empty file, or a csv header alone)"),
        ("one.jsonl", '{"prompt": "p", "chosen": "a", "rejected": "b"}\n', "1 usable row(s)"),
    ],
)
def test_empty_and_one_row_files(name, text, message, tmp_path, capsys, no_model):
    path = _file(tmp_path, name, text)
    line = _error([f"data.path={path}"], tmp_path, capsys)
    assert message in line and name in line


def test_all_rows_invalid_under_skip(tmp_path, capsys, no_model):
    same = json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"})
    path = _file(tmp_path, "same.jsonl", "\n".join([same] * 5))
    line = _error([f"data.path={path}", "data.on_invalid=skip"], tmp_path, capsys)
    assert "no usable rows left for train (5 read, 5 dropped: {'chosen_equals_rejected': 5})" in line


def test_capitalised_csv_headers_name_the_mapping(tmp_path, capsys, no_model):
    rows = "".join(f"p{i},good {i},bad {i}\n" for i in range(6))
    path = _file(tmp_path, "caps.csv", "Prompt,Chosen,Rejected\n" + rows)
    line = _error([f"data.path={path}"], tmp_path, capsys)
    assert "only in case: map them with data.columns.prompt=Prompt data.columns.chosen=Chosen" in line


def test_capitalised_csv_headers_train_once_mapped(tmp_path):
    rows = "".join(f"p{i},good {i},bad {i}\n" for i in range(6))
    path = _file(tmp_path, "caps.csv", "Prompt,Chosen,Rejected\n" + rows)
    cols = ["data.columns.prompt=Prompt", "data.columns.chosen=Chosen", "data.columns.rejected=Rejected"]
    summary = _summary([f"data.path={path}", *cols], tmp_path / "run")
    assert summary["data"][str(path)]["rows_kept"] == 6


@pytest.mark.parametrize(
    "path", ["/nonexistent/dir/pairs.jsonl", "pairs_tpyo.jsonl", "./data/pairs", "runs/a/x.csv"]
)
def test_missing_path_is_no_such_file_never_a_hub_id(path, tmp_path, capsys, no_model, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = _error([f"data.path={path}"], tmp_path, capsys)
    assert f"data.path={path!r}: no such file or folder" in line and "hub" in line  # says what a hub id is


def test_hub_dataset_offline_is_one_line(tmp_path, capsys, no_model):
    line = _error(["data=hh_rlhf"], tmp_path, capsys)
    assert "data.path='Anthropic/hh-rlhf' is a hub dataset id that cannot be loaded" in line
    assert "local copy" in line


def test_json_with_split_keys_is_read_as_splits(tmp_path):
    """``{"train": [...], "validation": [...]}``: its splits (it used to be read as JSON Lines and
    every line reported as malformed_json_line), with format auto and with format=standard."""
    rows = [json.loads(line) for line in write_pairs(tmp_path / "p.jsonl", n=30).read_text().splitlines()]
    path = tmp_path / "splits.json"
    path.write_text(json.dumps({"train": rows[:24], "validation": rows[24:]}, indent=1))
    for i, fmt in enumerate([[], ["data.format=standard"]]):
        summary = _summary([f"data.path={path}", *fmt], tmp_path / f"run{i}")
        assert summary["data"][f"{path}[train]"]["rows_kept"] == 24
        assert summary["data"][f"{path}[validation]"]["rows_kept"] == 6
        assert summary["rows_dropped"] == 0


def test_json_split_keys_without_the_train_split(tmp_path, capsys, no_model):
    row = {"prompt": "p", "chosen": "a", "rejected": "b"}
    path = _file(tmp_path, "s.json", json.dumps({"dev": [row, row], "test": [row]}))
    line = _error([f"data.path={path}"], tmp_path, capsys)
    assert "has no split 'train'; it has ['dev', 'test']: set data.train_split" in line


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".csv.gz"])
def test_compressed_files_are_read(suffix, tmp_path):
    rows = [json.loads(line) for line in write_pairs(tmp_path / "p.jsonl", n=20).read_text().splitlines()]
    path = tmp_path / f"pairs{suffix}"
    if suffix == ".jsonl.gz":
        text = "".join(json.dumps(r) + "\n" for r in rows)
    else:
        import csv
        import io

        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=["prompt", "chosen", "rejected"])
        writer.writeheader()
        writer.writerows(rows)
        text = buf.getvalue()
    path.write_bytes(gzip.compress(text.encode()))
    summary = _summary([f"data.path={path}"], tmp_path / "run")
    assert summary["data"][str(path)]["rows_in"] == 20 and summary["rows_dropped"] == 0


# -- settings --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.batch_size=0"], "data.batch_size=0: must be an integer ≥ 1"),
        (["data.batch_size=-4"], "data.batch_size=-4: must be an integer ≥ 1"),
        (["data.eval_batch_size=0"], "data.eval_batch_size=0: must be an integer ≥ 1"),
        (
            ["trainer.max_steps=-1"],
            "trainer.max_steps=-1: must be an integer ≥ 1, or -1 with trainer.max_epochs ≥ 1",
        ),
        (
            ["trainer.max_steps=0"],
            "trainer.max_steps=0: must be an integer ≥ 1, or -1 with trainer.max_epochs ≥ 1 (train that "
            "many epochs); 0 would export the untrained model",
        ),
        (["optim.optimizer.lr=-1e-4"], "optim.optimizer.lr=-0.0001: must be a finite number ≥ 0"),
        (["seed=abc"], "seed='abc': must be an integer in [0, 4294967295]"),
        (
            ["data.on_invalid=skp"],
            "data.on_invalid='skp': must be one of 'error', 'skip'; did you mean 'skip'?",
        ),
        (
            ["data.format=standrd"],
            "data.format='standrd': must be one of 'auto', 'conversational', 'implicit_prompt', "
            "'ranked', 'standard', 'unpaired', 'unpaired_conversational'; did you mean 'standard'?",
        ),
        (
            ["data.truncation_mode=keep_middle"],
            "data.truncation_mode='keep_middle': must be one of 'keep_end', 'keep_start'",
        ),
        (
            ["data.padding_side=lefty"],
            "data.padding_side='lefty': must be one of 'right', 'left'; did you mean 'left'?",
        ),
        (["data.max_length=1"], "data.max_length=1: must be an integer ≥ 2"),
        (["data.max_prompt_length=0"], "data.max_prompt_length=0: must be an integer in [1, 512)"),
        (
            ["data.max_length=64", "data.max_prompt_length=64"],
            "data.max_prompt_length=64: must be an integer in [1, 64)",
        ),
        (["model.dtype=float33"], "model.dtype='float33': must be one of 'float32', 'bfloat16', 'float16'"),
        (["optim.scheduler.name=cosin"], "optim.scheduler: cosin is not a valid SchedulerType"),
        (["optim.optimizer.betas=[1.5,0.9]"], "optim.optimizer: Invalid beta parameter at index 0: 1.5"),
        (["trainer.precision=17"], "trainer: Precision 17 is invalid"),
        (
            ["trainer.accelerator=gpu"],
            "trainer.accelerator='gpu': must be 'cpu' or 'auto' here: no gpu device is visible",
        ),
        (["trainer=gpu"], "use trainer=cpu (or trainer.accelerator=cpu)"),
        (["reference=adapter"], "reference=adapter needs a LoRA policy: set model.lora"),
        (["reference=sync", "reference.alpha=2"], "reference.alpha=2: must be a finite number in (0, 1]"),
        (["reference=none"], "loss DPOLoss needs reference log-probs but reference=NoReference gives none"),
        (["loss=simpo", "reference=copy"], "loss SimPOLoss is reference-free but reference=CopyReference"),
        (
            ["loss=mix", "loss.components.0.loss.beta=-1"],
            "loss.components.0.loss.beta=-1: must be a finite number > 0",
        ),
        (
            ["loss=mix", "loss.components.1.weight=-1"],
            "loss.components.1.weight=-1: must be a finite number ≥ 0",
        ),
        (["experiment=lora", "model.lora.r=0"], "model.lora.r=0: must be an integer ≥ 1"),
        (["engine=packed", "engine.chunk_size=0"], "engine.chunk_size=0: must be an integer ≥ 1 (or null)"),
        (["model.tokenizer=/nonexistent/tok"], "cannot load the tokenizer '/nonexistent/tok'"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_bad_setting_is_one_line_before_any_model_work(overrides, message, tmp_path, capsys, no_model):
    line = _error(overrides, tmp_path, capsys)
    assert message in line, line


def _losses_with_beta() -> list[str]:
    return sorted(
        p.stem for p in (CONF_DIR / "loss").glob("*.yaml") if "beta" in yaml.safe_load(p.read_text())
    )


@pytest.mark.parametrize("loss", _losses_with_beta())
@pytest.mark.parametrize("beta", ["0", "-0.5", "nan", "inf"])
def test_beta_must_be_positive_and_finite_for_every_loss(loss, beta, tmp_path, capsys, no_model):
    """β = 0 trains nothing and β < 0 trains toward the rejected answers (with good-looking
    margins): refused for every loss that has a β."""
    line = _error([f"loss={loss}", f"loss.beta={beta}"], tmp_path, capsys)
    assert f"loss.beta={float(beta) if '.' in beta or beta in ('nan', 'inf') else int(beta)!r}" in line
    assert "must be a finite number > 0" in line


def test_losses_with_beta_are_all_found():
    assert len(_losses_with_beta()) == 22  # all but sft (no β) and mix (its components have theirs)


def test_max_steps_minus_one_with_an_epoch_limit_trains_that_epoch(tmp_path):
    summary = _summary(
        ["trainer.max_steps=-1", "trainer.max_epochs=1", "data.generator.n=40"], tmp_path / "r"
    )
    assert summary["steps"] == 3  # 38 training rows / batch 16, one epoch


def test_hydra_instantiation_error_is_unwrapped_and_rekeyed():
    """A constructor's SettingError raised inside Hydra's InstantiationException comes out under
    its full config key (``build``); a bug (any other error) still raises as it was."""
    from dpo_lightning.run.errors import SettingError
    from dpo_lightning.run.settings import build

    cfg = compose(["loss=ipo", "loss.beta=-2"])
    with pytest.raises(SettingError, match=r"^loss\.beta=-2: must be a finite number > 0"):
        build(cfg, "loss")
    with open_dict(cfg):
        cfg.loss = {"_target_": "dpo_lightning.losses.IPOLoss", "nope": 1}
    with pytest.raises(Exception, match="nope") as err:
        build(cfg, "loss")
    assert not isinstance(err.value, SettingError)


def test_cli_bad_setting_and_path_are_one_line(tmp_path):
    """Through the real CLI: Hydra parses ``seed=abc`` as a string; a mistyped relative path."""
    for args, message in (
        (["seed=abc"], "seed='abc': must be an integer"),
        (["data.path=no_such_pairs.jsonl"], "data.path='no_such_pairs.jsonl': no such file or folder"),
    ):
        proc = run_cli([*args, f"hydra.run.dir={tmp_path}/run"], tmp_path, check=False)
        assert proc.returncode == EXIT_CODE, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith(f"dpo-train: error: {message}")


# -- the README's error section -----------------------------------------------------------------------
def _readme_errors() -> str:
    text = (REPO / "README.md").read_text()
    return text.split("## Errors: one line, exit code 2")[1].split("\n## ")[0]


def test_readme_error_section_lists_exactly_what_is_tested():
    """Every config key the section names is exercised by a test, and every setting this file
    refuses is named in the section."""
    import re

    section = _readme_errors()
    named = set(re.findall(r"`([a-z_]+(?:\.[a-z_0-9]+)+)", section))
    tests = "\n".join(p.read_text() for p in (REPO / "tests").glob("test_*.py"))
    untested = sorted(k for k in named if k not in tests)
    assert not untested, f"README error section names untested keys: {untested}"
    here = Path(__file__).read_text()
    refused = set(re.findall(r'\(\["([a-z_]+(?:\.[a-z_]+)+)=', here))
    refused -= {"loss.components", "engine.chunk_size", "model.lora", "reference.alpha", "model.tokenizer"}
    missing = sorted(k for k in refused if k not in section)
    assert not missing, f"refused here but not listed in the README error section: {missing}"


def test_a_run_that_took_no_step_says_so(tmp_path, capsys):
    """No optimizer step (here: no training batch) exports the initial model: the log says so."""
    _summary(["+trainer.limit_train_batches=0"], tmp_path / "run")
    assert "warning: no optimizer step was taken" in capsys.readouterr().out
