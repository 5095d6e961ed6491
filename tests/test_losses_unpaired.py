"""KTO and unpaired BCO: hand-worked numbers, the papers' formulas, TRL 1.16's own
``KTOTrainer._compute_loss`` on one batch, the loss-aversion check, and the batch statistics
(KTO's z_ref, BCO's δ) averaged over ranks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.multiprocessing as mp

from dpo_lightning import losses as L
from dpo_lightning.stages.unpaired import unpaired_metrics
from tests.trl_reference import trl_kto_loss


def t(xs):
    return torch.tensor(xs, dtype=torch.float64)


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


LABELS = torch.tensor([True, False])


def kto(loss, r, kl_diffs, labels=LABELS):
    """KTO on log-ratios r (reference log-probs 0) and mismatched-row log-ratios."""
    return loss(
        t(r),
        t([0.0] * len(r)),
        labels,
        policy_kl_logps=t(kl_diffs),
        reference_kl_logps=t([0.0] * len(kl_diffs)),
    )


def test_kto_hand_worked():
    """β = 1; r = [1, −1] (desirable, undesirable); mismatched log-ratios [0.5, 0.1] -> z_ref = 0.3.

    desirable:   λ_D (1 − σ(1 − 0.3)) = 1 − σ(0.7) = 1 − 0.668188 = 0.331812
    undesirable: λ_U (1 − σ(0.3 + 1)) = 2 (1 − σ(1.3)) = 2 (1 − 0.785835) = 0.428330  (λ_U = 2)
    """
    losses, rewards, metrics = kto(L.KTOLoss(beta=1.0, undesirable_weight=2.0), [1.0, -1.0], [0.5, 0.1])
    torch.testing.assert_close(losses, t([0.331812, 0.428330]), atol=1e-6, rtol=0)
    torch.testing.assert_close(rewards, t([1.0, -1.0]))
    torch.testing.assert_close(metrics["kl"], t(0.3))


def test_kto_reference_point_is_clamped_and_detached():
    # mismatched log-ratios average −0.3: z_ref = max(0, −0.3) = 0
    losses, _, metrics = kto(L.KTOLoss(beta=1.0), [1.0, -1.0], [-0.5, -0.1])
    assert metrics["kl"].item() == 0.0
    torch.testing.assert_close(losses, t([1 - sig(1.0), 1 - sig(1.0)]))
    kl_rows = t([0.5, 0.1]).requires_grad_()
    policy = t([1.0, -1.0]).requires_grad_()
    out, _, _ = L.KTOLoss()(
        policy, t([0.0, 0.0]), LABELS, policy_kl_logps=kl_rows, reference_kl_logps=t([0, 0])
    )
    out.sum().backward()
    assert kl_rows.grad is None and policy.grad is not None  # z_ref carries no gradient


def test_kto_matches_paper_formula_on_random_inputs():
    g = torch.Generator().manual_seed(0)
    pi, ref, pkl, rkl = (-5 * torch.rand(32, generator=g, dtype=torch.float64) for _ in range(4))
    labels = torch.rand(32, generator=g) > 0.3
    beta, lam_d, lam_u = 0.3, 1.2, 0.8
    losses, _, _ = L.KTOLoss(beta, lam_d, lam_u)(pi, ref, labels, policy_kl_logps=pkl, reference_kl_logps=rkl)
    z = max(0.0, (pkl - rkl).mean().item())  # Eq. 7's z_ref, estimated on mismatched pairs
    for i in range(32):
        r = (pi[i] - ref[i]).item()
        # loss = λ_y − v(x, y), v = λ_D σ(β(r − z)) or λ_U σ(β(z − r))
        want = lam_d * (1 - sig(beta * (r - z))) if labels[i] else lam_u * (1 - sig(beta * (z - r)))
        assert losses[i].item() == pytest.approx(want, rel=1e-12)


def test_kto_matches_trl_loss_and_metrics():
    g = torch.Generator().manual_seed(1)
    lengths, kl_lengths = (3, 5, 2, 4, 6), (2, 4, 1, 3, 5)  # KL rows: another width (the stub)
    rows = [-torch.rand(n, generator=g, dtype=torch.float64) for n in lengths]
    ref_rows = [-torch.rand(n, generator=g, dtype=torch.float64) for n in lengths]
    kl = [-0.5 * torch.rand(n, generator=g, dtype=torch.float64) for n in kl_lengths]  # z_ref > 0
    ref_kl = [-torch.rand(n, generator=g, dtype=torch.float64) for n in kl_lengths]
    labels = [True, False, True, True, False]
    want, trl_metrics = trl_kto_loss(rows, ref_rows, labels, kl, ref_kl, beta=0.5, undesirable_weight=1.5)
    loss = L.KTOLoss(beta=0.5, undesirable_weight=1.5)
    sums = lambda xs: torch.stack([x.sum() for x in xs])  # noqa: E731
    mask = torch.tensor(labels)
    losses, rewards, extra = loss(
        sums(rows), sums(ref_rows), mask, policy_kl_logps=sums(kl), reference_kl_logps=sums(ref_kl)
    )
    torch.testing.assert_close(losses.mean(), want)
    assert trl_metrics["kl"] > 0
    groups = unpaired_metrics(losses, rewards, sums(rows), torch.zeros(5), mask, extra, lambda x: x)
    ours = {k: v.item() for metrics, _ in groups for k, v in metrics.items()}
    for key in (
        "kl",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
    ):
        assert ours[key] == pytest.approx(trl_metrics[key], rel=1e-6), key


def test_kto_loss_aversion_check():
    """Eq. 8: λ_D n_D / (λ_U n_U) in [1, 4/3]; 24 desirable, 12 undesirable rows, λ = 1: ratio 2."""
    assert L.KTOLoss().balance_warning(10, 10) is None  # ratio 1
    assert L.KTOLoss(desirable_weight=1.3).balance_warning(10, 10) is None  # 1.3
    message = L.KTOLoss().balance_warning(24, 12)
    # λ_D in [12/24, (4/3)·12/24] = [0.5, 0.667]; λ_U in [24/12/(4/3), 24/12] = [1.5, 2]
    assert "= 2," in message and "[0.5, 0.667]" in message and "[1.5, 2]" in message
    assert L.KTOLoss(desirable_weight=0.6).balance_warning(24, 12) is None  # inside the advice
    assert "one label only" in L.KTOLoss().balance_warning(5, 0)


def test_bco_hand_worked_running_shift():
    """β = 1. Batch 1: rewards r = [1, −1, 0.5] (labels T, F, T): δ = mean r = 1/6.

    losses: −log σ(1 − 1/6), −log σ(−(−1 − 1/6)) = −log σ(7/6), −log σ(0.5 − 1/6)
    Batch 2: rewards all 0, δ = (1/6 + 0)/2 = 1/12. Evaluation leaves δ alone.
    """
    loss = L.BCOLoss(beta=1.0).train()
    labels = torch.tensor([True, False, True])
    losses, _, metrics = loss(t([1.0, -1.0, 0.5]), t([0.0, 0.0, 0.0]), labels)
    nls = lambda x: -math.log(sig(x))  # noqa: E731
    torch.testing.assert_close(losses, t([nls(5 / 6), nls(7 / 6), nls(1 / 3)]))
    assert metrics["delta"].item() == pytest.approx(1 / 6)
    loss(t([0.0, 0.0, 0.0]), t([0.0, 0.0, 0.0]), labels)
    assert loss.running_mean.item() == pytest.approx(1 / 12) and loss.num_batches.item() == 2
    loss.eval()
    _, _, metrics = loss(t([5.0, 5.0, 5.0]), t([0.0, 0.0, 0.0]), labels)
    assert metrics["delta"].item() == pytest.approx(1 / 12)
    # δ is state: in the module's state_dict, so checkpoints carry it and resume restores it
    restored = L.BCOLoss(beta=1.0)
    restored.load_state_dict(loss.state_dict())
    assert restored.running_mean.item() == pytest.approx(1 / 12) and restored.num_batches.item() == 2


def test_bco_matches_paper_formula_on_random_inputs():
    g = torch.Generator().manual_seed(2)
    pi, ref = (-5 * torch.rand(40, generator=g, dtype=torch.float64) for _ in range(2))
    labels = torch.rand(40, generator=g) > 0.5
    losses, _, _ = L.BCOLoss(beta=0.2).train()(pi, ref, labels)
    r = 0.2 * (pi - ref)
    delta = r.mean()
    want = torch.where(labels, -torch.log(torch.sigmoid(r - delta)), -torch.log(1 - torch.sigmoid(r - delta)))
    torch.testing.assert_close(losses, want)


def _rank_statistics(rank: int, world: int, init_file: str, out: dict) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    # rank 0: 2 rows, rank 1: 3 rows (uneven); KL rows likewise
    r = [t([1.0, 2.0]), t([3.0, 4.0, 5.0])][rank]
    kl = [t([0.2, 0.4]), t([0.6, 0.8, 1.0])][rank]
    labels = torch.ones(len(r), dtype=torch.bool)
    _, _, k = L.KTOLoss()(
        r, torch.zeros_like(r), labels, policy_kl_logps=kl, reference_kl_logps=torch.zeros_like(kl)
    )
    bco = L.BCOLoss(beta=1.0).train()
    bco(r, torch.zeros_like(r), labels)
    out[rank] = (k["kl"].item(), bco.running_mean.item())
    torch.distributed.destroy_process_group()


@pytest.mark.slow  # two processes (gloo)
def test_reference_point_and_shift_are_averaged_over_ranks(tmp_path):
    """Rows of both ranks count once each: z_ref = mean(0.2 … 1.0) = 0.6, δ = mean(1 … 5) = 3."""
    out = mp.Manager().dict()
    mp.spawn(_rank_statistics, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
    for rank in (0, 1):
        assert out[rank][0] == pytest.approx(0.6) and out[rank][1] == pytest.approx(3.0)


def test_kto_without_mismatched_rows_uses_zero():
    """A one-prompt batch has no KL rows: z_ref = 0 (no rank has any), the loss stays finite."""
    empty = torch.zeros(0, dtype=torch.float64)
    losses, _, metrics = L.KTOLoss(beta=1.0)(
        t([1.0, -1.0]), t([0.0, 0.0]), LABELS, policy_kl_logps=empty, reference_kl_logps=empty
    )
    assert metrics["kl"].item() == 0.0
    torch.testing.assert_close(losses, t([1 - sig(1.0), 1 - sig(1.0)]))
    with pytest.raises(ValueError, match="policy_kl_logps"):
        L.KTOLoss()(t([1.0]), t([0.0]), LABELS[:1])
