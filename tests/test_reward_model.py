"""Reward model: Bradley–Terry values, last-token pooling, shared backbone, training, export."""

from __future__ import annotations

import functools
import math

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from transformers import AutoModelForSequenceClassification

from dpo_lightning.data.collate import PreferenceCollator
from dpo_lightning.data.datamodule import PreferenceDataModule
from dpo_lightning.data.synthetic import sentiment_pairs
from dpo_lightning.engine import PackedEngine
from dpo_lightning.losses import reward_model_loss
from dpo_lightning.stages.reward_model import (
    RewardModelModule,
    last_token_index,
    reward_model_from_causal_lm,
    sequence_rewards,
)
from tests.conftest import compose, make_tiny_model


def test_bradley_terry_hand_worked():
    # rewards r = [1, 0, 2]; pairs 0≻1 and 2≻1: -log σ(1) = 0.313262, -log σ(2) = 0.126928
    losses = reward_model_loss(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0, 2]), torch.tensor([1, 1]))
    torch.testing.assert_close(losses, torch.tensor([0.313262, 0.126928]), atol=1e-6, rtol=0)
    assert losses[0].item() == pytest.approx(math.log1p(math.exp(-1)))


def test_last_token_index_left_and_right_padding():
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    assert last_token_index(right).tolist() == [2, 3]
    assert last_token_index(left).tolist() == [3, 3]


@pytest.fixture(scope="module")
def datamodule(tokenizer):
    dm = PreferenceDataModule(
        tokenizer,
        generator=functools.partial(sentiment_pairs, n=300),
        batch_size=16,
        eval_batch_size=32,
        val_fraction=0.2,
        max_length=128,
    )
    dm.setup("fit")
    return dm


def test_reward_reads_the_last_real_token_and_shares_the_backbone(tokenizer, datamodule):
    lm = make_tiny_model(len(tokenizer))
    rm = reward_model_from_causal_lm(lm)
    assert rm.base_model is lm.base_model  # no copy of the backbone
    head = rm.score.weight.numel()
    assert (
        sum(p.numel() for p in rm.parameters()) == sum(p.numel() for p in lm.base_model.parameters()) + head
    )
    examples = [datamodule.val_set[i] for i in range(3)]
    right = PreferenceCollator(tokenizer.pad_token_id, "right")(examples)
    left = PreferenceCollator(tokenizer.pad_token_id, "left")(examples)
    with torch.no_grad():
        r_right = sequence_rewards(rm, right["input_ids"], right["attention_mask"])
        r_left = sequence_rewards(rm, left["input_ids"], left["attention_mask"])
        # naive: the unpadded row alone, head on its final hidden state
        row = right["input_ids"][0, : int(right["attention_mask"][0].sum())]
        hidden = lm.base_model(input_ids=row[None]).last_hidden_state[0, -1]
    torch.testing.assert_close(r_right, r_left, atol=1e-5, rtol=0)
    torch.testing.assert_close(r_right[0], (rm.score.weight @ hidden).squeeze(), atol=1e-5, rtol=0)


def test_reward_model_learns_and_exports(tokenizer, datamodule, tmp_path):
    L.seed_everything(0)
    module = RewardModelModule(
        make_tiny_model(len(tokenizer)), optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3)
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=30,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    before = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    trainer.fit(module, datamodule=datamodule)
    after = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    assert after["val/loss"] < before["val/loss"]
    assert after["val/rewards/accuracies"] >= 0.8  # positive vs negative reviews: easy

    module.policy.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert loaded.config.num_labels == 1
    batch = next(iter(datamodule.val_dataloader()))
    with torch.no_grad():
        torch.testing.assert_close(
            sequence_rewards(loaded, batch["input_ids"], batch["attention_mask"]),
            module(batch),
        )


def test_experiment_composes_without_loss_or_reference(tokenizer):
    cfg = compose(["experiment=reward_model"])
    assert cfg.get("loss") is None and cfg.get("reference") is None
    module = instantiate(
        cfg.stage.module,
        policy=make_tiny_model(len(tokenizer)),
        optimizer=instantiate(cfg.optim.optimizer),
    )
    assert isinstance(module, RewardModelModule)
    with pytest.raises(ValueError, match="engine=padded"):  # the head reads padded rows
        RewardModelModule(make_tiny_model(len(tokenizer)), optimizer=None, engine=PackedEngine())
