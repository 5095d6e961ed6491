"""Unpaired data: the {prompt, completion, label} formats, unpairing pairs, the mismatched rows of
every batch (padded and packed), label counts, and the one-line refusals when data and loss or
stage do not fit."""

from __future__ import annotations

import functools
import json

import pytest
import torch

from dpo_lightning.data.auto import AutoFormat, detect_one
from dpo_lightning.data.collate import PreferenceCollator
from dpo_lightning.data.datamodule import PreferenceDataModule
from dpo_lightning.data.formats import InvalidRow, StandardFormat
from dpo_lightning.data.ranked import RankedFormat
from dpo_lightning.data.report import InvalidDataError
from dpo_lightning.data.tokenize import Limits
from dpo_lightning.data.unpaired import (
    ConversationalUnpairedFormat,
    LabelledCollator,
    UnpairedFormat,
    mismatched_examples,
    unpair_example,
)
from dpo_lightning.engine import PackedEngine
from dpo_lightning.losses import DPOLoss, KTOLoss
from dpo_lightning.run.errors import UserError
from dpo_lightning.stages.sft import SFTModule, sft_rows
from dpo_lightning.stages.unpaired import check_data_matches_loss
from tests.conftest import make_tiny_model
from tests.test_data_module import FIXTURES

UNPAIRED, KTO_MIX, IMDB = (FIXTURES / f"{n}.jsonl" for n in ("unpaired", "kto_mix", "imdb"))


def test_formats_read_trl_unpaired_rows():
    row = {"prompt": "Review:", "completion": " Great.", "label": False}
    assert UnpairedFormat()(row) == {
        "prompt": "Review:",
        "completions": [" Great."],
        "pairs": [],
        "labels": [False],
    }
    chat = json.loads(KTO_MIX.read_text().splitlines()[1])
    out = ConversationalUnpairedFormat()(chat)
    assert out["prompt"][0]["role"] == "user" and out["completions"][0][0]["role"] == "assistant"
    assert out["labels"] == [chat["label"]]
    assert detect_one(row, {}) == "unpaired" and detect_one(chat, {}) == "unpaired_conversational"
    for bad, reason in [
        ({k: v for k, v in row.items() if k != "label"}, "missing_label"),
        ({**row, "label": None}, "null_label"),
        ({**row, "label": 1}, "wrong_type_label"),  # 0/1 and "true" are refused, not guessed
        ({**row, "label": "true"}, "wrong_type_label"),
        ({**row, "completion": " "}, "empty_completion"),
    ]:
        with pytest.raises(InvalidRow, match=reason):
            UnpairedFormat()(bad)
    with pytest.raises(InvalidRow, match="completion_not_assistant"):
        ConversationalUnpairedFormat()({**chat, "completion": [{"role": "user", "content": "hi"}]})


def test_unpair_turns_each_pair_into_two_labelled_completions():
    pair = StandardFormat()({"prompt": "p", "chosen": "good", "rejected": "bad"})
    assert unpair_example(pair) == {
        "prompt": "p",
        "completions": ["good", "bad"],
        "pairs": [],
        "labels": [True, False],
    }
    ranked = RankedFormat()({"prompt": "p", "completions": ["a", "b", "c"], "scores": [3, 2, 1]})
    out = unpair_example(ranked)  # 3 pairs: every completion once per pair it is in (as TRL)
    assert out["completions"] == ["a", "b", "a", "c", "b", "c"] and out["labels"] == [True, False] * 3
    assert unpair_example(out) == out  # already unpaired
    with pytest.raises(InvalidRow, match="no_pairs_to_unpair"):
        unpair_example({"prompt": "", "completions": ["text"], "pairs": []})


EXAMPLES = [
    {"prompt_ids": [1, 2], "completion_ids": [[3]], "pairs": [], "labels": [True], "row_id": 0},
    {"prompt_ids": [4], "completion_ids": [[5, 6], [7]], "pairs": [], "labels": [False, True], "row_id": 1},
]


def test_mismatched_rows_hand_worked_padded_and_packed():
    """Prompt i with example i − 1's completions, cyclically: [1, 2] + [5, 6], [1, 2] + [7], [4] + [3]."""
    padded = LabelledCollator(PreferenceCollator(0))(EXAMPLES)
    assert padded["completion_labels"].tolist() == [True, False, True]
    assert padded["pair_row_ids"].tolist() == [0, 1, 1] and padded["num_pairs"] == 0
    kl = padded["mismatched"]
    assert kl["input_ids"].tolist() == [[1, 2, 5, 6], [1, 2, 7, 0], [4, 3, 0, 0]]
    assert kl["labels"].tolist() == [[-100, -100, 5, 6], [-100, -100, 7, -100], [-100, 3, -100, -100]]
    packed = LabelledCollator(PackedEngine().collator(0))(EXAMPLES)
    assert packed["mismatched"]["input_ids"].tolist() == [[1, 2, 5, 6, 7, 4, 3]]  # prefix shared
    assert packed["mismatched"]["target_ids"].tolist() == [5, 6, 7, 3]
    assert LabelledCollator(PreferenceCollator(0))(EXAMPLES[:1])["mismatched"] is None  # nothing to mismatch
    pairs = [{"prompt_ids": [1], "completion_ids": [[2], [3]], "pairs": [[0, 1]], "row_id": 0}]
    assert "mismatched" not in LabelledCollator(PreferenceCollator(0))(pairs)  # pairs pass through


def test_mismatched_rows_keep_the_length_limits():
    long = [
        {"prompt_ids": [1] + [9] * 6, "completion_ids": [[3]], "pairs": [], "labels": [True]},
        {"prompt_ids": [1], "completion_ids": [[5] * 7], "pairs": [], "labels": [False]},
    ]
    out = mismatched_examples(long, Limits(max_length=8), bos_token_id=1)
    assert len(out[0]["prompt_ids"]) + len(out[0]["completion_ids"][0]) <= 8
    assert out[0]["prompt_ids"][0] == 1  # BOS kept by keep_end


def datamodule(tokenizer, path, **kw):
    kw = {"format": "auto", "batch_size": 4, "max_length": 96, **kw}
    dm = PreferenceDataModule(tokenizer, path=str(path), **kw)
    dm.setup("fit")
    return dm


def test_datamodule_unpaired_file_and_unpaired_pairs(tokenizer):
    dm = datamodule(tokenizer, UNPAIRED)
    assert dm.unpaired
    n_d, n_u = dm.label_counts()
    assert (n_d, n_u) != (0, 0) and n_d + n_u == len(dm.train_set)  # one completion per row
    batch = next(iter(dm.train_dataloader()))
    assert batch["completion_labels"].shape == (4,) and batch["mismatched"]["input_ids"].shape[0] == 4
    pairs = datamodule(tokenizer, IMDB, unpair=True)
    assert pairs.unpaired and pairs.label_counts() == (len(pairs.train_set), len(pairs.train_set))
    assert not datamodule(tokenizer, IMDB).unpaired and datamodule(tokenizer, IMDB).label_counts() is None
    chat = datamodule(tokenizer, KTO_MIX)
    assert chat.unpaired and isinstance(chat.format, ConversationalUnpairedFormat)


def test_bad_unpaired_rows_are_counted_with_their_lines(tokenizer, tmp_path):
    rows = [json.loads(x) for x in UNPAIRED.read_text().splitlines()]
    rows[3]["label"] = "yes"
    del rows[5]["label"]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(InvalidDataError, match=r"wrong_type_label \(lines 4\)") as err:
        datamodule(tokenizer, path, format="unpaired")
    assert "missing_label (lines 6)" in str(err.value)
    assert isinstance(AutoFormat().detect(rows[:3]), UnpairedFormat)


def test_loss_and_data_must_fit(tokenizer):
    paired, unpaired = datamodule(tokenizer, IMDB), datamodule(tokenizer, UNPAIRED)
    with pytest.raises(UserError, match=r"data\.unpair=true"):
        check_data_matches_loss(KTOLoss(), paired)
    with pytest.raises(UserError, match="loss=kto or loss=bco"):
        check_data_matches_loss(DPOLoss(), unpaired)
    check_data_matches_loss(KTOLoss(), unpaired)
    check_data_matches_loss(DPOLoss(), paired)
    one = PreferenceDataModule(tokenizer, path=str(UNPAIRED), format="auto", batch_size=1)
    one.setup("fit")
    with pytest.raises(UserError, match=r"data\.batch_size=1 needs to be at least 2"):
        check_data_matches_loss(KTOLoss(), one)


def test_sft_trains_on_the_desirable_rows_of_unpaired_batches():
    batch = LabelledCollator(PreferenceCollator(0))(EXAMPLES)
    assert sft_rows(batch).tolist() == [0, 2]
    none = {**batch, "completion_labels": torch.tensor([False] * 3)}
    assert sft_rows(none).numel() == 0
    # a batch with no desirable row: a zero loss, zero gradients, the step still runs
    module = SFTModule(make_tiny_model(97), optimizer=functools.partial(torch.optim.SGD, lr=0.1))
    module.log_dict = module.log = lambda *a, **k: None
    loss = module._shared_step(none, "train")
    loss.backward()
    assert loss.item() == 0 and all(p.grad is None or not p.grad.any() for p in module.policy.parameters())
