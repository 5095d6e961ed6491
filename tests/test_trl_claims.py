"""The loss docstrings' statements about TRL 1.16, each against TRL 1.16's formula re-stated here
from ``trl/trainer/dpo_trainer.py`` (``DPOTrainer._compute_loss``, ``trl==1.16.0``).

Where TRL 1.16 differs from a loss here, the test shows the difference, so a docstring claiming
equality would be caught.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dpo_lightning import losses as L
from dpo_lightning.run.errors import UserError
from tests.test_losses import LC, LR, PC, PR, RC, RR, call, t

BETA = 0.3
A = t(PC) - t(RC)  # chosen log-ratios
B = t(PR) - t(RR)  # rejected log-ratios


def trl_116_sigmoid(label_smoothing: float = 0.0):
    """TRL 1.16 ``sigmoid``: ``-logsigmoid(β Δ)``; ``label_smoothing`` is not read."""
    return -F.logsigmoid(BETA * (A - B))


def trl_116_bco_pair():
    """TRL 1.16 ``bco_pair``: ``-logsigmoid(β a) - logsigmoid(-β b)``, no shift."""
    return -F.logsigmoid(BETA * A) - F.logsigmoid(-BETA * B)


def trl_116_sft():
    """TRL 1.16 ``sft``: ``-chosen_per_token_logps[chosen_mask].mean()``, one batch value."""
    return -sum(PC) / sum(LC)


def test_bco_pair_equals_trl_116_only_before_the_shift_moves():
    loss = L.BCOPairLoss(beta=BETA)
    torch.testing.assert_close(call(loss.eval())[0], trl_116_bco_pair())  # δ = 0
    shifted = call(loss.train())[0]  # δ = the batch's mean reward (the paper's shift)
    assert loss.running_mean.item() != 0
    assert not torch.allclose(shifted, trl_116_bco_pair())


def test_rpo_equals_trl_116_sigmoid_plus_weighted_sft():
    alpha = 0.7
    rpo = call(L.RPOLoss(beta=BETA, alpha=alpha))[0]
    # loss_type=["sigmoid", "sft"], loss_weights=[1, α]: Σ_k w_k · mean(loss_k)
    trl = trl_116_sigmoid().mean() + alpha * trl_116_sft()
    torch.testing.assert_close(rpo.mean(), trl)
    # ... and the same as this package's own list form (loss=mix).
    mix = L.MixLoss([{"loss": L.DPOLoss(BETA), "weight": 1.0}, {"loss": L.SFTLoss(), "weight": alpha}])
    torch.testing.assert_close(call(mix)[0], rpo)


def test_cdpo_has_no_trl_116_equivalent():
    eps = 0.2
    cdpo = call(L.ConservativeDPOLoss(beta=BETA, label_smoothing=eps))[0]
    assert not torch.allclose(cdpo, trl_116_sigmoid(label_smoothing=eps))  # TRL ignores ε there
    robust = call(L.RobustDPOLoss(beta=BETA, label_smoothing=eps))[0]
    assert not torch.allclose(cdpo, robust)  # nor is it TRL's robust
    torch.testing.assert_close(
        call(L.ConservativeDPOLoss(beta=BETA, label_smoothing=0.0))[0], trl_116_sigmoid()
    )


@pytest.mark.parametrize("eps", [0.0, 1.0])
def test_exo_refuses_epsilon_outside_open_unit_interval(eps):
    # TRL 1.16 raises for ε = 0 as well ("Label smoothing must be greater than 0.0 ...").
    with pytest.raises((ValueError, UserError), match=r"\(0, 1\)"):
        L.ExoPairLoss(beta=BETA, label_smoothing=eps)


def test_simpo_equals_trl_116_cpo_simpo_without_nll():
    gamma, eps = 0.5, 0.1
    # trl.experimental.cpo: logits = Δ̄ - γ/β; -(1-ε) logsigmoid(β logits) - ε logsigmoid(-β logits)
    logits = t(PC) / t(LC) - t(PR) / t(LR) - gamma / BETA
    trl = -F.logsigmoid(BETA * logits) * (1 - eps) - F.logsigmoid(-BETA * logits) * eps
    torch.testing.assert_close(call(L.SimPOLoss(beta=BETA, gamma=gamma, label_smoothing=eps))[0], trl)
