"""Collation: rows, masks, labels and pair indices."""

import torch

from dpo_lightning.data.collate import PreferenceCollator
from dpo_lightning.engine.logps import IGNORE_INDEX


def test_collate_masks_labels_and_pairs():
    examples = [
        {
            "prompt_ids": [1, 5],
            "completion_ids": [[7, 2], [8, 9, 2]],
            "pairs": [[0, 1]],
            "row_id": 3,
        },
        # K=3 ranked: 0 > 1 > 2 gives three pairs over three rows
        {
            "prompt_ids": [1],
            "completion_ids": [[4, 2], [6, 2], [3, 2]],
            "pairs": [[0, 1], [0, 2], [1, 2]],
            "row_id": 9,
        },
    ]
    b = PreferenceCollator(pad_token_id=0, padding_side="right")(examples)
    assert b["input_ids"].shape == (5, 5)
    assert b["input_ids"][1].tolist() == [1, 5, 8, 9, 2]
    assert b["input_ids"][0].tolist() == [1, 5, 7, 2, 0]
    assert b["attention_mask"][0].tolist() == [1, 1, 1, 1, 0]
    # prompt and padding are ignored in the labels; completion tokens kept as targets
    assert b["labels"][0].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 7, 2, IGNORE_INDEX]
    assert b["labels"][2].tolist() == [IGNORE_INDEX, 4, 2, IGNORE_INDEX, IGNORE_INDEX]
    assert b["chosen_idx"].tolist() == [0, 2, 2, 3]
    assert b["rejected_idx"].tolist() == [1, 3, 4, 4]
    assert b["pair_row_ids"].tolist() == [3, 9, 9, 9]
    assert b["num_pairs"] == 4
    assert b["num_tokens"] == 4 + 5 + 3 + 3 + 3


def test_left_padding_puts_tokens_at_the_end():
    b = PreferenceCollator(pad_token_id=0, padding_side="left")(
        [{"prompt_ids": [1], "completion_ids": [[4, 2], [6, 6, 6, 2]], "pairs": [[0, 1]]}]
    )
    assert b["input_ids"][0].tolist() == [0, 0, 1, 4, 2]
    assert b["attention_mask"][0].tolist() == [0, 0, 1, 1, 1]
    assert b["labels"][0].tolist()[-2:] == [4, 2]
    assert torch.all(b["labels"][0][:3] == IGNORE_INDEX)
