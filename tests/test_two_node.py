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

import json
import os
import socket
import subprocess
import sys
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(run_dir: Path, data: str, faults_on_node1: str | None = None, max_restarts: int = 0):
    """Start both agents, wait for both; returns each node's (exit code, log)."""
    port = _free_port()
    procs = []
    for node in (0, 1):
        env = {**os.environ, **ENV, "WANDB_DIR": str(run_dir.parent / "wandb")}
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
        log = open(run_dir.parent / f"node{node}.log", "w")  # noqa: SIM115 (closed below)
        procs.append((subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    results = []
    try:
        for proc, log in procs:
            proc.wait(timeout=400)
            log.close()
    finally:
        for proc, _ in procs:
            proc.kill()
    for node, (proc, _) in enumerate(procs):
        results.append((proc.returncode, (run_dir.parent / f"node{node}.log").read_text()))
    logs = "\n".join(f"--- node {n} ({rc}):\n{out[-6000:]}" for n, (rc, out) in enumerate(results))
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
    assert logs.count(": resuming from ") >= 2, logs[-4000:]  # both workers resumed
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"].endswith("last.ckpt") and summary["steps"] == 5
    uninterrupted, restarted = _weights(two_nodes), _weights(run_dir)
    for name, w in uninterrupted.items():
        assert torch.equal(restarted[name], w), f"{name} differs after the elastic restart"
    label = "two nodes, killed + restarted vs 1 process × batch 8"
    diff = _assert_same_weights(single("dpo"), run_dir, label)
    assert diff < 1e-5
