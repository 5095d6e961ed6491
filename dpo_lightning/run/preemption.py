"""Pre-emption and time limits: finish the step, checkpoint, requeue on SLURM, exit.

Clusters stop jobs from outside. SLURM sends the ``--signal`` a job asked for before its time
limit (``#SBATCH --signal=USR1@120``; submitit, behind ``launcher=slurm``, asks for USR2) and
SIGTERM when it pre-empts or cancels it; Kubernetes sends SIGTERM before evicting a pod; the
agent of a torchrun job SIGTERMs its workers. :class:`Preemption` turns any of ``preemption.signals``
into: finish the optimizer step in flight, write ``checkpoints/last.ckpt`` through the run's own
checkpoint I/O (atomic; config, version, RNG states and data-loader position included, exactly
what a periodic checkpoint holds), run ``scontrol requeue <job id>`` on rank 0 for a
``preemption.requeue_on`` signal under SLURM, let the step's metrics reach the loggers (and a
validation due at that step run, as the resumed run skips it), and exit with status
128 + the signal number.
The restarted job resumes by itself, through the usual checks: :mod:`dpo_lightning.run.restarts`.

Why not Lightning's ``SLURMEnvironment(auto_requeue=True)`` (Lightning 2.6): its handler saves an
``hpc_ckpt_<n>.ckpt`` from inside the signal handler, i.e. in the middle of a step (the weights and
the data-loader position can then disagree, and under DDP the save's collectives can interleave
with the step's), and the next start loads that file whatever ``ckpt_path`` says, skipping the
config, version and metric-history checks of :mod:`dpo_lightning.run.resume`. Here the handler
only records the signal; at the next step boundary the ranks agree on it with one all-reduce of
a small integer (Lightning broadcasts a SIGTERM flag every batch already) and act together.
Installing our handler before Lightning registers its own also keeps Lightning's requeue handler
(and so any ``hpc_ckpt``) out of the run.

SIGTERM does not requeue by default: SLURM requeues a pre-empted job itself when its partition
says so, and a ``scancel`` must not bring the job back.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch

from dpo_lightning.run.errors import SettingError

#: What the ranks agree on at a step boundary (the largest code of any rank wins).
NONE, STOP, REQUEUE = 0, 1, 2


class Preempted(SystemExit):
    """Raised once the pre-emption checkpoint is written: the process exits with ``code``
    (128 + signal number, the shell's convention for "stopped by that signal")."""


def signal_number(name: str | int) -> int:
    """``"SIGUSR1"`` / ``"USR1"`` / ``10`` -> the signal number (a clear error for a typo)."""
    if isinstance(name, int):
        return int(signal.Signals(name))
    key = str(name).upper()
    key = key if key.startswith("SIG") else f"SIG{key}"
    try:
        return int(signal.Signals[key])
    except KeyError:
        allowed = "a signal name (e.g. SIGUSR1, SIGUSR2, SIGTERM)"
        raise SettingError("preemption.signals", name, allowed) from None


#: Signals no process can catch: a handler for them cannot be installed.
UNCATCHABLE = {signal.SIGKILL, signal.SIGSTOP}


def check_preemption(signals: Any, requeue_on: Any) -> tuple[list[int], set[int]]:
    """The signal numbers of ``signals`` and ``requeue_on`` (a subset of them), or a one-line
    :class:`SettingError` (run by ``check_settings`` before any work, and by :class:`Preemption`)."""
    for key, value in (("preemption.signals", signals), ("preemption.requeue_on", requeue_on)):
        if not isinstance(value, list | tuple):
            raise SettingError(key, value, "a list of signal names, e.g. [SIGUSR1, SIGTERM] ([] for none)")
    numbers = [signal_number(s) for s in signals]
    caught = [signal.Signals(n).name for n in numbers if n in UNCATCHABLE]
    if caught:
        allowed = "signals a process can catch (not SIGKILL / SIGSTOP)"
        raise SettingError("preemption.signals", caught, allowed)
    requeue = set()
    for name in requeue_on:
        try:
            requeue.add(signal_number(name))
        except SettingError as err:
            raise err.at("preemption.requeue_on") from None
    unknown = requeue - set(numbers)
    if unknown:
        names = sorted(signal.Signals(s).name for s in unknown)
        raise SettingError("preemption.requeue_on", names, "signals also listed in preemption.signals")
    return numbers, requeue


def slurm_job_id(env: dict[str, str] | None = None) -> str | None:
    """The id ``scontrol requeue`` takes: ``<array job>_<task>`` for an array task, else the job's."""
    env = os.environ if env is None else env
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        job = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    else:
        job = env.get("SLURM_JOB_ID")
    return job if job and re.fullmatch(r"[0-9_]+", job) else None


def requeue_slurm_job(job_id: str) -> bool:
    """``scontrol requeue <job_id>``; whether it succeeded (a failure is reported, not raised:
    the checkpoint is written and the job can be resubmitted by hand)."""
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        print(f"[dpo_lightning] scontrol requeue {job_id} failed: {err}", file=sys.stderr, flush=True)
        return False
    if result.returncode != 0:
        print(
            f"[dpo_lightning] scontrol requeue {job_id} failed ({result.returncode}): "
            f"{(result.stderr or result.stdout).strip()[:300]}",
            file=sys.stderr,
            flush=True,
        )
    return result.returncode == 0


class Preemption(L.Callback):
    """Checkpoint at the next optimizer step after a signal, requeue on SLURM, then exit.

    Args:
        dirpath: the run's checkpoint folder (``last.ckpt`` is written there, where
            ``resume=true`` and the restart detection look).
        signals: signals caught during training (names or numbers).
        requeue_on: those of ``signals`` after which a SLURM job is requeued.
    """

    def __init__(
        self,
        dirpath: str | Path,
        signals: list[str | int] = ("SIGUSR1", "SIGUSR2", "SIGTERM"),
        requeue_on: list[str | int] = ("SIGUSR1", "SIGUSR2"),
    ) -> None:
        self.dirpath = Path(dirpath)
        self.signals, self.requeue_on = check_preemption(signals, requeue_on)
        self.received: int | None = None
        self._active = False
        self._previous: dict[int, Any] = {}  # the handlers found before ours
        self._step_seen: int | None = None
        self._exit_code: int | None = None  # set once the pre-emption checkpoint is written

    # -- handlers: record only; nothing else is safe inside a signal handler ----------------
    def _on_signal(self, signum: int, frame: Any) -> None:
        if not self._active:  # left installed by Lightning's teardown: behave like before us
            previous = self._previous.get(signum, signal.SIG_DFL)
            signal.signal(signum, previous)
            if callable(previous):
                previous(signum, frame)
            else:
                os.kill(os.getpid(), signum)
            return
        if self.received is None or signum in self.requeue_on:
            self.received = signum

    def _install(self) -> None:
        self._active = True
        for signum in self.signals:
            previous = signal.signal(signum, self._on_signal)
            if previous != self._on_signal:
                self._previous.setdefault(signum, signal.SIG_DFL if previous is None else previous)

    # Before Lightning registers its handlers (it then leaves a signal that has one alone, so its
    # SLURM requeue handler is never installed); again when training starts, because Lightning
    # wraps an existing SIGTERM handler into its own.
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._install()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install()
        self._step_seen = trainer.global_step

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()

    # Lightning skips teardown hooks when fit raises (our Preempted too), and its own teardown
    # then puts back the handlers it found, ours included: the inactive handler passes signals on.
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, err: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        self._active = False
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)

    # -- at the step boundary ---------------------------------------------------------------
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self._step_seen:  # inside a gradient-accumulation window
            return
        self._step_seen = trainer.global_step
        mine = NONE if self.received is None else REQUEUE if self.received in self.requeue_on else STOP
        code = torch.tensor([mine], device=trainer.strategy.root_device)
        agreed = int(trainer.strategy.reduce(code, reduce_op="max").item())
        if agreed == NONE:
            return
        path = self.dirpath / "last.ckpt"
        trainer.save_checkpoint(path)  # collective; returns once every rank's part is written
        job = slurm_job_id()
        requeued = bool(agreed == REQUEUE and job and trainer.is_global_zero and requeue_slurm_job(job))
        signum = self.received or signal.SIGTERM  # a rank that got nothing exits like its peers
        if trainer.is_global_zero:
            then = f"; requeued SLURM job {job}" if requeued else ""
            print(
                f"[dpo_lightning] pre-empted ({signal.Signals(signum).name}) after step "
                f"{trainer.global_step}: wrote {path}{then}; the restarted job resumes from it",
                file=sys.stderr,
                flush=True,
            )
        # Lightning still logs this step's metrics and runs a validation due now (a run resumed
        # from a checkpoint written here skips both); the exit comes at the next batch (or epoch
        # end). Not ``trainer.should_stop``: Lightning validates whenever it stops early, so a
        # validation nobody scheduled would enter the metric history the resumed run continues.
        self._exit_code = 128 + signum

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._exit_if_stopped(trainer)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._exit_if_stopped(trainer)  # the first batch after the pre-emption checkpoint

    def _exit_if_stopped(self, trainer: L.Trainer) -> None:
        if self._exit_code is not None:
            for logger in trainer.loggers:
                logger.save()
            raise Preempted(self._exit_code)
