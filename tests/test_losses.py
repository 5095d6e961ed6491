"""Every preference loss against hand-worked numbers and a scalar re-statement of TRL's formula.

Three pairs, summed log-probs (πc, πr, rc, rr) and lengths (|yw|, |yl|):

    pair 0: πc=-5  πr=-7  rc=-6   rr=-6.5  |yw|=5 |yl|=7  ->  a=πc-rc=1.0,  b=πr-rr=-0.5, Δ=a-b=1.5
    pair 1: πc=-8  πr=-6  rc=-7   rr=-6.5  |yw|=4 |yl|=3  ->  a=-1.0,       b=0.5,        Δ=-1.5
    pair 2: πc=-3  πr=-4  rc=-3.5 rr=-3    |yw|=2 |yl|=2  ->  a=0.5,        b=-1.0,       Δ=1.5
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from dpo_lightning import losses as L

CONF = Path(__file__).resolve().parents[1] / "conf" / "loss"
PC = [-5.0, -8.0, -3.0]
PR = [-7.0, -6.0, -4.0]
RC = [-6.0, -7.0, -3.5]
RR = [-6.5, -6.5, -3.0]
LC = [5.0, 4.0, 2.0]
LR = [7.0, 3.0, 2.0]


def t(xs):
    return torch.tensor(xs, dtype=torch.float64)


def call(loss, pc=PC, pr=PR, rc=RC, rr=RR, lc=LC, lr=LR):
    return loss(t(pc), t(pr), t(rc), t(rr), chosen_lengths=t(lc), rejected_lengths=t(lr))


def logsig(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x):
    return 1 / (1 + math.exp(-x))


# ---- hand-worked values -------------------------------------------------------------------------


def test_dpo_hand_worked():
    # β=0.1, Δ=1.5: -log σ(0.15) = log(1 + e^-0.15) = log(1.860708) = 0.620957
    #            Δ=-1.5: log(1 + e^0.15) = log(2.161834) = 0.770957
    losses, rc, rr = call(L.DPOLoss(beta=0.1))
    torch.testing.assert_close(losses, t([0.620957, 0.770957, 0.620957]), atol=1e-6, rtol=0)
    torch.testing.assert_close(rc, t([0.1, -0.1, 0.05]))  # β a
    torch.testing.assert_close(rr, t([-0.05, 0.05, -0.1]))  # β b


def test_dpo_zero_margin_is_log2():
    losses, _, _ = call(L.DPOLoss(beta=0.5), pc=RC, pr=RR)
    torch.testing.assert_close(losses, torch.full((3,), math.log(2), dtype=torch.float64))


def test_hinge_and_sppo_hand_worked():
    # hinge β=1: max(0, 1 - Δ) = [0, 2.5, 0]
    torch.testing.assert_close(call(L.HingeLoss(beta=1.0))[0], t([0.0, 2.5, 0.0]))
    # sppo_hard β=0.5, 1/(2β)=1: (a-1)² + (b+1)²: pair0 0+0.25, pair1 4+2.25, pair2 0.25+0
    torch.testing.assert_close(call(L.SPPOHardLoss(beta=0.5))[0], t([0.25, 6.25, 0.25]))


def test_ipo_hand_worked():
    # β=0.5 -> target 1/(2β) = 1. Δ̄ = a/|yw| - b/|yl|:
    # pair0 1/5 + 0.5/7 = 0.271429 -> (0.271429-1)² = 0.530816
    # pair1 -1/4 - 0.5/3 = -0.416667 -> 2.006944 ; pair2 0.25 + 0.5 = 0.75 -> 0.0625
    losses, _, _ = call(L.IPOLoss(beta=0.5))
    torch.testing.assert_close(losses, t([0.530816, 2.006944, 0.0625]), atol=1e-6, rtol=0)


def test_apo_zero_hand_worked():
    # β=1, a=0, b=0 -> (1 - σ(0)) + σ(0) = 1 for every pair
    torch.testing.assert_close(
        call(L.APOZeroLoss(beta=1.0), pc=RC, pr=RR)[0], torch.ones(3, dtype=torch.float64)
    )


def test_sft_is_token_mean_nll_of_chosen():
    # -Σπc / Σ|yw| = 16 / 11 averaged over pairs; per pair -πc / mean|yw| = πc / (11/3)
    losses, _, _ = call(L.SFTLoss())
    assert losses.mean().item() == pytest.approx(16 / 11)
    torch.testing.assert_close(losses, t([5 * 3 / 11, 8 * 3 / 11, 3 * 3 / 11]))


def test_simpo_hand_worked():
    # β=2, γ=0.5: per-token c = [-1, -2, -1.5], r = [-1, -2, -2]; z = β(c-r) - γ = [-0.5, -0.5, 0.5]
    losses, rc, _ = call(L.SimPOLoss(beta=2.0, gamma=0.5))
    torch.testing.assert_close(losses, t([-logsig(-0.5), -logsig(-0.5), -logsig(0.5)]))
    torch.testing.assert_close(rc, t([-2.0, -4.0, -3.0]))


# ---- TRL parity: each formula re-stated on scalars --------------------------------------------


def trl_dpo_family(name, p, beta, eps=0.0, tau=0.05, alpha=1.0, running=None):
    """TRL 1.16's ``DPOTrainer._compute_loss`` branch ``name`` for one pair (plain floats).

    Two are not TRL 1.16 branches: ``cdpo`` is older TRL's ``sigmoid`` with label smoothing
    (TRL 1.16's ``sigmoid`` ignores it), ``rpo`` is TRL 1.16's ``loss_type=["sigmoid", "sft"]``
    with ``loss_weights=[1, α]`` (``nll``: its ``sft`` branch, the batch's token-mean NLL).
    """
    pc, pr, rc, rr, lc, lr = p
    a, b = pc - rc, pr - rr
    logits = (pc - pr) - (rc - rr)
    z = beta * logits
    nll = running  # reused slot: the batch-level NLL for rpo
    return {
        "cdpo": lambda: -logsig(z) * (1 - eps) - logsig(-z) * eps,
        "robust": lambda: (-logsig(z) * (1 - eps) + logsig(-z) * eps) / (1 - 2 * eps),
        "exo_pair": lambda: sig(z) * (logsig(z) - math.log(1 - eps)) + sig(-z) * (logsig(-z) - math.log(eps)),
        "hinge": lambda: max(0.0, 1 - z),
        "ipo": lambda: (a / lc - b / lr - 1 / (2 * beta)) ** 2,
        "nca_pair": lambda: -logsig(beta * a) - 0.5 * logsig(-beta * a) - 0.5 * logsig(-beta * b),
        "sppo_hard": lambda: (a - 0.5 / beta) ** 2 + (b + 0.5 / beta) ** 2,
        "apo_zero": lambda: 1 - sig(beta * a) + sig(beta * b),
        "apo_down": lambda: sig(beta * a) + 1 - sig(beta * (a - b)),
        "discopop": lambda: -logsig(z) * (1 - sig(z / tau)) + math.exp(-z) * sig(z / tau),
        "sigmoid_norm": lambda: -logsig(beta * (a / lc - b / lr)),
        "rpo": lambda: -logsig(z) + alpha * nll,
    }[name]()


PAIRS = list(zip(PC, PR, RC, RR, LC, LR, strict=True))
TOKEN_NLL = -sum(PC) / sum(LC)  # TRL 1.16's sft branch: cross-entropy averaged over chosen tokens

CASES = [
    ("cdpo", L.ConservativeDPOLoss(beta=0.3, label_smoothing=0.2), dict(beta=0.3, eps=0.2)),
    ("robust", L.RobustDPOLoss(beta=0.3, label_smoothing=0.2), dict(beta=0.3, eps=0.2)),
    ("exo_pair", L.ExoPairLoss(beta=0.3, label_smoothing=0.01), dict(beta=0.3, eps=0.01)),
    ("hinge", L.HingeLoss(beta=0.3), dict(beta=0.3)),
    ("ipo", L.IPOLoss(beta=0.3), dict(beta=0.3)),
    ("nca_pair", L.NCAPairLoss(beta=0.3), dict(beta=0.3)),
    ("sppo_hard", L.SPPOHardLoss(beta=0.3), dict(beta=0.3)),
    ("apo_zero", L.APOZeroLoss(beta=0.3), dict(beta=0.3)),
    ("apo_down", L.APODownLoss(beta=0.3), dict(beta=0.3)),
    ("discopop", L.DiscoPOPLoss(beta=0.3, tau=0.5), dict(beta=0.3, tau=0.5)),
    ("sigmoid_norm", L.SigmoidNormLoss(beta=0.3), dict(beta=0.3)),
    ("rpo", L.RPOLoss(beta=0.3, alpha=0.7), dict(beta=0.3, alpha=0.7, running=TOKEN_NLL)),
]


@pytest.mark.parametrize(("name", "loss", "kw"), CASES, ids=[c[0] for c in CASES])
def test_matches_trl_formula(name, loss, kw):
    losses, chosen_r, rejected_r = call(loss)
    expected = [trl_dpo_family(name, p, **kw) for p in PAIRS]
    # rpo: the NLL enters per pair as -πc/mean|yw|; TRL adds the batch NLL to the mean loss
    if name == "rpo":
        torch.testing.assert_close(losses.mean(), t(expected).mean())
    else:
        torch.testing.assert_close(losses, t(expected))
    beta = kw["beta"]
    torch.testing.assert_close(chosen_r, t([beta * (pc - rc) for pc, _, rc, *_ in PAIRS]))
    torch.testing.assert_close(rejected_r, t([beta * (pr - rr) for _, pr, _, rr, *_ in PAIRS]))


def test_aot_sorts_margins_across_the_batch():
    beta, eps = 0.3, 0.1
    pol = sorted(pc - pr for pc, pr, *_ in PAIRS)  # [2, -2, 1] -> [-2, 1, 2]
    ref = sorted(rc - rr for _, _, rc, rr, *_ in PAIRS)
    want = [
        -logsig(beta * (p - r)) * (1 - eps) - logsig(-beta * (p - r)) * eps
        for p, r in zip(pol, ref, strict=True)
    ]
    torch.testing.assert_close(call(L.AOTLoss(beta, eps))[0], t(want))
    a = sorted(pc - rc for pc, _, rc, *_ in PAIRS)
    b = sorted(pr - rr for _, pr, _, rr, *_ in PAIRS)
    want = [
        -logsig(beta * (x - y)) * (1 - eps) - logsig(-beta * (x - y)) * eps for x, y in zip(a, b, strict=True)
    ]
    torch.testing.assert_close(call(L.AOTUnpairedLoss(beta, eps))[0], t(want))


def test_bco_pair_uses_running_mean_of_batch_rewards():
    beta = 0.3
    loss = L.BCOPairLoss(beta=beta).train()
    rewards = [beta * (pc - rc) for pc, _, rc, *_ in PAIRS] + [beta * (pr - rr) for _, pr, _, rr, *_ in PAIRS]
    first_mean = sum(rewards) / 6
    want = [
        -logsig(beta * (pc - rc) - first_mean) - logsig(-(beta * (pr - rr) - first_mean))
        for pc, pr, rc, rr, *_ in PAIRS
    ]
    torch.testing.assert_close(call(loss)[0], t(want))
    # second batch with zero log-ratios: mean reward 0, δ = (first_mean + 0) / 2
    call(loss, pc=RC, pr=RR)
    assert loss.running_mean.item() == pytest.approx(first_mean / 2)
    loss.eval()  # evaluation does not move δ
    call(loss)
    assert loss.running_mean.item() == pytest.approx(first_mean / 2)


def test_orpo_matches_trl_formula():
    beta = 0.2
    losses, chosen_r, _ = call(L.ORPOLoss(beta=beta))
    want = []
    for pc, pr, _, _, lc, lr in PAIRS:
        c, r = pc / lc, pr / lr
        log_odds = (c - r) - (math.log1p(-math.exp(c)) - math.log1p(-math.exp(r)))
        want.append(-beta * logsig(log_odds))
    # TRL: loss = policy_nll_loss (token mean over the batch) - mean(β log σ(log_odds))
    assert losses.mean().item() == pytest.approx(TOKEN_NLL + sum(want) / 3)
    torch.testing.assert_close(chosen_r, t([beta * pc / lc for pc, *_, lc, _ in PAIRS]))


def test_gradients_flow_to_policy_only():
    pc, pr = t(PC).requires_grad_(), t(PR).requires_grad_()
    rc, rr = t(RC).requires_grad_(), t(RR).requires_grad_()
    losses, chosen_r, _ = L.DPOLoss(0.1)(pc, pr, rc, rr)
    losses.sum().backward()
    assert pc.grad is not None and not chosen_r.requires_grad
    # σ(-βΔ)·β on chosen: pair 0 -> 0.1 σ(-0.15)
    assert pc.grad[0].item() == pytest.approx(-0.1 * sig(-0.15))


def test_mix_is_weighted_sum_and_reference_free_only_if_all_are():
    dpo, sft = L.DPOLoss(0.1), L.SFTLoss()
    mix = L.MixLoss([{"loss": dpo, "weight": 1.0}, {"loss": sft, "weight": 0.5}])
    assert not mix.is_reference_free
    assert L.MixLoss([{"loss": sft, "weight": 1.0}]).is_reference_free
    losses, chosen_r, _ = call(mix)
    torch.testing.assert_close(losses, call(dpo)[0] + 0.5 * call(sft)[0])
    torch.testing.assert_close(chosen_r, call(dpo)[1])
    with pytest.raises(ValueError, match=r"components\[0\]"):
        L.MixLoss([{"loss": "dpo", "weight": 1.0}])


def test_reference_based_loss_without_reference_fails_clearly():
    with pytest.raises(ValueError, match="needs reference log-probs"):
        L.IPOLoss()(t(PC), t(PR), None, None, chosen_lengths=t(LC), rejected_lengths=t(LR))
    with pytest.raises(ValueError, match="chosen_lengths"):
        L.IPOLoss()(t(PC), t(PR), t(RC), t(RR))


# What the stage passes a loss that names optional inputs (extra_inputs), for the three pairs.
EXTRA = {
    "shared_logps": {
        "policy_chosen_shared_logps": t([-4.0, -6.0, -3.0]),
        "policy_rejected_shared_logps": t([-5.0, -6.0, -4.0]),
        "reference_chosen_shared_logps": t([-5.0, -5.0, -3.5]),
        "reference_rejected_shared_logps": t([-5.5, -6.5, -3.0]),
    },
    "log_sum_sq_probs": {
        "chosen_log_sum_sq_probs": t([-3.0, -2.0, -1.0]),
        "rejected_log_sum_sq_probs": t([-4.0] * 3),
    },
}


@pytest.mark.parametrize("path", sorted(CONF.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_yaml_instantiates_a_loss_with_a_docstring(path):
    loss = instantiate(OmegaConf.load(path))
    assert isinstance(loss, L.PreferenceLoss | L.UnpairedLoss)
    doc = type(loss).__doc__
    assert re.search(r"``L(_i)? = ", doc), "docstring gives the equation"
    assert "http" in doc or "TRL" in doc, "docstring cites the paper or the TRL loss it matches"
    if loss.unpaired:  # three labelled rows (and their mismatched rows)
        labels = torch.tensor([True, False, True])
        losses, rewards, _ = loss(t(PC), t(RC), labels, policy_kl_logps=t(PR), reference_kl_logps=t(RR))
        assert losses.shape == rewards.shape == (3,) and torch.isfinite(losses).all()
        return
    kwargs = {k: v for name in loss.extra_inputs for k, v in EXTRA[name].items()}
    losses, chosen_r, rejected_r = loss(
        t(PC), t(PR), t(RC), t(RR), chosen_lengths=t(LC), rejected_lengths=t(LR), **kwargs
    )
    assert losses.shape == chosen_r.shape == rejected_r.shape == (3,)
    assert torch.isfinite(losses).all()
