"""f-DPO, LD-DPO and WPO: hand-worked numbers, the papers' formulas on random inputs, and TRL 1.16's
own ``DPOTrainer._compute_loss`` (run through :mod:`tests.trl_reference`) on one batch.

The per-token inputs go through the same path as in training: a
:class:`~dpo_lightning.engine.CompletionStats` holding per-token log-probs, the stage's input
builders (:mod:`dpo_lightning.stages.inputs`), then the loss.
"""

from __future__ import annotations

import math

import pytest
import torch

from dpo_lightning import losses as L
from dpo_lightning.engine import CompletionStats
from dpo_lightning.stages.inputs import log_sum_sq_probs, shared_logps
from tests.trl_reference import trl_dpo_loss


def t(xs):
    return torch.tensor(xs, dtype=torch.float64)


def softplus_neg(x: float) -> float:
    """−log σ(x)."""
    return math.log1p(math.exp(-x))


def stats(tokens: list[torch.Tensor], sq: list[torch.Tensor] | None = None) -> CompletionStats:
    """Per-completion stats from per-token values (completions in order), as an engine gives them."""
    flat = torch.cat(tokens)
    return CompletionStats(
        logps=torch.stack([x.sum() for x in tokens]),
        lengths=t([len(x) for x in tokens]),
        mean_logits=torch.zeros(len(tokens), dtype=torch.float64),
        token_logps=flat,
        log_sum_sq_probs=None if sq is None else torch.stack([x.sum() for x in sq]),
    )


def pair_call(loss, policy, reference, ci, ri):
    """The DPO stage's call: per-pair summed log-probs, lengths and the inputs the loss asks for."""
    kwargs = {}
    if "shared_logps" in loss.extra_inputs:
        kwargs |= shared_logps(policy, reference, ci, ri)
    if "log_sum_sq_probs" in loss.extra_inputs:
        kwargs |= log_sum_sq_probs(policy, reference, ci, ri)
    ref = (None, None) if reference is None else (reference.logps[ci], reference.logps[ri])
    return loss(
        policy.logps[ci],
        policy.logps[ri],
        *ref,
        chosen_lengths=policy.lengths[ci],
        rejected_lengths=policy.lengths[ri],
        **kwargs,
    )


def random_tokens(lengths, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [-torch.rand(n, generator=g, dtype=dtype) * 2 for n in lengths]


LENGTHS = (3, 5, 4, 2, 6, 1)  # 3 pairs: chosen 3, 5, 4 tokens; rejected 2, 6, 1
CI, RI = torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5])


# ---- f-DPO ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("divergence", "want"),
    [
        # u = πθ/πref = 2 for yw, 1 for yl, β = 1; f'(1) = 0 in each row below, so Δ = f'(2):
        ("reverse_kl", math.log(1.5)),  # Δ = log 2: −log σ(log 2) = log(1 + 1/2)
        ("forward_kl", 0.474077),  # Δ = 1 − 1/2 = 0.5: log(1 + e^−0.5)
        ("js", math.log(1.75)),  # Δ = log 2 + log(2/3) = log(4/3): log(1 + 3/4)
        ("alpha", 0.442548),  # α = 0.5: Δ = (2^−0.5 − 1)/(−0.5) = 0.585786: log(1 + e^−0.585786)
    ],
)
def test_f_dpo_hand_worked(divergence, want):
    loss = L.FDivergenceDPOLoss(beta=1.0, divergence=divergence, alpha=0.5)
    losses, chosen_r, rejected_r = loss(t([math.log(2)]), t([-1.0]), t([0.0]), t([-1.0]))
    torch.testing.assert_close(losses, t([want]), atol=1e-6, rtol=0)
    torch.testing.assert_close(chosen_r, t([math.log(2)]))  # β log u, as DPO
    torch.testing.assert_close(rejected_r, t([0.0]))


def paper_f_prime(name: str, u: torch.Tensor, a: float) -> torch.Tensor:
    """f'(u) of the f-DPO paper's generators (u a probability ratio), constants included."""
    return {
        "reverse_kl": lambda: torch.log(u) + 1,  # f = u log u
        "forward_kl": lambda: -1 / u,  # f = −log u
        "js": lambda: torch.log(2 * u / (1 + u)),  # f = u log u − (1 + u) log((1 + u)/2)
        "alpha": lambda: (1 - u ** (-a)) / a,  # f = (u^(1−a) − (1−a)u − a) / (a(a − 1))
    }[name]()


@pytest.mark.parametrize("divergence", sorted(L.margin.F_DIVERGENCES))
def test_f_dpo_matches_paper_formula_on_random_inputs(divergence):
    g = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = (-10 * torch.rand(64, generator=g, dtype=torch.float64) for _ in range(4))
    alpha, beta = 0.3, 0.2
    losses, _, _ = L.FDivergenceDPOLoss(beta, divergence, alpha)(pc, pr, rc, rr)
    # probabilities, not log-probs: u = πθ(y)/πref(y); the paper's a = 1 − TRL's α
    u_c, u_r = torch.exp(pc) / torch.exp(rc), torch.exp(pr) / torch.exp(rr)
    a = 1 - alpha
    delta = paper_f_prime(divergence, u_c, a) - paper_f_prime(divergence, u_r, a)
    torch.testing.assert_close(losses, -torch.nn.functional.logsigmoid(beta * delta))


def test_f_dpo_limits():
    g = torch.Generator().manual_seed(2)
    x = [-5 * torch.rand(8, generator=g, dtype=torch.float64) for _ in range(4)]
    dpo = L.DPOLoss(0.3)(*x)[0]
    torch.testing.assert_close(L.FDivergenceDPOLoss(0.3, "reverse_kl")(*x)[0], dpo)
    torch.testing.assert_close(L.FDivergenceDPOLoss(0.3, "alpha", alpha=1.0)(*x)[0], dpo)
    forward = L.FDivergenceDPOLoss(0.3, "forward_kl")(*x)[0]
    torch.testing.assert_close(L.FDivergenceDPOLoss(0.3, "alpha", alpha=0.0)(*x)[0], forward)
    with pytest.raises(ValueError, match=r"divergence=.kl.: must be one of"):
        L.FDivergenceDPOLoss(0.3, "kl")


@pytest.mark.parametrize(
    ("divergence", "trl_name"),
    [
        ("reverse_kl", "reverse_kl"),
        ("forward_kl", "forward_kl"),
        ("js", "js_divergence"),
        ("alpha", "alpha_divergence"),
    ],
)
def test_f_dpo_matches_trl(divergence, trl_name):
    # fp32, as the engines give log-probs (TRL 1.16's α-divergence has no fp64 branch)
    policy, reference = random_tokens(LENGTHS, 3, torch.float32), random_tokens(LENGTHS, 4, torch.float32)
    want, metrics = trl_dpo_loss(
        policy, reference, beta=0.2, f_divergence_type=trl_name, f_alpha_divergence_coef=0.3
    )
    loss = L.FDivergenceDPOLoss(beta=0.2, divergence=divergence, alpha=0.3)
    losses, chosen_r, rejected_r = pair_call(loss, stats(policy), stats(reference), CI, RI)
    torch.testing.assert_close(losses.mean(), want)
    assert chosen_r.mean().item() == pytest.approx(metrics["rewards/chosen"])
    assert rejected_r.mean().item() == pytest.approx(metrics["rewards/rejected"])


# ---- LD-DPO -----------------------------------------------------------------------------------


def test_ld_dpo_hand_worked():
    """yw: policy tokens [−1, −2, −3], reference [−1, −1, −1]; yl: policy [−0.5, −0.5], reference
    [−1, −1]. Shared length l = 2, α = 0.5, β = 1:

        π_LD(yw) = −1 − 2 + 0.5·(−3) = −4.5     r_LD(yw) = −2 + 0.5·(−1) = −2.5
        π_LD(yl) = −1 (all shared)              r_LD(yl) = −2
        Δ = (−4.5 + 2.5) − (−1 + 2) = −3  ->  −log σ(−3) = log(1 + e³) = 3.048587
    (plain DPO: Δ = −4, loss 4.018150)
    """
    policy = stats([t([-1.0, -2.0, -3.0]), t([-0.5, -0.5])])
    reference = stats([t([-1.0, -1.0, -1.0]), t([-1.0, -1.0])])
    ci, ri = torch.tensor([0]), torch.tensor([1])
    losses, chosen_r, rejected_r = pair_call(L.LDDPOLoss(beta=1.0, alpha=0.5), policy, reference, ci, ri)
    torch.testing.assert_close(losses, t([3.048587]), atol=1e-6, rtol=0)
    torch.testing.assert_close(chosen_r, t([-2.0]))  # β (π_LD − r_LD), as TRL 1.16 logs them
    torch.testing.assert_close(rejected_r, t([1.0]))
    dpo, _, _ = pair_call(L.LDDPOLoss(beta=1.0, alpha=1.0), policy, reference, ci, ri)
    torch.testing.assert_close(dpo, t([4.018150]), atol=1e-6, rtol=0)


def test_ld_dpo_matches_paper_formula_k_wise():
    """A completion ranked against two others is split at each pair's own shared length."""
    tokens = random_tokens((5, 2, 7), 5)  # completion 0 beats 1 (l = 2) and 2 (l = 5)
    ref_tokens = random_tokens((5, 2, 7), 6)
    ci, ri, alpha, beta = torch.tensor([0, 0, 2]), torch.tensor([1, 2, 1]), 0.3, 0.7
    losses, _, _ = pair_call(L.LDDPOLoss(beta, alpha), stats(tokens), stats(ref_tokens), ci, ri)

    def ld(x, n):  # the paper's desensitised log-likelihood, token by token
        return sum(x[i].item() * (1 if i < n else alpha) for i in range(len(x)))

    want = []
    for w, lose in zip(ci.tolist(), ri.tolist(), strict=True):
        n = min(len(tokens[w]), len(tokens[lose]))
        delta = (ld(tokens[w], n) - ld(ref_tokens[w], n)) - (ld(tokens[lose], n) - ld(ref_tokens[lose], n))
        want.append(softplus_neg(beta * delta))
    torch.testing.assert_close(losses, t(want))


def test_ld_dpo_matches_trl():
    policy, reference = random_tokens(LENGTHS, 7), random_tokens(LENGTHS, 8)
    want, metrics = trl_dpo_loss(policy, reference, beta=0.4, ld_alpha=0.25)
    losses, chosen_r, _ = pair_call(L.LDDPOLoss(0.4, 0.25), stats(policy), stats(reference), CI, RI)
    torch.testing.assert_close(losses.mean(), want)
    assert chosen_r.mean().item() == pytest.approx(metrics["rewards/chosen"])


def test_ld_dpo_without_shared_inputs_fails_clearly():
    with pytest.raises(ValueError, match="policy_chosen_shared_logps"):
        L.LDDPOLoss()(t([-1.0]), t([-2.0]), t([-1.0]), t([-2.0]))
    with pytest.raises(ValueError, match="needs reference log-probs"):
        L.LDDPOLoss()(t([-1.0]), t([-2.0]), None, None)


# ---- WPO --------------------------------------------------------------------------------------


def test_wpo_hand_worked():
    """yw: 2 tokens, Σ log p = −2, Σ log Σ p² = −1 -> w = exp((−2 + 1)/2) = e^−0.5 = 0.606531;
    yl: 3 tokens, Σ log p = −3, Σ log Σ p² = −3 -> w = e^0 = 1. Reference = policy, so DPO's Δ = 0
    and its loss is log 2: weighted 0.606531 · log 2 = 0.420415."""
    policy = stats([t([-1.0, -1.0]), t([-1.0, -1.0, -1.0])], sq=[t([-0.5, -0.5]), t([-1.0, -1.0, -1.0])])
    reference = stats([t([-1.0, -1.0]), t([-1.0, -1.0, -1.0])])
    losses, _, _ = pair_call(
        L.WPOWeighting(L.DPOLoss(0.1)), policy, reference, torch.tensor([0]), torch.tensor([1])
    )
    torch.testing.assert_close(losses, t([0.420415]), atol=1e-6, rtol=0)


def test_wpo_matches_paper_formula_on_random_inputs():
    """w(x, y) = exp((1/|y|) Σ_t log[πθ(y_t) / Σ_v πθ(v)²]), token by token, times the inner loss."""
    policy, reference = random_tokens(LENGTHS, 14), random_tokens(LENGTHS, 15)
    sq = random_tokens(LENGTHS, 16)
    losses, _, _ = pair_call(L.WPOWeighting(L.DPOLoss(0.3)), stats(policy, sq), stats(reference), CI, RI)
    plain, _, _ = pair_call(L.DPOLoss(0.3), stats(policy), stats(reference), CI, RI)

    def w(i):
        return math.exp(
            sum(p - s for p, s in zip(policy[i].tolist(), sq[i].tolist(), strict=True)) / len(policy[i])
        )

    want = [
        plain[k].item() * w(c) * w(r) for k, (c, r) in enumerate(zip(CI.tolist(), RI.tolist(), strict=True))
    ]
    torch.testing.assert_close(losses, t(want))


@pytest.mark.parametrize(
    ("inner", "trl_type"),
    [(L.DPOLoss(0.2), "sigmoid"), (L.IPOLoss(0.2), "ipo"), (L.HingeLoss(0.2), "hinge")],
    ids=["sigmoid", "ipo", "hinge"],
)
def test_wpo_matches_trl(inner, trl_type):
    policy, reference = random_tokens(LENGTHS, 9), random_tokens(LENGTHS, 10)
    sq = [
        -torch.rand(len(x), generator=torch.Generator().manual_seed(11), dtype=torch.float64) for x in policy
    ]
    want, _ = trl_dpo_loss(policy, reference, beta=0.2, loss_type=trl_type, policy_sq=sq)
    losses, _, _ = pair_call(L.WPOWeighting(inner), stats(policy, sq), stats(reference), CI, RI)
    torch.testing.assert_close(losses.mean(), want)
    unweighted, _ = trl_dpo_loss(policy, reference, beta=0.2, loss_type=trl_type)
    assert abs(want - unweighted) > 1e-3  # the weights changed the loss: a real comparison


def test_wpo_weights_are_detached_and_wrap_any_pairwise_loss():
    policy_tokens = [x.requires_grad_() for x in random_tokens((3, 2), 12)]
    sq = [t([-0.2, -0.3, -0.1]), t([-0.4, -0.2])]
    policy, reference = stats(policy_tokens, sq), stats(random_tokens((3, 2), 13))
    ci, ri = torch.tensor([0]), torch.tensor([1])
    wrapped, _, _ = pair_call(L.WPOWeighting(L.DPOLoss(0.5)), policy, reference, ci, ri)
    plain, _, _ = pair_call(L.DPOLoss(0.5), policy, reference, ci, ri)
    weight = (wrapped / plain).detach()
    g_wrapped = torch.autograd.grad(wrapped.sum(), policy_tokens, retain_graph=True)
    g_plain = torch.autograd.grad(plain.sum(), policy_tokens)
    for a, b in zip(g_wrapped, g_plain, strict=True):
        torch.testing.assert_close(a, weight * b)  # no gradient through the weight itself
    # any pairwise loss, reference-free or mixed, and what it declares passes through
    simpo = L.WPOWeighting(L.SimPOLoss())
    assert simpo.is_reference_free and simpo.extra_inputs == {"log_sum_sq_probs"}
    ld = L.WPOWeighting(L.MixLoss([{"loss": L.LDDPOLoss(), "weight": 1.0}]))
    assert ld.extra_inputs == {"log_sum_sq_probs", "shared_logps"}
    with pytest.raises(ValueError, match="depend on the whole batch"):
        L.WPOWeighting(L.AOTLoss())
    with pytest.raises(ValueError, match="not a pairwise loss"):
        L.WPOWeighting(L.KTOLoss())
