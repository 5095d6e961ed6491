"""A job restarted by its scheduler continues its run directory, with the usual resume checks.

A SLURM job requeued after pre-emption (:mod:`dpo_lightning.run.preemption`) or a torchrun job
restarted after a worker died starts again with the same command line, which has no
``resume=true``. :func:`resume_if_restarted` sets it when such a restart is detected **and** the
run directory holds ``checkpoints/last.ckpt``; preflight then checks that checkpoint exactly as
for ``resume=true`` (ours, this version, the same config) and refuses it in one line otherwise.
Without a checkpoint yet (killed before the first one) the run starts over.

Detected restarts:

- SLURM: ``SLURM_RESTART_COUNT`` > 0 (SLURM sets it on every requeued start of a job).
- torchrun: ``TORCHELASTIC_RESTART_COUNT`` > 0 (restarts after a failure of this node's
  workers), or a worker of this torchrun agent already started this run (its marker in
  ``<run dir>/.elastic/``): when another node fails, torchrun stops the healthy node's workers and
  starts them again *without* counting a restart (a membership change), and those workers must
  resume like the others. An agent is told apart by its process id (the workers' parent), so a
  new ``torchrun`` on the same run directory is a new start, not a restart.

The run directory must be shared by every node (the checkpoint is read by all ranks).

Start torchrun with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` for its restarts to reconnect
reliably: with the c10d rendezvous, torch (2.4 to 2.13 at least) gives the workers one
TCPStore server for the agent's whole life, so restarted workers find the keys of the previous
attempt and a rank can read its peer's old address before the peer writes the new one (gloo:
"Connection refused" in ``connectFullMesh``; NCCL: the old unique id; pytorch/pytorch#135712).
The variable gives every rendezvous round a fresh store. A job that can restart without it is
warned at its start (:func:`shared_store_warning`).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from omegaconf import DictConfig, open_dict

from dpo_lightning.run.resume import is_sharded_checkpoint

#: Restart counters set by schedulers and launchers, with what they mean.
RESTART_COUNTERS = {
    "SLURM_RESTART_COUNT": "SLURM requeue",
    "TORCHELASTIC_RESTART_COUNT": "torchrun restart",
}


def restart_counted(env: dict[str, str] | None = None) -> str | None:
    """``"SLURM requeue 1"``-style description of a restart counter above 0, or None."""
    env = os.environ if env is None else env
    for var, what in RESTART_COUNTERS.items():
        count = env.get(var, "").strip()
        if count.isdigit() and int(count) > 0:
            return f"{what} {count} ({var}={count})"
    return None


def elastic_marker(run_dir: Path, env: dict[str, str] | None = None) -> Path | None:
    """This torchrun worker's marker file (one per agent and local rank), or None outside torchrun."""
    env = os.environ if env is None else env
    run_id = env.get("TORCHELASTIC_RUN_ID")
    if not run_id:
        return None
    agent = f"{socket.gethostname()}-{os.getppid()}-{env.get('LOCAL_RANK', '0')}"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{run_id}-{agent}")
    return run_dir / ".elastic" / safe


def detected_restart(run_dir: Path, env: dict[str, str] | None = None) -> str | None:
    """Why this start is a restart of the run in ``run_dir`` (see the module docstring), or None.

    Leaves this torchrun worker's marker behind, so the next start of its agent's workers is
    recognised as a restart.
    """
    counted = restart_counted(env)
    marker = elastic_marker(run_dir, env)
    if marker is None:
        return counted
    seen = marker.exists()
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    return counted or ("torchrun restart (this agent's workers started this run before)" if seen else None)


def shared_store_warning(env: dict[str, str] | None = None) -> str | None:
    """The warning for a torchrun job that can restart while its workers share the agent's
    TCPStore (module docstring), or None."""
    env = os.environ if env is None else env
    restarts = env.get("TORCHELASTIC_MAX_RESTARTS", "").strip()
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or not (restarts.isdigit() and int(restarts) > 0):
        return None
    return (
        f"[dpo_lightning] warning: torchrun --max-restarts {restarts} shares its rendezvous TCPStore "
        "with the workers (TORCHELASTIC_USE_AGENT_STORE=True): restarted workers can read the "
        "previous attempt's addresses and fail to connect (pytorch/pytorch#135712); start torchrun "
        "with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 on every node"
    )


def resume_if_restarted(cfg: DictConfig) -> str | None:
    """Set ``resume=true`` on a detected restart with a checkpoint to continue from (see the
    module docstring); returns the reason, or None when nothing changed. Prints
    :func:`shared_store_warning` once per node (local rank 0)."""
    warning = shared_store_warning()
    if warning and os.environ.get("LOCAL_RANK", "0") == "0":
        print(warning, flush=True)
    if cfg.get("resume") or cfg.get("ckpt_path"):
        return None
    run_dir = Path(cfg.paths.output_dir)
    why = detected_restart(run_dir)
    if why is None:
        return None
    last = run_dir / "checkpoints" / "last.ckpt"
    if not (last.is_file() or is_sharded_checkpoint(last)):
        print(f"[dpo_lightning] {why}, but {last} does not exist yet: starting the run over", flush=True)
        return None
    with open_dict(cfg):
        cfg.resume = True
    print(f"[dpo_lightning] {why}: resuming from {last}", flush=True)
    return why
