"""stage=sft: the SFT module's loss, row selection, plain-text mode, and the CLI stage."""

from __future__ import annotations

import json

import datasets
import pytest
import torch
import torch.nn.functional as F

from dpo_lightning.data.collate import PreferenceCollator
from dpo_lightning.data.formats import TextFormat
from dpo_lightning.sentiment.stages import compose_train_config
from dpo_lightning.stages.sft import SFTModule, sft_rows, token_nll
from dpo_lightning.train import train
from tests.conftest import compose, make_tiny_model


def test_token_nll_is_token_weighted():
    # Two completions: 3 tokens with summed logp -3, 1 token with logp -5: (3 + 5) / 4 = 2,
    # not the mean of per-sequence means (1 + 5) / 2 = 3.
    assert token_nll(torch.tensor([-3.0, -5.0]), torch.tensor([3.0, 1.0])).item() == pytest.approx(2.0)


def test_sft_rows_are_unique_winners_or_all_rows():
    batch = {"input_ids": torch.zeros(5, 3), "num_pairs": 3, "chosen_idx": torch.tensor([0, 0, 3])}
    assert sft_rows(batch).tolist() == [0, 3]
    batch = {"input_ids": torch.zeros(4, 3), "num_pairs": 0, "num_completions": 4}
    assert sft_rows(batch).tolist() == [0, 1, 2, 3]


def test_text_format_rows():
    fmt = TextFormat({"text": "body"})
    assert fmt({"body": "Nice film."}) == {"prompt": "", "completions": ["Nice film."], "pairs": []}
    with pytest.raises(ValueError, match="null_body"):
        fmt({"body": None})


def test_sft_loss_matches_cross_entropy_on_chosen_rows(tokenizer):
    """The module's loss equals HF-style cross-entropy over the chosen rows' completion tokens."""
    model = make_tiny_model(len(tokenizer))
    module = SFTModule(model, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    module.log_dict = lambda *a, **k: None
    examples = [
        {"prompt_ids": [1, 5, 6], "completion_ids": [[7, 8, 2], [9, 2]], "pairs": [[0, 1]]},
        {"prompt_ids": [1, 10], "completion_ids": [[11, 2], [12, 13, 14, 2]], "pairs": [[1, 0]]},
    ]
    batch = PreferenceCollator(tokenizer.pad_token_id)(examples)
    loss = module.training_step(batch, 0)
    # Naive recomputation: rows 0 and 3 (the chosen ones), loss over their completion tokens.
    rows = batch["input_ids"][[0, 3]]
    labels = batch["labels"][[0, 3]]
    mask = batch["attention_mask"][[0, 3]]
    logits = model(input_ids=rows, attention_mask=mask).logits
    expected = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)


def test_stage_group_selects_module():
    assert compose(["stage=sft"]).stage.module._target_ == "dpo_lightning.stages.sft.SFTModule"
    assert compose([]).stage.module._target_ == "dpo_lightning.stages.dpo.DPOModule"


def test_sft_stage_on_text_lowers_loss_and_exports(tmp_path):
    texts = ["The story was wonderful and moving. I loved it."] * 24 + ["The cast was dull. Avoid it."] * 24
    data = tmp_path / "text"
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(data))
    run = tmp_path / "run"
    train(
        compose_train_config(
            [
                "stage=sft",
                "data=text",
                f"data.path={data}",
                "trainer=cpu",
                "trainer.max_steps=12",
                "trainer.val_check_interval=6",
                "data.batch_size=8",
                "callbacks.progress_bar=null",
                "callbacks.checkpoint=null",
                "trainer.log_every_n_steps=1",
                f"paths.output_dir={run}",
                "paths.group=test",
            ]
        )
    )
    summary = json.loads((run / "summary.json").read_text())
    lines = (run / "csv" / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    col = header.index("train/loss")
    losses = [float(r.split(",")[col]) for r in lines[1:] if r.split(",")[col]]
    assert losses[-1] < losses[0] - 0.5  # a repeated text is learnt quickly
    assert summary["val"]["loss"] < losses[0]
    assert (run / "hf_model" / "config.json").exists()
