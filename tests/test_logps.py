"""Summed completion log-probs against a naive per-sequence loop, with left and right padding."""

import pytest
import torch
from torch.testing import assert_close

from dpo_lightning.data.collate import PreferenceCollator
from dpo_lightning.engine.logps import concatenated_forward


def _examples():
    return [
        {
            "prompt_ids": [1, 10, 11, 12],
            "completion_ids": [[20, 21, 2], [30, 2]],
            "pairs": [[0, 1]],
            "row_id": 0,
        },
        {
            "prompt_ids": [1, 13],
            "completion_ids": [[22, 23, 24, 25, 2], [31, 32, 2]],
            "pairs": [[1, 0]],
            "row_id": 1,
        },
    ]


def _naive_logps(model, prompt, completion):
    """One unpadded sequence, log-softmax over the full vocabulary, summed over the completion."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    total = 0.0
    for t in range(len(prompt), len(prompt) + len(completion)):
        total += logp[t - 1, ids[0, t]].item()
    return total


@pytest.mark.parametrize("side", ["right", "left"])
def test_concatenated_forward_matches_naive_loop(tiny_model, side):
    tiny_model.eval()
    examples = _examples()
    batch = PreferenceCollator(pad_token_id=0, padding_side=side)(examples)
    with torch.no_grad():
        stats = concatenated_forward(tiny_model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    expected, lengths = [], []
    for ex in examples:
        for comp in ex["completion_ids"]:
            expected.append(_naive_logps(tiny_model, ex["prompt_ids"], comp))
            lengths.append(len(comp))
    assert_close(stats.logps, torch.tensor(expected), atol=1e-4, rtol=1e-5)
    assert stats.lengths.tolist() == lengths
    assert torch.isfinite(stats.mean_logits).all()


def test_left_and_right_padding_agree(tiny_model):
    tiny_model.eval()
    out = {}
    for side in ("left", "right"):
        b = PreferenceCollator(pad_token_id=0, padding_side=side)(_examples())
        with torch.no_grad():
            out[side] = concatenated_forward(tiny_model, b["input_ids"], b["attention_mask"], b["labels"])
    assert_close(out["left"].logps, out["right"].logps, atol=1e-4, rtol=1e-5)
    assert_close(out["left"].mean_logits, out["right"].mean_logits, atol=1e-4, rtol=1e-5)
