"""DPO loss and Bradley–Terry loss against hand-worked values and a direct computation."""

import math

import torch
from torch.testing import assert_close

from dpo_lightning.losses import DPOLoss, dpo_loss, reward_model_loss


def _nlogsig(x: float) -> float:
    return math.log1p(math.exp(-x))  # -log σ(x)


def test_dpo_loss_hand_worked():
    # Two completions: policy favours yw by 2 nats more than the reference does.
    pi = torch.tensor([-10.0, -14.0])  # log πθ(yw), log πθ(yl)
    ref = torch.tensor([-11.0, -13.0])  # log πref(yw), log πref(yl)
    losses, rewards = dpo_loss(pi, ref, torch.tensor([0]), torch.tensor([1]), beta=0.5)
    # β[(−10+11) − (−14+13)] = 0.5 * (1 + 1) = 1.0 ; −log σ(1) = log(1 + e^−1) = 0.3132617
    assert_close(losses, torch.tensor([0.31326169]), atol=1e-6, rtol=0)
    # rewards β(π − ref) = 0.5 * [1, −1]
    assert_close(rewards, torch.tensor([0.5, -0.5]))


def test_dpo_loss_zero_margin_is_log2():
    x = torch.randn(4)
    losses, rewards = dpo_loss(x, x, torch.tensor([0, 2]), torch.tensor([1, 3]), beta=0.1)
    assert_close(losses, torch.full((2,), math.log(2.0)))
    assert torch.all(rewards == 0)


def test_k3_all_pairs_against_direct_computation():
    # One prompt, K=3 completions ranked 0 > 1 > 2: three pairs, each completion forwarded once.
    pi = torch.tensor([-5.0, -7.5, -6.0], requires_grad=True)
    ref = torch.tensor([-6.0, -7.0, -6.5])
    yw, yl = torch.tensor([0, 0, 1]), torch.tensor([1, 2, 2])
    beta = 0.2
    losses, rewards = dpo_loss(pi, ref, yw, yl, beta)
    expected = []
    for w, lose in zip(yw.tolist(), yl.tolist(), strict=True):
        margin = beta * ((pi[w].item() - ref[w].item()) - (pi[lose].item() - ref[lose].item()))
        expected.append(_nlogsig(margin))
    assert losses.shape == (3,)
    assert_close(losses, torch.tensor(expected), atol=1e-6, rtol=0)
    assert_close(rewards, beta * (pi.detach() - ref))
    assert not rewards.requires_grad
    # Gradient flows to the policy log-probs only through the pairs each completion is in.
    losses.sum().backward()
    assert pi.grad is not None and torch.all(pi.grad != 0)


def test_dpo_loss_class_matches_index_api():
    torch.manual_seed(0)
    pc, pr, rc, rr = (torch.randn(5) for _ in range(4))
    losses, cr, rej = DPOLoss(beta=0.3)(pc, pr, rc, rr)
    ref_losses, rewards = dpo_loss(
        torch.cat([pc, pr]), torch.cat([rc, rr]), torch.arange(5), torch.arange(5, 10), 0.3
    )
    assert_close(losses, ref_losses)
    assert_close(cr, rewards[:5])
    assert_close(rej, rewards[5:])


def test_reward_model_loss_hand_worked():
    r = torch.tensor([2.0, 0.0, -1.0])
    losses = reward_model_loss(r, torch.tensor([0, 2]), torch.tensor([1, 0]))
    # −log σ(2) and −log σ(−3)
    assert_close(losses, torch.tensor([_nlogsig(2.0), _nlogsig(-3.0)]), atol=1e-6, rtol=0)
