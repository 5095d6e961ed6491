"""The user's first command: ``model.name_or_path`` and ``data.path`` work alone (issue 12 §1).

``dpo-train model.name_or_path=<folder>`` with the default groups trains that model with its own
tokenizer (it used to keep model=tiny's built-in BPE: wrong ids for a vocab ≥ 512, an IndexError
below); ``dpo-train data.path=<file>`` trains on that file (it used to stop with "give exactly
one of data.path or data.generator").
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import open_dict
from transformers import AutoConfig

from dpo_lightning.run.errors import EXIT_CODE, report_errors
from dpo_lightning.train import build_tokenizer, train
from tests.conftest import compose
from tests.standins import make_model_folder, same_tokenizer, write_pairs

FAST = [
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=1",
    "callbacks.progress_bar=null",
    "data.generator.n=48",
]


def _cfg(overrides: list[str], run_dir: Path):
    cfg = compose([*FAST, *overrides, f"paths.output_dir={run_dir}"], run_dir)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def _train(overrides: list[str], run_dir: Path) -> dict:
    train(_cfg(overrides, run_dir))
    return json.loads((run_dir / "summary.json").read_text())


def _error(overrides: list[str], run_dir: Path, capsys) -> str:
    with pytest.raises(SystemExit) as exc, report_errors():
        train(_cfg(overrides, run_dir))
    assert exc.value.code == EXIT_CODE
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("dpo-train: error: ") and "Traceback" not in "\n".join(lines)
    return lines[-1]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[int, Path]:
    """Stand-in model folders by vocab size: 600 (≥ model=tiny's 512) and 300 (below it)."""
    root = tmp_path_factory.mktemp("models")
    return {v: make_model_folder(root / f"vocab{v}", vocab_size=v) for v in (600, 300)}


@pytest.mark.parametrize("vocab", [600, 300])
def test_model_name_or_path_alone_trains_that_model_with_its_own_tokenizer(models, vocab, tmp_path):
    run = tmp_path / "run"
    summary = _train([f"model.name_or_path={models[vocab]}"], run)
    assert summary["steps"] == 2
    export = run / "hf_model"
    assert same_tokenizer(export, models[vocab])
    assert (
        AutoConfig.from_pretrained(export).vocab_size == AutoConfig.from_pretrained(models[vocab]).vocab_size
    )


def test_data_path_alone_trains_on_that_file(tmp_path):
    pairs = write_pairs(tmp_path / "pairs.jsonl", n=40)
    summary = _train([f"data.path={pairs}"], tmp_path / "run")
    report = summary["data"][str(pairs)]
    assert report["rows_in"] == 40 and report["rows_kept"] == 40
    assert not any("sentiment_pairs" in source for source in summary["data"])  # not the generator


def test_relative_data_path_alone_is_read_from_the_working_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_pairs(tmp_path / "pairs.jsonl", n=40)
    summary = _train(["data.path=pairs.jsonl"], tmp_path / "run")
    assert summary["data"]["pairs.jsonl"]["rows_kept"] == 40


def test_train_docstring_command_with_standins(models, tmp_path, monkeypatch, capsys):
    """``dpo-train model.name_or_path=gpt2 data.path=data.jsonl trainer=gpu``, gpt2 and
    data.jsonl stood in locally: here (no GPU) the only refusal is the GPU, in one line; with
    trainer=cpu it trains that model with its own tokenizer on that data."""
    monkeypatch.chdir(tmp_path)
    write_pairs(tmp_path / "data.jsonl", n=40)
    args = [f"model.name_or_path={models[600]}", "data.path=data.jsonl"]
    line = _error([*args, "trainer=gpu"], tmp_path / "gpu", capsys)
    assert "trainer.accelerator='gpu'" in line and "trainer=cpu" in line
    summary = _train([*args, "trainer=cpu"], tmp_path / "run")
    assert summary["data"]["data.jsonl"]["rows_kept"] == 40
    assert same_tokenizer(tmp_path / "run" / "hf_model", models[600])


def test_model_hf_is_the_same_model_with_name_or_path_required(models, tmp_path):
    hf = compose(["model=hf", f"model.name_or_path={models[600]}"], tmp_path).model
    alone = compose([f"model.name_or_path={models[600]}"], tmp_path).model
    assert set(hf) == set(alone)  # one schema: the same keys, one setting per behaviour
    differ = {k for k in hf if hf[k] != alone[k]}
    assert differ == {"config", "config_tokenizer"}  # both unused once name_or_path is set
    assert build_tokenizer(hf).get_vocab() == build_tokenizer(alone).get_vocab()
    with pytest.raises(Exception, match="name_or_path"):
        _ = compose(["model=hf"], tmp_path).model.name_or_path  # ??? : required


def test_tokenizer_override_wins_and_a_built_model_needs_one(models, tmp_path, capsys):
    cfg = compose([f"model.name_or_path={models[300]}", f"model.tokenizer={models[600]}"], tmp_path)
    assert len(build_tokenizer(cfg.model)) == len(
        build_tokenizer(compose([f"model.name_or_path={models[600]}"]).model)
    )
    line = _error(["model.config_tokenizer=null"], tmp_path / "run", capsys)
    assert "model.config builds a new model but no tokenizer is set" in line


def test_tokenizer_larger_than_the_embedding_is_refused(models, tmp_path, capsys):
    line = _error(
        [f"model.name_or_path={models[300]}", f"model.tokenizer={models[600]}"], tmp_path / "run", capsys
    )
    assert "the tokenizer has 600 tokens but the model's embedding has 300 rows" in line


def test_a_gemma2_folder_trains_packed_with_model_hf_defaults(tmp_path, caplog):
    """Gemma-2 refuses SDPA in transformers 5.24: ``model.attn_implementation`` defaults to the
    model's own choice, so a soft-capped, sliding-window checkpoint trains with no other setting
    (packed: the engine switches it to per-document attention)."""
    import logging

    from dpo_lightning.models.tokenizers import train_bpe_tokenizer
    from tests.test_engine_auto import _gemma2

    folder = tmp_path / "gemma2"
    tok = train_bpe_tokenizer(["a b c d e f g h", "good bad fine great awful"] * 50, 300)
    model = _gemma2(max_position_embeddings=512)
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
        args = ["model=hf", f"model.name_or_path={folder}", "data.max_length=256"]
        summary = _train(args, tmp_path / "run")
    assert summary["steps"] == 2
    assert "engine=auto: packed rows (padding-free, prefix sharing, chunked LM head)" in caplog.text
