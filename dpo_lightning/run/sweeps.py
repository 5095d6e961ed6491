"""Running one job of a Hydra sweep: a failed job must not stop the others.

    dpo-train -m loss.beta=0.05,0.1,0.5                    # basic sweeper, one run dir per job
    dpo-train hparams_search=optuna                        # Optuna (conf/hparams_search/)
    dpo-train -m launcher=slurm trainer=ddp loss.beta=0.05,0.1   # one SLURM job per run

In a multirun the exception of a failed job is logged with its traceback to the job's log file
(``<job dir>/train.log``) and the job returns NaN (Optuna marks the trial failed); a single run
still raises, so the process exits non-zero. Either way the W&B run is finished, so the next job
of the sweep opens its own run instead of appending to this one.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Callable

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from dpo_lightning.run.rundir import release_run_dirs

log = logging.getLogger("dpo_lightning")

#: Set once by the launching process and inherited by every job it starts (DDP ranks, submitit
#: subprocesses, SLURM jobs export the environment): the W&B group and sweep dir of one
#: invocation. ``${now:}`` cannot do this: each submitit job resolves it again, seconds apart.
LAUNCH_ID_ENV = "DPO_LIGHTNING_LAUNCH_ID"


def mark_launch() -> str:
    """The launch id (a timestamp), created by the first process of an invocation."""
    return os.environ.setdefault(LAUNCH_ID_ENV, time.strftime("%Y-%m-%d_%H-%M-%S"))


def is_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def finish_wandb(exit_code: int = 0) -> None:
    """Close the W&B run of this job, if one was opened (no-op without wandb)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=exit_code)


def close_process_group() -> None:
    """Destroy the default process group, if any: one left to the interpreter's exit can abort
    the process in torch's C++ teardown ("terminate called without an active exception", seen on
    a torchrun worker with gloo), which torchrun counts as a failed worker."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def run_job(train: Callable[[DictConfig], float | None], cfg: DictConfig) -> float | None:
    """``train(cfg)``; in a multirun a failure is logged and returns NaN instead of raising.
    The job's run directory is unlocked at its end (the next job of a sweep may run in this
    process)."""
    try:
        value = train(cfg)
        close_process_group()
    except Exception:
        finish_wandb(exit_code=1)
        if not is_multirun():
            raise
        log.exception("job %s failed; the sweep goes on", HydraConfig.get().job.num)
        return math.nan
    finally:
        release_run_dirs()
    finish_wandb()
    return value
