"""The online-vs-offline verdict of dpo-sentiment, on hand-made frontier points."""

from __future__ import annotations

import pytest

from dpo_lightning.sentiment.frontier import (
    offline_curve,
    online_verdict,
    plot_frontier,
    read_frontier_csv,
    reward_on_curve,
    verdict_lines,
    write_frontier_csv,
)
from tests.test_sentiment_pipeline import compose_pipeline


def point(label, beta, reward, kl, se=0.01):
    return {"label": label, "beta": beta, "reward": reward, "kl": kl, "reward_se": se}


OFFLINE = [
    point("sft", None, 0.30, 0.0, se=0.04),
    point("best_of_n", None, 0.78, 0.64),  # not part of the curve
    point("dpo_beta_2", 2.0, 0.85, 1.65, se=0.02),
    point("dpo_beta_0.5", 0.5, 0.93, 3.84),
    point("dpo_beta_0.1", 0.1, 0.965, 7.14, se=0.005),
    point("dpo_beta_0.05", 0.05, 0.90, 9.0),  # dominated: dropped
]


def online(beta, reward, kl):
    """An online point whose standard error comes from its std and sample count: 0.2 / √400."""
    row = {"label": f"online_beta_{beta:g}", "beta": beta, "reward": reward, "kl": kl}
    return row | {"reward_std": 0.2, "n_samples": 400}


def test_offline_curve_is_the_upper_envelope_of_sft_and_offline_runs():
    curve = offline_curve(OFFLINE)
    assert curve == [(0.0, 0.30, 0.04), (1.65, 0.85, 0.02), (3.84, 0.93, 0.01), (7.14, 0.965, 0.005)]


def test_reward_on_curve_by_hand():
    curve = offline_curve(OFFLINE)
    # KL 2.0: t = (2.0 − 1.65) / (3.84 − 1.65) = 0.159817; 0.85 + 0.08 t = 0.862785;
    # se = √(((1 − t) · 0.02)² + (t · 0.01)²) = √(2.82363e-4 + 2.5542e-6) = 0.016879
    reward, se = reward_on_curve(curve, 2.0)
    assert reward == pytest.approx(0.862785, abs=1e-6) and se == pytest.approx(0.016879, abs=1e-6)
    # KL 5.0: 0.93 + 0.035 · (5.0 − 3.84) / (7.14 − 3.84) = 0.93 + 0.035 · 0.351515 = 0.942303
    assert reward_on_curve(curve, 5.0)[0] == pytest.approx(0.942303, abs=1e-6)
    assert reward_on_curve(curve, 20.0) == (0.965, 0.005)  # the curve reaches no more
    assert reward_on_curve(curve, -0.1) == (0.30, 0.04)  # a noisy negative KL estimate: SFT's


def test_verdict_needs_two_online_points_above(tmp_path):
    rows = [
        *OFFLINE,
        online(2.0, 0.95, 2.0),  # above: 0.95 > 0.862785
        online(0.5, 0.90, 5.0),  # below: 0.90 < 0.942303
        online(0.1, 0.97, 9.0),  # above: more reward than the offline curve ever reaches
    ]
    verdict = online_verdict(rows)
    assert [p["above"] for p in verdict["points"]] == [True, False, True]  # sorted by β: 0.1, 0.5, 2
    assert verdict["passed"] and verdict["above"] == 2
    low_kl = verdict["points"][2]
    assert low_kl["margin"] == pytest.approx(0.95 - 0.862785, abs=1e-6)
    combined = ((0.2 / 20) ** 2 + 0.016879**2) ** 0.5  # online se ⊕ the curve's se at KL 2
    assert low_kl["margin_se"] == pytest.approx(low_kl["margin"] / combined, rel=1e-4)
    assert low_kl["inside"] and low_kl["strict"]  # 0.0872 / 0.0196 = 4.4 SE, inside [0, 7.14]
    far = verdict["points"][0]
    assert far["above"] and not far["inside"] and not far["strict"]  # beyond the offline KL range
    assert verdict["strict"] == 1 and verdict["offline_kl_range"] == [0.0, 7.14]
    assert not online_verdict([*OFFLINE, online(2.0, 0.95, 2.0), online(0.1, 0.96, 9.0)])["passed"]
    lines = verdict_lines(verdict)
    assert lines[0].startswith("rule: ") and lines[-1].startswith("verdict: PASSED: 2 of 3")
    assert "outside the offline KL range [0.00, 7.14]" in lines[1]
    assert "1 of 3 also inside its KL range and > 2 SE" in lines[-1]
    # Reversed: against the online curve (SFT, (2, 0.95), (9, 0.97); (5, 0.90) is dominated) the
    # offline points at KL 1.65 (chord 0.30 + 0.65 · 1.65/2 = 0.836250 < 0.85) and 7.14
    # (0.95 + 0.02 · 5.14/7 = 0.964686 < 0.965) are above; 3.84 (0.955257 > 0.93) and 9 are not.
    assert verdict["reverse"] == 2 and verdict["offline_points"] == 4
    assert lines[-1].endswith("reversed, 2 of 4 offline points are above the online curve")
    write_frontier_csv(rows, tmp_path / "f.csv")
    assert read_frontier_csv(tmp_path / "f.csv")[-1]["label"] == "online_beta_0.1"
    plot_frontier(rows, tmp_path / "f.png", "VADER compound")  # both curves
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("pipeline", ["miniature", "paper"])
def test_online_runs_compose_with_the_budget(pipeline, tmp_path):
    """The online arm's overrides compose: stage=online_dpo on prompt data, the offline β values,
    K and sampling as the offline sampler, one pass over the prefixes (N × K reward calls)."""
    from pathlib import Path

    from dpo_lightning.sentiment.online import online_overrides, reward_setting
    from dpo_lightning.sentiment.stages import compose_train_config

    cfg = compose_pipeline([f"pipeline={pipeline}"], tmp_path)
    assert list(cfg.online.betas) == list(cfg.dpo.betas)
    extra = online_overrides(cfg, Path("/sft"), Path("/prompts"), 0.5, n_prompts=512)
    train = compose_train_config(
        [*cfg.online.overrides, *extra, f"paths.output_dir={tmp_path}", "paths.group=g"]
    )
    assert train.stage.module._target_.endswith("OnlineDPOModule") and train.loss.beta == 0.5
    assert train.data._target_.endswith("PromptDataModule") and train.data.path == "/prompts"
    batch = cfg.online.prompts_per_step
    assert train.data.batch_size == batch and train.trainer.max_steps == -(-512 // batch)
    assert train.online.k == cfg.sample.k and train.online.generation.top_k == 0
    assert train.online.generation.max_new_tokens == cfg.sample.max_new_tokens
    assert train.trainer.limit_val_batches == 0  # no reward calls beyond the budget
    assert reward_setting(cfg)["online.reward"]["fn"]["_target_"] == cfg.reward._target_
    if pipeline == "miniature":  # the offline runs' optimiser
        offline = compose_train_config(
            [*cfg.dpo.overrides, "model.name_or_path=/m", "data.path=/d", f"paths.output_dir={tmp_path}"]
        )
        assert train.optim == offline.optim
