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


# -- the equivalence table of dpo_lightning.losses, row by row ----------------------------------
TRL_116_BRANCHES = [
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
]


def _trl_116_branch(name: str, loss) -> torch.Tensor:
    """TRL 1.16 ``DPOTrainer._compute_loss`` branch ``name`` on this file's batch, with the
    settings of ``loss`` as TRL 1.16 reads them (``beta``, ``label_smoothing``, ``discopop_tau``)."""
    beta, eps = loss.beta, getattr(loss, "label_smoothing", 0.0)
    z = beta * (A - B)
    lc, lr = t(LC), t(LR)

    def smoothed(d):
        return -F.logsigmoid(beta * d) * (1 - eps) - F.logsigmoid(-beta * d) * eps

    branches = {
        "sigmoid": lambda: -F.logsigmoid(z),
        "hinge": lambda: torch.relu(1 - z),
        "ipo": lambda: (A / lc - B / lr - 1 / (2 * beta)) ** 2,
        "exo_pair": lambda: (
            torch.sigmoid(z) * (F.logsigmoid(z) - torch.log1p(torch.tensor(-eps)))
            + torch.sigmoid(-z) * (F.logsigmoid(-z) - torch.log(torch.tensor(eps)))
        ),
        "nca_pair": lambda: (
            -F.logsigmoid(beta * A) - 0.5 * F.logsigmoid(-beta * A) - 0.5 * F.logsigmoid(-beta * B)
        ),
        "robust": lambda: (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps),
        "bco_pair": trl_116_bco_pair,
        "sppo_hard": lambda: (A - 0.5 / beta) ** 2 + (B + 0.5 / beta) ** 2,
        "aot": lambda: smoothed(torch.sort(t(PC) - t(PR)).values - torch.sort(t(RC) - t(RR)).values),
        "aot_unpaired": lambda: smoothed(torch.sort(A).values - torch.sort(B).values),
        "apo_zero": lambda: 1 - torch.sigmoid(beta * A) + torch.sigmoid(beta * B),
        "apo_down": lambda: torch.sigmoid(beta * A) + 1 - torch.sigmoid(z),
        "discopop": lambda: (
            -F.logsigmoid(z) * (1 - torch.sigmoid(z / loss.tau)) + torch.exp(-z) * torch.sigmoid(z / loss.tau)
        ),
        "sigmoid_norm": lambda: -F.logsigmoid(beta * (A / lc - B / lr)),
    }
    return branches[name]()


def _table_rows() -> list[tuple[str, str]]:
    """(config name, "TRL 1.16 equivalent" text) of the table in the losses package docstring."""
    lines = L.__doc__.splitlines()
    rules = [i for i, line in enumerate(lines) if line.startswith("=" * 18)]
    column = lines[rules[0]].index("=", 47 - 1)  # the third column's start
    return [(line.split()[0], line[column:].strip()) for line in lines[rules[1] + 1 : rules[2]]]


def test_the_table_claims_only_what_trl_116_computes():
    """Where the table names a TRL 1.16 loss type (first word), the loss as it trains (training
    mode, after one batch) equals that branch; ``[a, b], loss_weights [1, α]`` is a list of loss
    types whose weighted means add up. Other entries ("none ...", trainers) claim no DPOTrainer
    branch."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from tests.test_losses import CONF

    checked = []
    for name, claim in _table_rows():
        if not (CONF / f"{name}.yaml").exists():  # a wrapper row, "(weighting=wpo)"
            continue
        if " + " in claim.split("(")[0]:  # "<branch> + <TRL option>": compared with TRL 1.16's own
            continue  # code in test_losses_variants.py (f_dpo, ld_dpo)
        loss = instantiate(OmegaConf.load(CONF / f"{name}.yaml")).train()
        first = claim.split()[0]
        if claim.startswith("[sigmoid, sft]"):
            assert "loss_weights [1, α]" in claim
            trl = -F.logsigmoid(loss.beta * (A - B)).mean() + loss.alpha * trl_116_sft()
            torch.testing.assert_close(call(loss)[0].mean(), trl)
        elif first == "sft":
            torch.testing.assert_close(call(loss)[0].mean(), t(trl_116_sft()))
        elif first in TRL_116_BRANCHES:
            torch.testing.assert_close(call(loss)[0], _trl_116_branch(first, loss), msg=f"{name}: {claim}")
        else:
            continue
        checked.append(name)
    assert len(checked) >= 15, checked  # every DPOTrainer-branch row was compared
