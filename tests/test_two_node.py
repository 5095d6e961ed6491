"""A real two-node launch on one machine: two ``torchrun`` agents meeting at a c10d rendezvous.

Each agent is what one node of a cluster runs (``--nnodes 2 --nproc-per-node 1``); they find
each other through the c10d store on 127.0.0.1 (hosted by node 0: ``is_host``), and Lightning
reads the ranks from torchrun's environment (``TorchElasticEnvironment``). Two nodes × batch 4
must train the weights of one process × batch 8 (as in ``tests/test_distributed_cli.py``), and
with ``--max-restarts 1`` a worker SIGKILLed mid-run is restarted by its agent, the other
node's worker is restarted with it, and both resume from the run's last checkpoint by
themselves (no ``resume=true``), ending bit-identical to the uninterrupted two-node run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, _fault_overrides
from tests.test_distributed_cli import COMMON, ENV, _assert_same_weights, _pair_ids, data_arg, single
from tests.test_resume import _weights

pytestmark = pytest.mark.slow
__all__ = ["data_arg", "single"]  # fixtures shared with test_distributed_cli

#: COMMON with a checkpoint every 2 steps (the kill lands after the first one).
ARGS = [
    *[a for a in COMMON if "checkpoint" not in a],
    "callbacks.checkpoint.every_n_train_steps=2",
    "trainer=ddp_cpu",
    "trainer.devices=1",
    "trainer.num_nodes=2",
    "data.batch_size=4",
]


#: What the test waits for both agents (a restart included) before it kills them and fails.
TIMEOUT_S = 400
#: torch 2.13's c10d rendezvous shares one TCPStore server with the workers for the agent's
#: whole life (pytorch/pytorch#135712): after a restart the workers find the previous attempt's
#: keys, and a rank may read its peer's old gloo address before the peer writes the new one
#: ("Connection refused" in ``connectFullMesh``, or both ranks hung in process-group init:
#: 4 of 6 restarts here without it, 0 of 6 with it). Opting out gives every round a fresh
#: store, hosted by rank 0's worker. Documented in the README and ``dpo_lightning.run.restarts``.
AGENT_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes() -> dict[int, tuple[int, str]]:
    """``{pid: (parent pid, start time)}`` of every process (from ``/proc``)."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()  # after "pid (comm)"
        except OSError:  # gone meanwhile
            continue
        out[int(stat.parent.name)] = (int(fields[1]), fields[19])  # stat fields 4 and 22
    return out


def _below(roots: set[int], seen: dict[int, str]) -> dict[int, str]:
    """``seen`` plus ``roots`` and their live descendants, as ``{pid: start time}`` (a pid reused
    by another process later is never taken for one of them)."""
    procs, children = _processes(), {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = dict(seen), [r for r in roots if r in procs]
    while todo:
        pid = todo.pop()
        out[pid] = procs[pid][1]
        todo += children.get(pid, [])
    return out


def _kill_all(roots: set[int], seen: dict[int, str]) -> None:
    """SIGKILL the agents still running, their descendants and every process seen below them
    earlier. torchrun starts each worker in a session of its own and a worker outlives a dead
    agent (re-parented), so neither the agents' process groups nor their current trees are
    enough. The tree is stopped first: nothing forks or re-parents while it is collected."""
    stopped: set[int] = set()
    for _ in range(3):  # a child forked before its parent stopped is found on the next pass
        seen = _below(roots, seen)
        procs = _processes()
        found = {p for p, t in seen.items() if p in procs and procs[p][1] == t} - stopped
        if not found:
            break
        for pid in found:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        stopped |= found
    for pid in stopped:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _two_nodes(run_dir: Path, data: str, faults_on_node1: str | None = None, max_restarts: int = 0):
    """Start both agents, wait for both; returns each node's (exit code, log).

    Bounded: an agent that fails for good ends the wait at once (the other cannot finish
    without it: it would wait in a rendezvous or a collective), and so does :data:`TIMEOUT_S`;
    every process of both agents is killed before the logs are read.
    """
    port = _free_port()
    procs = []
    for node in (0, 1):
        env = {**os.environ, **ENV, **AGENT_ENV, "WANDB_DIR": str(run_dir.parent / "wandb")}
        if node == 1 and faults_on_node1:
            env["DPO_LIGHTNING_FAULTS"] = faults_on_node1
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=2",
            "--nproc-per-node=1",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}",
            f"--rdzv-conf=is_host={int(node == 0)}",
            "--rdzv-id=dpo-two-node",
            f"--max-restarts={max_restarts}",
            "--monitor-interval=0.5",
            "-m",
            "dpo_lightning.train",
            f"hydra.run.dir={run_dir}",
            *ARGS,
            data,
            *_fault_overrides(env),
        ]
        with open(run_dir.parent / f"node{node}.log", "w") as log:  # the child keeps its own copy
            procs.append(
                subprocess.Popen(
                    cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            )
    deadline, start = time.monotonic() + TIMEOUT_S, time.monotonic()
    seen: dict[int, str] = {}
    try:
        while time.monotonic() < deadline:
            codes = [p.poll() for p in procs]  # every agent's, each time
            if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
                break
            seen = _below({p.pid for p, c in zip(procs, codes, strict=True) if c is None}, seen)
            time.sleep(0.5)
    finally:
        _kill_all({p.pid for p in procs if p.poll() is None}, seen)
        for proc in procs:
            proc.wait()
    waited = time.monotonic() - start
    results = [
        (proc.returncode, (run_dir.parent / f"node{n}.log").read_text()) for n, proc in enumerate(procs)
    ]
    logs = "\n".join(f"--- node {n} ({rc}):\n{out[-6000:]}" for n, (rc, out) in enumerate(results))
    assert waited < TIMEOUT_S, f"the two agents were still running after {TIMEOUT_S} s (killed):\n{logs}"
    assert all(rc == 0 for rc, _ in results), logs
    return results


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory, data_arg) -> Path:
    run_dir = tmp_path_factory.mktemp("two_nodes") / "run"
    _two_nodes(run_dir, data_arg)
    return run_dir


def test_two_torchrun_nodes_match_one_process_with_twice_the_batch(two_nodes, single):
    one = single("dpo")
    b1, r0, r1 = _pair_ids(one, 0), _pair_ids(two_nodes, 0), _pair_ids(two_nodes, 1)
    for k in range(5):  # each global batch is the same set of pairs
        assert sorted(r0[k] + r1[k]) == sorted(b1[k]), f"step {k}"
    diff = _assert_same_weights(one, two_nodes, "two torchrun nodes × batch 4 vs 1 process × batch 8")
    assert diff < 1e-5
    summary = json.loads((two_nodes / "summary.json").read_text())
    assert summary["steps"] == 5 and summary["pairs_trained"] == 38


def test_killed_worker_restarts_and_resumes_by_itself(tmp_path, two_nodes, single, data_arg):
    """Node 1's worker SIGKILLs itself at the start of step 4 (after the step-2 checkpoint);
    torchrun restarts the workers of both nodes, which resume from checkpoints/last.ckpt."""
    run_dir = tmp_path / "run"
    (_, log0), (_, log1) = _two_nodes(run_dir, data_arg, faults_on_node1="kill@3", max_restarts=1)
    logs = log0 + log1
    assert "failed (exitcode: -9)" in logs, logs[-4000:]  # the kill happened
    assert "shares its rendezvous TCPStore" not in logs  # AGENT_ENV reached the agents
    assert logs.count(": resuming from ") >= 2, logs[-4000:]  # both workers resumed
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"].endswith("last.ckpt") and summary["steps"] == 5
    uninterrupted, restarted = _weights(two_nodes), _weights(run_dir)
    for name, w in uninterrupted.items():
        assert torch.equal(restarted[name], w), f"{name} differs after the elastic restart"
    label = "two nodes, killed + restarted vs 1 process × batch 8"
    diff = _assert_same_weights(single("dpo"), run_dir, label)
    assert diff < 1e-5
