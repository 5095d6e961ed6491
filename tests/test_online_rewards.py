"""Online rewards behind one interface: callables on texts, reward-model folders, pairwise judges."""

from __future__ import annotations

import pytest
import torch

from dpo_lightning.data.collate import PreferenceCollator
from dpo_lightning.data.tokenize import Limits, tokenize_text_batch
from dpo_lightning.online.pairing import AllPairs
from dpo_lightning.online.rewards import RoundRobinReward, SequenceClassifierReward, TextReward
from dpo_lightning.sentiment.rewards import VaderReward
from dpo_lightning.stages.reward_model import reward_model_from_causal_lm, sequence_rewards
from tests.conftest import make_tiny_model
from tests.online_fakes import LengthJudge, length_score

PROMPTS = ["Review of Iron Valley:", "My thoughts on Open Water:"]
COMPLETIONS = [[" I loved it.", " Awful.", " It was fine and long"], [" Dull.", " Superb!", " Meh"]]


def test_text_reward_scores_prompt_plus_completion_in_one_call():
    calls = []

    def fn(texts):
        calls.append(list(texts))
        return length_score(texts)

    scores = TextReward(fn).score(PROMPTS, COMPLETIONS)
    assert len(calls) == 1 and calls[0][1] == "Review of Iron Valley: Awful."  # one batched call
    lengths = [[float(len(p + c)) for c in cs] for p, cs in zip(PROMPTS, COMPLETIONS, strict=True)]
    torch.testing.assert_close(scores, torch.tensor(lengths))
    assert TextReward(fn).calls(2, 3) == 6


def test_vader_through_the_text_reward_is_the_offline_reward():
    vader = VaderReward()
    online = TextReward(vader).score(PROMPTS, COMPLETIONS)
    offline = vader([p + c for p, cs in zip(PROMPTS, COMPLETIONS, strict=True) for c in cs]).view(2, 3)
    torch.testing.assert_close(online, offline)
    assert TextReward(vader).name == "VADER compound"


def test_a_broken_reward_fails_in_one_line():
    with pytest.raises(ValueError, match="returned 5 scores for 2 prompts × 3 completions"):
        TextReward(lambda texts: torch.zeros(5)).score(PROMPTS, COMPLETIONS)
    with pytest.raises(ValueError, match="returned 1 non-finite score"):
        TextReward(lambda texts: torch.tensor([0.0] * 5 + [float("nan")])).score(PROMPTS, COMPLETIONS)


@pytest.fixture
def reward_model_dir(tokenizer, tmp_path):
    """What ``stage=reward_model`` exports: a num_labels=1 classifier (pad = EOS) + tokenizer."""
    model = reward_model_from_causal_lm(make_tiny_model(len(tokenizer), seed=3))
    assert model.config.pad_token_id == model.config.eos_token_id
    model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    return tmp_path / "rm"


def test_reward_model_scores_rows_as_the_reward_model_stage_trained_on_them(tokenizer, reward_model_dir):
    reward = SequenceClassifierReward(str(reward_model_dir), batch_size=4)
    scores = reward.score(PROMPTS, COMPLETIONS)
    # The reward-model stage's own path: data tokenisation + padded collation + its head readout.
    rows = tokenize_text_batch(
        {"prompt": PROMPTS, "completions": COMPLETIONS, "row_id": [0, 1], "pairs": [[], []]},
        tokenizer,
        Limits(max_length=1024),
    )
    examples = [
        {"prompt_ids": p, "completion_ids": c, "pairs": []}
        for p, c in zip(rows["prompt_ids"], rows["completion_ids"], strict=True)
    ]
    batch = PreferenceCollator(tokenizer.pad_token_id)(examples)
    with torch.no_grad():
        expected = sequence_rewards(reward.model, batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(scores, expected.view(2, 3))
    # HF's own forward reads the last token that is not pad (= EOS here): one before the EOS.
    with torch.no_grad():
        hf = reward.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    assert not torch.allclose(hf, expected)


def test_reward_model_label_is_checked(reward_model_dir):
    with pytest.raises(ValueError, match=r"online\.reward\.label='POSITIVE' is not a label"):
        SequenceClassifierReward(str(reward_model_dir), label="POSITIVE")


def test_round_robin_judge_orders_like_its_scores():
    judge = LengthJudge()
    reward = RoundRobinReward(judge)
    wins = reward.score(PROMPTS, COMPLETIONS)
    assert judge.calls == 1  # every comparison of the batch in one call
    assert reward.calls(2, 3) == 2 * 3  # K(K-1)/2 = 3 comparisons per prompt
    assert wins.sum(dim=1).tolist() == [3.0, 3.0]  # each comparison hands out one win
    lengths = TextReward(length_score).score(PROMPTS, COMPLETIONS)
    ids = torch.arange(6).view(2, 3)
    assert AllPairs()(wins, ids).per_prompt(2) == AllPairs()(lengths, ids).per_prompt(2)
    draws = RoundRobinReward(LengthJudge()).score(["p"], [["ab", "cd", "e"]])
    assert draws.tolist() == [[1.5, 1.5, 0.0]]  # equal lengths: half a win each
