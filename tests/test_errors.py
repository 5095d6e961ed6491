"""Every known failure: one readable line (``dpo-train: error: ...``), exit code 2, no traceback.

Config/path failures must come before any tokenizing or model work, within seconds. CLI runs
cover the Hydra-level failures; the rest run ``train()`` in-process under the same wrapper.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from dpo_lightning.run.errors import EXIT_CODE, report_errors
from dpo_lightning.train import train
from tests.conftest import compose, run_cli

SMALL = [
    "data.generator.n=60",
    "data.batch_size=8",
    "trainer.log_every_n_steps=1",
    "callbacks.progress_bar=null",
    "trainer.val_check_interval=4",
]


def _compose(overrides: list[str], run_dir: Path):
    """The composed config without its ``hydra`` node (logged hyperparameters resolve every key,
    and ``hydra.sweep.subdir`` only resolves inside a real multirun)."""
    from omegaconf import open_dict

    cfg = compose(overrides, run_dir)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def _cli_error(args: list[str], tmp_path: Path) -> str:
    proc = run_cli(args, tmp_path, check=False, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == EXIT_CODE, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("dpo-train: error: ")
    return line


def _error(overrides: list[str], tmp_path: Path, capsys, run_dir: Path | None = None) -> str:
    """Run train() in-process; return the one error line (asserts exit code and no traceback)."""
    run_dir = run_dir or tmp_path / "run"
    cfg = _compose([*overrides, f"paths.output_dir={run_dir}"], run_dir)
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exc, report_errors():
        train(cfg)
    assert exc.value.code == EXIT_CODE
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("dpo-train: error: ") and "Traceback" not in "\n".join(err)
    _error.seconds = time.perf_counter() - start
    return err[-1]


def _assert_before_training(tmp_path: Path) -> None:
    assert _error.seconds < 10
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "csv").exists()


# -- Hydra-level: CLI -----------------------------------------------------------------------------
def test_unknown_group_option_lists_choices(tmp_path):
    line = _cli_error([f"hydra.run.dir={tmp_path}", "model=nope"], tmp_path)
    assert "Could not find 'model/nope'" in line and "valid choices: hf, tiny" in line


def test_unknown_key_lists_valid_keys(tmp_path):
    line = _cli_error([f"hydra.run.dir={tmp_path}", "data.batchsize=4"], tmp_path)
    assert "Key 'batchsize' is not in struct" in line
    valid = line.split("valid keys under data:")[1]
    assert {"batch_size", "eval_batch_size", "max_length"} <= {k.strip() for k in valid.split(",")}


def test_unwritable_output_dir(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    line = _cli_error([f"hydra.run.dir={blocker}/run"], tmp_path)
    assert f"cannot use {blocker}/run" in line and "hydra.run.dir" in line


# -- preflight: in-process ----------------------------------------------------------------------
def test_missing_model_path(tmp_path, capsys):
    line = _error(["model=hf", f"model.name_or_path={tmp_path}/nowhere"], tmp_path, capsys)
    assert f"model.name_or_path='{tmp_path}/nowhere' does not exist" in line
    _assert_before_training(tmp_path)


def test_unreadable_model_folder(tmp_path, capsys):
    (tmp_path / "empty_model").mkdir()
    line = _error(["model=hf", f"model.name_or_path={tmp_path}/empty_model"], tmp_path, capsys)
    assert "is not a model folder (no config.json)" in line
    (tmp_path / "empty_model" / "config.json").write_text("{not json")
    line = _error(["model=hf", f"model.name_or_path={tmp_path}/empty_model"], tmp_path, capsys)
    assert "cannot read" in line and "config.json" in line


def test_hub_id_while_offline_fails_fast(tmp_path, capsys):
    line = _error(["model=hf", "model.name_or_path=some-org/not-cached-model"], tmp_path, capsys)
    assert "hub is offline (HF_HUB_OFFLINE=1)" in line and "local folder" in line
    _assert_before_training(tmp_path)


def test_hub_id_with_unreachable_hub_fails_fast(tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    from dpo_lightning.run import preflight

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(preflight, "hub_reachable", lambda endpoint: False)
    line = _error(["model=hf", "model.name_or_path=some-org/model"], tmp_path, capsys)
    assert "cannot be reached" in line and "go online" in line


def test_hub_probe_is_fast_on_a_closed_port():
    from dpo_lightning.run.preflight import hub_reachable

    start = time.perf_counter()
    assert not hub_reachable("http://127.0.0.1:9", timeout=2.0)  # discard port: refused
    assert time.perf_counter() - start < 3


def test_max_length_longer_than_context(tmp_path, capsys):
    line = _error(["model.config.max_position_embeddings=32", "data.max_length=64"], tmp_path, capsys)
    assert "data.max_length=64 is longer than the model's context (32 positions)" in line
    _assert_before_training(tmp_path)


def test_tokenizer_without_pad_uses_eos_and_says_so(tmp_path, tokenizer, capsys):
    from dpo_lightning.models.tokenizers import load_tokenizer

    tok = tokenizer.__class__.from_pretrained(_saved(tokenizer, tmp_path / "t"))
    tok.pad_token = None
    tok.save_pretrained(tmp_path / "nopad")
    loaded = load_tokenizer(str(tmp_path / "nopad"))
    assert loaded.pad_token == loaded.eos_token == "</s>"
    assert "has no pad token: using eos '</s>'" in capsys.readouterr().out


def _saved(tok, folder: Path) -> str:
    tok.save_pretrained(folder)
    return str(folder)


# -- during training: injected faults ------------------------------------------------------------
def test_gpu_oom_suggests_memory_knobs(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DPO_LIGHTNING_FAULTS", "oom@1")
    line = _error([*SMALL, "trainer.max_steps=3"], tmp_path, capsys)
    assert line.startswith("dpo-train: error: out of GPU memory (CUDA out of memory.")
    for knob in (
        "data.batch_size",
        "trainer.accumulate_grad_batches",
        "data.max_length",
        "bf16-mixed",
    ):
        assert knob in line


def test_disk_full_while_checkpointing_keeps_previous(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DPO_LIGHTNING_FAULTS", "enospc@4")
    line = _error(
        [*SMALL, "trainer.max_steps=6", "callbacks.checkpoint.every_n_train_steps=2"],
        tmp_path,
        capsys,
    )
    ckpts = tmp_path / "run" / "checkpoints"
    assert f"could not write checkpoint {ckpts}/step4.ckpt (disk full)" in line
    assert "previous checkpoints kept: ['last.ckpt', 'step2.ckpt']" in line and "resume=true" in line
    # no temp file; each kept checkpoint with its digest record
    assert sorted(p.name for p in ckpts.iterdir()) == [
        "last.ckpt",
        "last.ckpt.sha256.json",
        "step2.ckpt",
        "step2.ckpt.sha256.json",
    ]
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 2


def test_nonfinite_gradient_stop_names_step_and_rows(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DPO_LIGHTNING_FAULTS", "nan@1")
    line = _error([*SMALL, "trainer.max_steps=3"], tmp_path, capsys)
    assert "non-finite gradient" in line and "at step 2 (epoch 0, batch 1), data rows [" in line
    assert "train.on_nonfinite=skip" in line


def test_nonfinite_gradient_skip_counts_in_summary(tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_LIGHTNING_FAULTS", "nan@1")
    cfg = _compose(
        [
            *SMALL,
            "trainer.max_steps=3",
            "train.on_nonfinite=skip",
            f"paths.output_dir={tmp_path / 'run'}",
        ],
        tmp_path / "run",
    )
    train(cfg)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["nonfinite_steps_skipped"] == 1 and summary["steps"] == 3
    assert summary["train"]["loss"] is not None


def test_pickled_weights_are_refused(tmp_path, tiny_model, capsys):
    folder = tmp_path / "bin_model"
    folder.mkdir()
    tiny_model.config.to_json_file(folder / "config.json")
    torch.save(tiny_model.state_dict(), folder / "pytorch_model.bin")  # a pickle
    line = _error(["model=hf", f"model.name_or_path={folder}"], tmp_path, capsys)
    assert "has no .safetensors weights" in line and "safe_serialization=True" in line


@pytest.mark.parametrize("name", ["hf", "tiny"])
def test_remote_code_is_off_by_default(name):
    cfg = compose([f"model={name}"] + (["model.name_or_path=x/y"] if name == "hf" else []))
    assert cfg.model.trust_remote_code is False


def test_checkpoint_from_elsewhere_or_another_version_is_refused(tmp_path, capsys):
    import dpo_lightning
    from dpo_lightning.run.resume import run_config

    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}, "global_step": 3}, foreign)
    line = _error([f"ckpt_path={foreign}"], tmp_path, capsys)
    assert f"checkpoint {foreign} was not written by dpo_lightning" in line
    _assert_before_training(tmp_path)

    cfg = _compose([f"paths.output_dir={tmp_path / 'run'}"], tmp_path / "run")
    meta = {"version": "0.0.1", "config": json.dumps(run_config(cfg)), "rng": {}}
    old = tmp_path / "old.ckpt"
    torch.save({"global_step": 3, "dpo_lightning": meta}, old)
    line = _error([f"ckpt_path={old}"], tmp_path, capsys)
    assert f"written by dpo_lightning 0.0.1, this is {dpo_lightning.__version__}" in line

    line = _error([f"ckpt_path={tmp_path / 'missing.ckpt'}"], tmp_path, capsys)
    assert "missing.ckpt' does not exist" in line
