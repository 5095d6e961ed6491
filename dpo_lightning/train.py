"""Train a causal LM with DPO: ``dpo-train`` (same as ``python -m dpo_lightning.train``).

    dpo-train                                    # embedded default: tiny model, offline, CPU
    dpo-train model.name_or_path=gpt2 data.path=data.jsonl trainer=gpu
    dpo-train --multirun loss.beta=0.1,0.5       # a sweep, one run dir per job
    dpo-train trainer=ddp trainer.devices=4      # multi-GPU
    dpo-train logger=wandb                       # W&B (offline when no API key)
    dpo-train hydra.run.dir=runs/a resume=true   # continue runs/a from checkpoints/last.ckpt

Reads top to bottom: seed → tokenizer → data → policy → module → callbacks/loggers → trainer →
fit → validate → export → summary. Returns the metric named by ``optimized_metric`` for sweepers.
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

from dpo_lightning.adapters import build_lora, save_policy
from dpo_lightning.callbacks import PairThroughput
from dpo_lightning.errors import hydra_errors, report_errors
from dpo_lightning.models import load_causal_lm
from dpo_lightning.parallel import full_policy_state_dict, sum_over_ranks
from dpo_lightning.preflight import preflight
from dpo_lightning.reliability import nonfinite_skipped, reliability_callbacks
from dpo_lightning.resume import csv_histories
from dpo_lightning.summary import print_table, scalar_metrics, write_summary
from dpo_lightning.sweeps import mark_launch, run_job
from dpo_lightning.tokenizer import load_tokenizer

# The frozen reference is in eval mode on purpose; Lightning warns about it at fit start.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")

# Shipped inside the package (`conf/` at the top of the repo links here): any install, any cwd.
CONF_DIR = str(Path(__file__).resolve().parent / "conf")
mark_launch()  # before Hydra starts: shared by all jobs of this invocation (W&B group)


def build_tokenizer(model_cfg: DictConfig):
    """The configured tokenizer, else the one saved with ``model.name_or_path``."""
    if model_cfg.get("tokenizer") is not None:
        return instantiate(model_cfg.tokenizer)
    return load_tokenizer(model_cfg.name_or_path, model_cfg.get("trust_remote_code", False))


def build_policy(model_cfg: DictConfig, vocab_size: int, seed: int):
    kwargs = OmegaConf.to_container(model_cfg, resolve=True)
    kwargs.pop("tokenizer", None)
    lora = kwargs.pop("lora", None)
    return build_lora(load_causal_lm(**kwargs, vocab_size=vocab_size, seed=seed), lora)


def train(cfg: DictConfig) -> float | None:
    """Run one training job from a composed config; returns ``cfg.optimized_metric``'s value."""
    start = time.perf_counter()
    resume = preflight(cfg)  # one-line failures before any tokenizing or model work
    L.seed_everything(cfg.seed, workers=True)
    run_dir = Path(cfg.paths.output_dir)

    tokenizer = build_tokenizer(cfg.model)
    datamodule = instantiate(cfg.data, tokenizer=tokenizer)
    datamodule.setup("fit")  # validate and tokenize before any model work

    policy = build_policy(cfg.model, len(tokenizer), cfg.seed)
    # The stage group (stage=dpo|sft|reward_model) names the LightningModule and its parts.
    module = instantiate(
        cfg.stage.module,
        policy=policy,
        optimizer=instantiate(cfg.optim.optimizer),
        scheduler=instantiate(cfg.optim.scheduler) if cfg.optim.get("scheduler") else None,
    )
    engine = getattr(module, "engine", None)  # the stage's forward engine (conf/engine)
    if engine is not None:
        engine.prepare(datamodule)  # its batch layout (collator) and batch order

    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    throughput = next((c for c in callbacks if isinstance(c, PairThroughput)), None) or PairThroughput()
    callbacks = [*(c for c in callbacks if c is not throughput), throughput]
    callbacks += reliability_callbacks(cfg)
    loggers = [instantiate(lg) for lg in (cfg.get("logger") or {}).values() if lg]
    if not loggers:  # logger=none: an LR monitor would refuse to start with nothing to write to
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    histories = csv_histories(loggers, resume["global_step"]) if resume else []
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    for history in histories:  # a resumed run continues the metric history of the killed one
        history.restore(loggers)

    trainer.fit(module, datamodule=datamodule, ckpt_path=resume["path"] if resume else None)
    train_metrics = scalar_metrics(trainer.callback_metrics, "train")
    trainer.validate(module, datamodule=datamodule, verbose=False)
    val_metrics = scalar_metrics(trainer.callback_metrics, "val")

    export_dir = run_dir / "hf_model"
    # Counts are per rank: sum them (collective, like the FSDP2 gather of the full weights).
    pairs, tokens = sum_over_ranks(trainer, throughput.total_pairs, throughput.total_tokens)
    policy_state = full_policy_state_dict(module)
    ckpt_cb = trainer.checkpoint_callback
    summary = {
        "run_dir": str(run_dir),
        "steps": trainer.global_step,
        "train": train_metrics,
        "val": val_metrics,
        "pairs_per_sec": pairs / max(throughput.train_seconds, 1e-9),
        "tokens_per_sec": tokens / max(throughput.train_seconds, 1e-9),
        "pairs_trained": pairs,
        "wall_seconds": time.perf_counter() - start,
        "rows_dropped": sum(sum(r.dropped.values()) for r in datamodule.reports.values()),
        "data": datamodule.report(),
        "checkpoint": (ckpt_cb.last_model_path or ckpt_cb.best_model_path or None) if ckpt_cb else None,
        "export": str(export_dir),
        "resumed_from": resume["path"] if resume else None,
        "nonfinite_steps_skipped": nonfinite_skipped(callbacks),
    }
    if trainer.is_global_zero:
        merge = bool((cfg.model.get("lora") or {}).get("merge_on_export", False))
        save_policy(module.policy, export_dir, merge_adapter=merge, state_dict=policy_state)
        tokenizer.save_pretrained(export_dir)
        summary["wall_seconds"] = time.perf_counter() - start
        write_summary(run_dir / "summary.json", summary)
        print_table(summary)
    return _objective(cfg, summary)


def _objective(cfg: DictConfig, summary: dict[str, Any]) -> float | None:
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
