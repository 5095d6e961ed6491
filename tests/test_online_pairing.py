"""Online pairing: K=3 scored samples → the expected index pairs and losses, worked by hand."""

from __future__ import annotations

import random

import pytest
import torch

from dpo_lightning.data.collate import PreferenceCollator
from dpo_lightning.engine.packing import PackedCollator
from dpo_lightning.losses import DPOLoss, dpo_loss
from dpo_lightning.online.pairing import AllPairs, BestVsWorst, sequence_ids
from dpo_lightning.sentiment import label

#: Two prompts, K = 3 samples each.
SCORES = torch.tensor([[0.5, -0.2, 0.5], [1.0, 2.0, 3.0]])
DISTINCT = torch.tensor([[0, 1, 2], [3, 4, 5]])  # no sample repeated


def test_all_pairs_k3_by_hand():
    pairs = AllPairs()(SCORES, DISTINCT)
    # prompt 0: (0,1) 0.5 > -0.2 → [0, 1]; (0,2) 0.5 = 0.5 → tie; (1,2) -0.2 < 0.5 → [2, 1]
    # prompt 1: (0,1) 1 < 2 → [1, 0]; (0,2) → [2, 0]; (1,2) → [2, 1]
    assert pairs.per_prompt(2) == [[[0, 1], [2, 1]], [[1, 0], [2, 0], [2, 1]]]
    assert pairs.ties == 1
    assert pairs.prompt.tolist() == [0, 0, 1, 1, 1]


def test_best_vs_worst_k3_by_hand():
    pairs = BestVsWorst()(SCORES, DISTINCT)
    # prompt 0: best = first of the two 0.5 (index 0), worst = index 1; prompt 1: 2 vs 0
    assert pairs.per_prompt(2) == [[[0, 1]], [[2, 0]]]
    assert pairs.ties == 0
    flat = BestVsWorst()(torch.tensor([[0.3, 0.3, 0.3]]), torch.tensor([[0, 1, 2]]))
    assert flat.per_prompt(1) == [[]] and flat.ties == 1  # all equal: a tie, no pair


def test_the_same_sample_twice_never_pairs_even_when_scored_differently():
    # A noisy judge may score one completion twice with different values: no signal, a tie.
    same = sequence_ids([[[5, 6, 2], [5, 6, 2], [7, 2]]])
    assert same.tolist() == [[0, 0, 1]]
    pairs = AllPairs()(torch.tensor([[1.0, 2.0, 0.0]]), same)
    assert pairs.per_prompt(1) == [[[0, 2], [1, 2]]] and pairs.ties == 1
    assert BestVsWorst()(torch.tensor([[1.0, 2.0, 1.5]]), same).ties == 1  # best and worst are one sample


def test_online_pairing_equals_the_offline_labelling():
    """Same scores, same pairs, same order as the offline experiment's labelling."""
    rng = random.Random(0)
    scores = torch.tensor([[round(rng.uniform(-1, 1), 1) for _ in range(4)] for _ in range(50)])  # ties
    ids = torch.arange(200).view(50, 4)
    for online, offline in ((AllPairs(), label.AllPairs()), (BestVsWorst(), label.BestVsWorst())):
        got = online(scores, ids).per_prompt(50)
        assert got == [[list(p) for p in offline(row.tolist())] for row in scores]


@pytest.mark.parametrize("collator", [PreferenceCollator(0), PackedCollator(0)])
def test_pairs_through_the_collator_and_the_index_loss_by_hand(collator):
    """The K=3 pairs above, collated (each completion once) and fed to the index API.

    Flat completions 0..5 (prompt 0: 0-2, prompt 1: 3-5) → chosen [0, 2, 4, 5, 5], rejected
    [1, 1, 3, 3, 4]. With π = [-1, -2, -3, -4, -5, -6], π_ref = [-1.5, -1.5, -3, -4, -4, -4],
    the log-ratios are r = π − π_ref = [0.5, -0.5, 0, 0, -1, -2] and, at β = 0.5:

        (0,1): β(r0 − r1) =  0.5  → −log σ( 0.5)  = log(1 + e^−0.5)  = 0.474077
        (2,1): β(r2 − r1) =  0.25 → −log σ( 0.25) = log(1 + e^−0.25) = 0.575939
        (4,3): β(r4 − r3) = −0.5  → log(1 + e^0.5) = 0.974077
        (5,3): β(r5 − r3) = −1.0  → log(1 + e^1)   = 1.313262
        (5,4): β(r5 − r4) = −0.5  → 0.974077          mean 0.862286
    """
    pairs = AllPairs()(SCORES, DISTINCT).per_prompt(2)
    examples = [
        {"prompt_ids": [1, 9], "completion_ids": [[4, 2], [5, 2], [6, 2]], "pairs": pairs[0], "row_id": 7},
        {"prompt_ids": [1, 8], "completion_ids": [[4, 2], [5, 6, 2], [7, 2]], "pairs": pairs[1], "row_id": 3},
    ]
    batch = collator(examples)
    assert batch["num_completions"] == 6 and batch["num_pairs"] == 5
    assert batch["chosen_idx"].tolist() == [0, 2, 4, 5, 5]
    assert batch["rejected_idx"].tolist() == [1, 1, 3, 3, 4]
    assert batch["pair_row_ids"].tolist() == [7, 7, 3, 3, 3]
    pi = torch.tensor([-1.0, -2.0, -3.0, -4.0, -5.0, -6.0])
    ref = torch.tensor([-1.5, -1.5, -3.0, -4.0, -4.0, -4.0])
    expected = torch.tensor([0.474077, 0.575939, 0.974077, 1.313262, 0.974077])
    losses, rewards = dpo_loss(pi, ref, batch["chosen_idx"], batch["rejected_idx"], beta=0.5)
    torch.testing.assert_close(losses, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(rewards, 0.5 * (pi - ref))
    ci, ri = batch["chosen_idx"], batch["rejected_idx"]
    class_losses, _, _ = DPOLoss(0.5)(pi[ci], pi[ri], ref[ci], ref[ri])
    torch.testing.assert_close(class_losses, expected, atol=1e-6, rtol=0)
    assert class_losses.mean().item() == pytest.approx(0.862286, abs=1e-6)
