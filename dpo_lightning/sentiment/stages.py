"""The pipeline's training stages (SFT, one DPO run per β, one online run per β): their configs
composed from ``conf/train.yaml``, checked all at once before the first stage runs
(:func:`check_pipeline`), and run in-process through :func:`dpo_lightning.train.train`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from dpo_lightning.losses.base import BETA_HINT
from dpo_lightning.run.errors import ConfigError, check_number
from dpo_lightning.run.settings import check_settings
from dpo_lightning.sentiment.online import online_overrides, reward_setting
from dpo_lightning.train import CONF_DIR, train

#: the pipeline's own numbers (conf/sentiment.yaml) and their ranges.
PIPELINE_RULES: dict[str, dict[str, Any]] = {
    "prompts.n_train": {"minimum": 1, "integer": True},
    "prompts.n_eval": {"minimum": 1, "integer": True},
    "prompts.min_tokens": {"minimum": 1, "integer": True},
    "prompts.max_tokens": {"minimum": 1, "integer": True},
    "sample.k": {"minimum": 2, "integer": True, "hint": "a preference pair needs two completions"},
    "sample.max_new_tokens": {"minimum": 1, "integer": True},
    "sample.temperature": {"above": 0},
    "sample.batch_size": {"minimum": 1, "integer": True},
    "label.val_fraction": {"above": 0, "below": 1},
    "evaluate.best_of_n": {"minimum": 1, "integer": True},
    "evaluate.samples_per_prompt": {"minimum": 1, "integer": True},
}


def compose_train_config(overrides: list[str]) -> DictConfig:
    """``conf/train.yaml`` composed with ``overrides`` (works inside a running Hydra app: the
    global Hydra state is saved and restored around the compose)."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.singleton import Singleton

    state = Singleton.get_state()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose("train", overrides=overrides)
    finally:
        Singleton.set_state(state)


def stage_config(
    overrides: list[str], out_dir: Path, extra: list[str], settings: dict[str, Any] | None = None
) -> DictConfig:
    """The ``dpo-train`` config of one training stage. ``settings`` (``{dotted key: value}``) are
    set on the composed config, for values no override string can carry safely (a whole reward
    config)."""
    cfg = compose_train_config(
        [
            *overrides,
            *extra,
            f"paths.output_dir={out_dir}",
            f"paths.group=dpo-sentiment-{out_dir.name}",
        ]
    )
    for key, value in (settings or {}).items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def run_training(
    overrides: list[str], out_dir: Path, extra: list[str], settings: dict[str, Any] | None = None
) -> Path:
    """One ``dpo-train`` job in ``out_dir``; returns its exported ``hf_model/``."""
    train(stage_config(overrides, out_dir, extra, settings))
    return out_dir / "hf_model"


#: one training stage: (name, overrides, run dir, overrides the pipeline adds: paths, β, seed).
Stage = tuple[str, list[str], Path, list[str]]


def training_stages(
    cfg: DictConfig, run: Path, base: str, sft: Path, data: Path | None = None
) -> list[Stage]:
    """The SFT run (from ``base``, on ``corpus/``) and every DPO run (from ``sft``, on
    ``pairs/``), in order; ``data`` stands in for both data folders (before they exist)."""
    corpus, pairs = (data, data) if data is not None else (run / "corpus", run / "pairs")
    stages = [
        (
            "sft",
            [*cfg.sft.overrides, *cfg.sft.get("extra", [])],
            run / "sft",
            [f"model.name_or_path={base}", f"data.path={corpus}", f"seed={cfg.seed}"],
        )
    ]
    for beta in cfg.dpo.betas:
        stages.append(
            (
                f"dpo (β={beta})",
                [*cfg.dpo.overrides, *cfg.dpo.get("extra", [])],
                run / "dpo" / f"beta_{beta:g}",
                [
                    f"model.name_or_path={sft}",
                    f"data.path={pairs}",
                    f"loss.beta={beta}",
                    f"seed={cfg.seed}",
                ],
            )
        )
    return stages


def check_pipeline(cfg: DictConfig, run: Path) -> None:
    """Every stage's settings, before the first stage runs (see the module docstring). Paths that
    later stages create are stood in for by the run directory."""
    for key, bounds in PIPELINE_RULES.items():
        check_number(key, OmegaConf.select(cfg, key), **bounds)
    if cfg.prompts.min_tokens > cfg.prompts.max_tokens:
        raise ConfigError(
            f"prompts.min_tokens={cfg.prompts.min_tokens} > prompts.max_tokens={cfg.prompts.max_tokens}"
        )
    betas = cfg.dpo.betas
    if not OmegaConf.is_list(betas) or len(betas) == 0:
        raise ConfigError(f"dpo.betas={betas!r}: must be a non-empty list of β, e.g. 'dpo.betas=[0.1,1]'")
    for i, beta in enumerate(betas):
        check_number(f"dpo.betas.{i}", beta, above=0, hint=BETA_HINT)
    stages = [(*stage, None) for stage in training_stages(cfg, run, str(run), run, data=run)]
    for i, beta in enumerate(cfg.online.get("betas") or []):
        check_number(f"online.betas.{i}", beta, above=0, hint=BETA_HINT)
        overrides = [*cfg.online.overrides, *cfg.online.get("extra", [])]
        extra = online_overrides(cfg, run, run, float(beta), cfg.prompts.n_train)
        stages.append(
            (f"online (β={beta})", overrides, run / "online" / f"beta_{beta:g}", extra, reward_setting(cfg))
        )
    for name, overrides, out_dir, extra, settings in stages:
        try:
            stage = stage_config(overrides, out_dir, extra, settings)
        except Exception as err:  # Hydra's composition errors: unknown keys / options in overrides
            words = " ".join(str(err).split())[:300]
            raise ConfigError(f"the {name} stage's overrides do not compose: {words}") from err
        try:
            check_settings(stage)
        except ConfigError as err:
            raise ConfigError(f"the {name} stage: {err}") from err
