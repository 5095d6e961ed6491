"""The online arm of ``dpo-sentiment``: online DPO runs next to the offline ones, on one budget.

Offline DPO pays ``N × K`` reward calls up front (K samples of π_SFT for each of the N training
prefixes) and trains on the pairs. Each online run (``online/beta_<β>/``, ``stage=online_dpo``)
starts from the same π_SFT (also its reference) with the same β, optimiser and pairing, and
visits the same N prefixes once, ``data.batch_size`` per step, sampling K completions each from
the *current* policy: ``ceil(N / batch)`` steps and exactly ``N × K`` reward calls — measured
from the run's ``summary.json``, not assumed. Its validation is off: scoring held-out samples
would cost reward calls beyond the budget (the frontier evaluation scores every run the same
way afterwards).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
from omegaconf import DictConfig, OmegaConf


def save_prompts(run: Path, train_prompts: list[str], val_prompts: list[str]) -> Path:
    """``prompts/``: the offline run's training prefixes as ``{prompt}`` rows (+ a validation
    split the DataModule requires; the online runs do not validate)."""
    datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"prompt": train_prompts}),
        validation=datasets.Dataset.from_dict({"prompt": val_prompts}),
    ).save_to_disk(str(run / "prompts"))
    return run / "prompts"


def online_overrides(cfg: DictConfig, sft: Path, prompts: Path, beta: float, n_prompts: int) -> list[str]:
    """The dpo-train overrides of one online run: its paths, β, and the budget (one pass over
    the ``n_prompts`` prefixes, K samples each, sampled as the offline data was)."""
    batch = int(cfg.online.prompts_per_step)
    s = cfg.sample
    return [
        f"model.name_or_path={sft}",
        f"data.path={prompts}",
        f"data.batch_size={batch}",
        f"loss.beta={beta}",
        f"seed={cfg.seed}",
        f"online.k={s.k}",
        f"online.generation.max_new_tokens={s.max_new_tokens}",
        f"online.generation.temperature={s.temperature}",
        "online.generation.top_k=0",  # as the offline sampler: from π itself
        "online.generation.top_p=1.0",
        f"trainer.max_steps={math.ceil(n_prompts / batch)}",
        "trainer.log_every_n_steps=1",  # the report reads every step's row (generation rate, ties)
    ]


def reward_setting(cfg: DictConfig) -> dict[str, Any]:
    """The pipeline's ground-truth reward as the online runs' ``online.reward`` (set after
    composing, so any reward config — a model path included — passes unchanged)."""
    return {
        "online.reward": {
            "_target_": "dpo_lightning.online.rewards.TextReward",
            "fn": OmegaConf.to_container(cfg.reward, resolve=True),
            "separator": "",
        }
    }


def run_stats(run_dir: Path) -> dict[str, Any]:
    """Reward calls, sampling throughput and share of the step, and wall time of an online run
    (``summary.json`` + the per-step rows of ``csv/metrics.csv``)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/online/gen_tokens_per_s")]
    fractions = [float(r["train/online/gen_fraction"]) for r in rows if r.get("train/online/gen_fraction")]
    rates = [float(r["train/online/gen_tokens_per_s"]) for r in rows]
    return {
        "reward_calls": int(summary["train"]["online/reward_calls"]),
        "steps": summary["steps"],
        "pairs_trained": summary["pairs_trained"],
        "gen_tokens_per_s_mean": sum(rates) / len(rates) if rates else None,
        "gen_fraction_mean": sum(fractions) / len(fractions) if fractions else None,
        "ties_per_step": sum(float(r["train/online/ties"]) for r in rows) / max(len(rows), 1),
        "wall_seconds": summary.get("wall_seconds"),
    }


def run_online(
    cfg: DictConfig,
    run: Path,
    sft: Path,
    train_prompts: list[str],
    held_prompts: list[str],
    run_training: Callable[..., Path],
) -> tuple[dict[float, Path], dict[str, Any]]:
    """One online DPO run per ``online.betas`` on the offline data's prefixes and budget;
    returns ``({β: hf_model}, {"<β>": run_stats})``."""
    if not cfg.online.betas:
        return {}, {}
    prompts = save_prompts(run, train_prompts, held_prompts)
    paths, stats = {}, {}
    budget = len(train_prompts) * cfg.sample.k
    for beta in cfg.online.betas:
        out = run / "online" / f"beta_{beta:g}"
        extra = online_overrides(cfg, sft, prompts, float(beta), len(train_prompts))
        overrides = [*cfg.online.overrides, *cfg.online.get("extra", [])]
        paths[float(beta)] = run_training(overrides, out, extra, reward_setting(cfg))
        stats[f"{beta:g}"] = run_stats(out)
        calls = stats[f"{beta:g}"]["reward_calls"]
        print(f"[dpo-sentiment] online β={beta:g}: {calls} reward calls (the offline data's: {budget})")
    return paths, stats


def attach_reward_calls(rows: list[dict], offline_calls: int, online_stats: dict[str, Any]) -> None:
    """Each trained point's ``reward_calls``: the offline data set's for offline DPO, the run's
    own (measured) for online DPO; none for the reference points."""
    for r in rows:
        if r["label"].startswith("online_beta_"):
            r["reward_calls"] = online_stats[f"{r['beta']:g}"]["reward_calls"]
        elif r["label"].startswith("dpo_beta_"):
            r["reward_calls"] = offline_calls
