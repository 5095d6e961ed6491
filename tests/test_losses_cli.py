"""Every ``loss=`` and ``reference=`` choice composes, pairs correctly and trains a few steps."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from dpo_lightning.data.datamodule import PreferenceDataModule
from dpo_lightning.data.synthetic import sentiment_pairs
from dpo_lightning.reference import NoReference
from dpo_lightning.stages.dpo import DPOModule
from tests.conftest import CONF_DIR, compose, make_tiny_model, run_cli

LOSSES = sorted(p.stem for p in (CONF_DIR / "loss").glob("*.yaml"))
REFERENCE_FREE = {"simpo", "orpo", "sft"}


def test_every_issue_loss_has_a_config():
    issue = [
        "dpo",
        "cdpo",
        "robust",
        "hinge",
        "ipo",
        "exo_pair",
        "nca_pair",
        "bco_pair",
        "sppo_hard",
        "aot",
        "aot_unpaired",
        "apo_zero",
        "apo_down",
        "discopop",
        "sigmoid_norm",
        "simpo",
        "orpo",
        "rpo",
        "sft",
        "mix",
        "kto",  # issue 13: unpaired, f-divergence, length-desensitised
        "bco",
        "f_dpo",
        "ld_dpo",
    ]
    assert set(issue) <= set(LOSSES)


@pytest.fixture(scope="module")
def datamodule(tokenizer):
    dm = PreferenceDataModule(
        tokenizer, generator=functools.partial(sentiment_pairs, n=40), batch_size=4, max_length=96
    )
    dm.setup("fit")
    return dm


def build(overrides, tokenizer):
    cfg = compose(overrides)
    loss = instantiate(cfg.loss)
    return DPOModule(
        policy=make_tiny_model(len(tokenizer)),
        loss=loss,
        optimizer=instantiate(cfg.optim.optimizer),
        reference=instantiate(cfg.reference),
    )


@pytest.fixture(scope="module")
def unpaired_datamodule(tokenizer):
    """The same pairs as labelled completions (data.unpair=true), for the unpaired losses."""
    dm = PreferenceDataModule(
        tokenizer,
        generator=functools.partial(sentiment_pairs, n=40),
        batch_size=4,
        max_length=96,
        unpair=True,
    )
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("name", LOSSES)
def test_every_loss_trains_two_steps(name, tokenizer, datamodule, unpaired_datamodule):
    reference = "none" if name in REFERENCE_FREE else "copy"
    module = build([f"loss={name}", f"reference={reference}"], tokenizer)
    if module.loss_fn.unpaired:
        datamodule = unpaired_datamodule
    assert module.loss_fn.is_reference_free == (name in REFERENCE_FREE)
    before = [p.clone() for p in module.policy.parameters()]
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 2
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    moved = any(not torch.equal(a, b) for a, b in zip(before, module.policy.parameters(), strict=True))
    assert moved, f"loss={name} did not update the policy"


@pytest.mark.parametrize("name", ["dpo", "simpo", "mix"])
def test_default_reference_follows_the_loss(name, tokenizer):
    """reference=auto (the default): a frozen copy iff the loss reads reference log-probs."""
    module = build([f"loss={name}"], tokenizer)
    assert (module.reference_model is not None) != module.loss_fn.is_reference_free
    assert isinstance(module.reference, NoReference) == module.loss_fn.is_reference_free


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["loss=dpo", "reference=none"], "needs reference log-probs"),
        (["loss=ipo", "reference=none"], "needs reference log-probs"),
        (["loss=simpo", "reference=copy"], "reference-free"),
        (["loss=orpo", "reference=precomputed"], "reference-free"),
        (["loss=sft", "reference=sync"], "reference-free"),
    ],
)
def test_mismatched_loss_and_reference_fail_in_one_line(overrides, message, tokenizer):
    with pytest.raises(ValueError, match=message) as err:
        build(overrides, tokenizer)
    assert "\n" not in str(err.value)


@pytest.mark.slow  # one real subprocess run (~15-35 s on a shared CPU)
def test_cli_mix_loss_with_precomputed_reference(tmp_path):
    cache = tmp_path / "cache"
    args = [
        "loss=mix",
        "reference=precomputed",
        f"reference.cache_dir={cache}",
        "debug=fast",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "logger=csv",
        "data.generator.n=200",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    run_cli(args, tmp_path)
    summary = json.loads(Path(tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2
    assert len(list(cache.glob("*.pt"))) == 1
    assert "loss" in summary["val"]
