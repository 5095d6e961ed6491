"""Train a causal LM with DPO: ``dpo-train`` (same as ``python -m dpo_lightning.train``).

    dpo-train                                    # embedded default: tiny model, offline, CPU
    dpo-train model.name_or_path=gpt2 data.path=data.jsonl trainer=gpu
    dpo-train --multirun loss.beta=0.1,0.5       # a sweep, one run dir per job
    dpo-train trainer=ddp trainer.devices=4      # multi-GPU
    dpo-train logger=wandb                       # W&B (offline when no API key)
    dpo-train hydra.run.dir=runs/a resume=true   # continue runs/a from checkpoints/last.ckpt
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:PORT --max-restarts 3 \
        -m dpo_lightning.train trainer=fsdp trainer.num_nodes=2 hydra.run.dir=/shared/run   # restarts resume
        # (with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 exported on every node: dpo_lightning.run.restarts)
    dpo-train export.push_to_hub=true export.repo_id=me/tiny-dpo  # hf_model/ to the hub at the end

:func:`train` reads top to bottom: preflight → seed → tokenizer → engine → data → callbacks/loggers
→ trainer → stage module → fit → validate → export (policy, tokenizer, model card) → summary → push
to the hub when ``export.push_to_hub``. Everything that can refuse a setting
or an input comes before the model is loaded, the one expensive step before training. It returns
the metric named by ``optimized_metric`` for sweepers.

``model.name_or_path`` alone means that model with its own tokenizer (whatever ``model=`` preset
is chosen); ``data.path`` alone means that data (the built-in generator only runs without one).
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig, OmegaConf

from dpo_lightning.engine import ForwardEngine
from dpo_lightning.models.loading import load_causal_lm
from dpo_lightning.models.lora import build_lora, save_policy
from dpo_lightning.models.parallel import full_state_dict
from dpo_lightning.models.tokenizers import load_tokenizer
from dpo_lightning.reporting.hub import push_if_asked
from dpo_lightning.reporting.model_card import write_model_card
from dpo_lightning.reporting.summary import print_table, run_summary, scalar_metrics, write_summary
from dpo_lightning.reporting.throughput import RunTotals
from dpo_lightning.run.callbacks import nonfinite_skipped, reliability_callbacks
from dpo_lightning.run.errors import ConfigError, hydra_errors, report_errors
from dpo_lightning.run.preflight import preflight
from dpo_lightning.run.restarts import resume_if_restarted
from dpo_lightning.run.resume import csv_histories
from dpo_lightning.run.settings import build, build_trainer
from dpo_lightning.run.sweeps import mark_launch, run_job

# The frozen reference is in eval mode on purpose; Lightning warns about it at fit start.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")

# Shipped inside the package (`conf/` at the top of the repo links here): any install, any cwd.
CONF_DIR = str(Path(__file__).resolve().parent / "conf")
mark_launch()  # before Hydra starts: shared by all jobs of this invocation (W&B group)


def train(cfg: DictConfig) -> float | None:
    """Run one training job from a composed config; returns ``cfg.optimized_metric``'s value."""
    start = time.perf_counter()
    resume_if_restarted(cfg)  # a SLURM requeue / torchrun restart continues its run dir
    resume = preflight(cfg)  # settings, paths, model source, checkpoint: one line each
    L.seed_everything(cfg.seed, workers=True)
    tokenizer = build_tokenizer(cfg.model)
    engine = build(cfg, "engine")  # built once: the DataModule's collator and the forward
    datamodule = build(cfg, "data", tokenizer=tokenizer, layout=engine)
    datamodule.setup("fit")  # validate and tokenize before any model work
    loggers = build_loggers(cfg)
    callbacks = build_callbacks(cfg, has_loggers=bool(loggers))
    trainer: L.Trainer = build_trainer(cfg, callbacks=callbacks, logger=loggers or False)
    module = build_module(cfg, tokenizer, engine)  # the model: last, once everything else is valid
    histories = csv_histories(loggers, resume["global_step"]) if resume else []
    log_config(cfg, loggers, histories)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume["path"] if resume else None)
    warn_if_untrained(trainer)
    metrics = {"train": scalar_metrics(trainer.callback_metrics, "train")}
    trainer.validate(module, datamodule=datamodule, verbose=False)
    metrics["val"] = scalar_metrics(trainer.callback_metrics, "val")
    summary = finish(cfg, trainer, module, tokenizer, datamodule, callbacks, metrics, resume, start)
    return objective(cfg, summary)


def finish(
    cfg: DictConfig,
    trainer: L.Trainer,
    module: L.LightningModule,
    tokenizer: Any,
    datamodule: Any,
    callbacks: list[L.Callback],
    metrics: dict[str, dict[str, float]],
    resume: dict[str, Any] | None,
    start: float,
) -> dict[str, Any]:
    """Export, ``summary.json``, model card, hub push (rank 0); returns the summary (all ranks:
    the weight gather and the count sums are collective)."""
    export_dir = Path(cfg.paths.output_dir) / "hf_model"
    policy_state = full_state_dict(module.policy)  # collective: the FSDP2 / ZeRO-3 gather
    totals = next(c for c in callbacks if isinstance(c, RunTotals))
    extra = {
        "run_dir": cfg.paths.output_dir,
        "export": str(export_dir),
        "resumed_from": resume["path"] if resume else None,
        "nonfinite_steps_skipped": nonfinite_skipped(callbacks),
    }
    summary = run_summary(trainer, metrics, totals, datamodule.report(), extra)  # collective
    if trainer.is_global_zero:
        export_policy(cfg, module.policy, tokenizer, policy_state, export_dir)
        summary["wall_seconds"] = time.perf_counter() - start
        write_summary(export_dir.parent / "summary.json", summary)
        print_table(summary)
        write_model_card(export_dir, cfg, summary)
        push_if_asked(cfg.get("export"), export_dir)  # last: a failed push loses nothing
    return summary


def export_policy(cfg: DictConfig, policy: Any, tokenizer: Any, state: dict | None, export_dir: Path) -> None:
    """``hf_model/``: the policy (``state``: its weights gathered from shards, or None) and tokenizer."""
    merge = bool((cfg.model.get("lora") or {}).get("merge_on_export", False))
    save_policy(policy, export_dir, merge_adapter=merge, state_dict=state)
    tokenizer.save_pretrained(export_dir)


def build_tokenizer(model_cfg: DictConfig):
    """The policy's tokenizer: ``model.tokenizer`` when set (a hub id / folder, or a ``_target_``
    node); else the one saved with ``model.name_or_path``; else, for a new model built from
    ``model.config``, ``model.config_tokenizer`` (model=tiny: a BPE trained offline)."""
    trust = model_cfg.get("trust_remote_code", False)
    override = model_cfg.get("tokenizer")
    if override is not None:
        return instantiate(override) if OmegaConf.is_dict(override) else load_tokenizer(str(override), trust)
    if model_cfg.get("name_or_path") is not None:
        return load_tokenizer(str(model_cfg.name_or_path), trust)
    if model_cfg.get("config_tokenizer") is None:
        raise ConfigError(
            "model.config builds a new model but no tokenizer is set for it: set "
            "model.config_tokenizer (a _target_ node) or model.tokenizer (a hub id or folder)"
        )
    return instantiate(model_cfg.config_tokenizer)


def build_policy(model_cfg: DictConfig, tokenizer: Any, seed: int):
    """The policy from ``model.*`` (a model built from ``model.config`` gets the tokenizer's vocab
    size); a tokenizer with ids the model has no embedding for is refused."""
    kwargs = OmegaConf.to_container(model_cfg, resolve=True)
    for key in ("tokenizer", "config_tokenizer"):
        kwargs.pop(key, None)
    lora = kwargs.pop("lora", None)
    model = load_causal_lm(**kwargs, vocab_size=len(tokenizer), seed=seed)
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ConfigError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's embedding has {rows} rows: "
            "give the model's own tokenizer (model.tokenizer=null uses the one saved with "
            "model.name_or_path)"
        )
    return build_lora(model, lora)


def build_module(cfg: DictConfig, tokenizer: Any, engine: ForwardEngine | None) -> L.LightningModule:
    """The stage's LightningModule (``stage=dpo|sft|reward_model|online_dpo`` names it and its parts)."""
    return instantiate(
        cfg.stage.module,
        policy=build_policy(cfg.model, tokenizer, cfg.seed),
        optimizer=instantiate(cfg.optim.optimizer),
        scheduler=instantiate(cfg.optim.scheduler) if cfg.optim.get("scheduler") else None,
        engine=engine,
        tokenizer=tokenizer,
    )


def build_loggers(cfg: DictConfig) -> list[Any]:
    return [instantiate(lg) for lg in (cfg.get("logger") or {}).values() if lg]


def build_callbacks(cfg: DictConfig, has_loggers: bool) -> list[L.Callback]:
    """The configured callbacks, the run totals ``summary.json`` needs, and the reliability
    callbacks every run gets."""
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    if not has_loggers:  # logger=none: an LR monitor would refuse to start with nothing to write to
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    return [*callbacks, RunTotals(), *reliability_callbacks(cfg)]


def warn_if_untrained(trainer: L.Trainer) -> None:
    """A run that took no optimizer step exports the initial weights: say so, loudly."""
    if trainer.global_step == 0 and trainer.is_global_zero:
        print(
            "[dpo_lightning] warning: no optimizer step was taken (trainer.max_steps reached or no "
            "training batches): hf_model/ will hold the initial, untrained model"
        )


def log_config(cfg: DictConfig, loggers: list[Any], histories: list[Any]) -> None:
    """The resolved config to every logger; a resumed run continues the killed one's history."""
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    for history in histories:
        history.restore(loggers)


def objective(cfg: DictConfig, summary: dict[str, Any]) -> float | None:
    """``optimized_metric`` (``stage/metric``) read from the summary, for sweepers."""
    name = cfg.get("optimized_metric")
    if not name:
        return None
    stage, _, key = name.partition("/")
    return summary.get(stage, {}).get(key)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def hydra_main(cfg: DictConfig) -> float | None:
    with report_errors():  # known failures: one line on stderr, exit code 2
        return run_job(train, cfg)


def main() -> None:
    """``dpo-train``: bad overrides or an unusable run dir fail in one line, too."""
    with hydra_errors(CONF_DIR):
        hydra_main()


if __name__ == "__main__":
    main()
