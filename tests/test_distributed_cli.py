"""Equivalence across device counts, through the CLI (multi-process runs never inside pytest).

One epoch of 38 training pairs: 1 process with batch 8 against 2 processes (DDP, FSDP2) with
batch 4 each, same seed. They must agree because
- the loss is a mean over pairs and both ranks hold equally many pairs in every step (the last
  step has 3 + 3), so the average of per-rank gradient means is the global-batch mean;
- the 1-process sampler draws the permutation Lightning's DistributedSampler draws and rank r
  takes its entries r::2, so global batch k is the same set of pairs in both runs;
- dropout is off, gradients are clipped on the global norm, the split is seeded.
What remains is float reduction order (~1e-5 after 5 AdamW steps at lr 1e-3 here).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_cli

pytestmark = pytest.mark.slow

COMMON = [
    "debug=[fast,pair_ids]",
    "data=file",
    "data.max_length=64",
    "trainer.max_steps=5",
    "trainer.val_check_interval=5",
    "trainer.log_every_n_steps=1",
    "optim.optimizer.lr=3e-4",
    "optim.scheduler.num_warmup_steps=0",
    "callbacks.checkpoint=null",
    "callbacks.progress_bar=null",
    "+trainer.enable_checkpointing=false",
]
ENV = {"OMP_NUM_THREADS": "1"}
TRACKED = ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "grad_norm")


def _run(tmp_path: Path, name: str, args: list[str]) -> Path:
    run_dir = tmp_path / name
    run_cli([f"hydra.run.dir={run_dir}", *COMMON, *args], tmp_path, timeout=400, env=ENV)
    return run_dir


@pytest.fixture(scope="module")
def data_arg(tmp_path_factory) -> str:
    """40 sentiment pairs, half of them flipped at random: contradictory preferences keep
    ``rewards/accuracies`` away from 0 and 1, so its cross-rank average is really tested.
    38 train pairs: 5 steps of 8 (the last of 6) = exactly one epoch."""
    from dpo_lightning.data.synthetic import sentiment_pairs

    g = torch.Generator().manual_seed(0)
    rows = []
    for row, flip in zip(sentiment_pairs(n=40, seed=0), torch.rand(40, generator=g) < 0.5, strict=True):
        if flip:
            row = {**row, "chosen": row["rejected"], "rejected": row["chosen"]}
        rows.append(json.dumps(row))
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return f"data.path={path}"


@pytest.fixture(scope="module")
def single(tmp_path_factory, data_arg) -> Path:
    args = ["trainer=cpu", "data.batch_size=8", data_arg]
    return _run(tmp_path_factory.mktemp("single"), "one", args)


def _train_rows(run_dir: Path) -> dict[int, dict[str, float]]:
    rows = {}
    for row in csv.DictReader((run_dir / "csv" / "metrics.csv").open()):
        if row.get("train/loss"):
            rows[int(row["step"])] = {k: float(row[f"train/{k}"]) for k in TRACKED if row.get(f"train/{k}")}
    return rows


def _pair_ids(run_dir: Path, rank: int) -> list[list[int]]:
    return json.loads((run_dir / "pair_ids" / f"rank{rank}.json").read_text())


@pytest.mark.parametrize("preset", ["ddp_cpu", "fsdp_cpu"])
def test_two_processes_match_one_process_with_twice_the_batch(preset, single, data_arg, tmp_path):
    multi = _run(tmp_path, preset, [f"trainer={preset}", "data.batch_size=4", data_arg])

    # Data: each global batch is the same set of pairs; no duplicates or gaps over the epoch.
    one, r0, r1 = _pair_ids(single, 0), _pair_ids(multi, 0), _pair_ids(multi, 1)
    assert len(one) == len(r0) == len(r1) == 5
    for k in range(5):
        assert sorted(r0[k] + r1[k]) == sorted(one[k]), f"step {k}"
        assert len(r0[k]) == len(r1[k])  # equal per-rank sizes: mean of means == global mean
    seen = [i for rank in (r0, r1) for batch in rank for i in batch]
    assert len(seen) == len(set(seen)) == 38
    assert set(seen) == {i for batch in one for i in batch}

    # Weights: the exported models agree to float tolerance, and training moved them far more.
    w1 = load_file(single / "hf_model" / "model.safetensors")
    w2 = load_file(multi / "hf_model" / "model.safetensors")
    assert w1.keys() == w2.keys()
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], atol=5e-5, rtol=1e-4, msg=key)
    s1 = json.loads((single / "summary.json").read_text())
    s2 = json.loads((multi / "summary.json").read_text())
    assert s1["train"]["loss"] != pytest.approx(0.6931, abs=1e-3)  # policy moved off the reference

    # Metrics: rank-averaged values equal the 1-process values on the same global batch, step
    # by step; counts are summed over ranks.
    m1, m2 = _train_rows(single), _train_rows(multi)
    assert m1.keys() == m2.keys() == set(range(5))
    assert any(0 < m1[k]["rewards/accuracies"] < 1 for k in m1)  # a real average, not 0 or 1
    for step in m1:
        for key in TRACKED:
            assert m2[step][key] == pytest.approx(m1[step][key], abs=1e-4), (step, key)
    assert s2["pairs_trained"] == s1["pairs_trained"] == 38
    assert s2["steps"] == s1["steps"] == 5

    # The export is a loadable HF model (re-assembled from the shards under FSDP2).
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(multi / "hf_model")
    assert model(torch.tensor([[1, 2, 3]])).logits.shape[-1] == model.config.vocab_size


def test_fsdp2_sharded_checkpoint_resumes_with_activation_checkpointing(tmp_path):
    """Sharded checkpoint (one file per rank, reference included), then resume from it."""
    args = [
        "trainer=fsdp_cpu",
        "debug=fast",
        "data.generator.n=200",
        "data.batch_size=4",
        "callbacks.progress_bar=null",
        "trainer.strategy.activation_checkpointing=true",
    ]
    first = tmp_path / "first"
    run_cli([f"hydra.run.dir={first}", *args, "trainer.max_steps=2"], tmp_path, timeout=400, env=ENV)
    ckpt = first / "checkpoints" / "last.ckpt"
    assert ckpt.is_dir() and len(list(ckpt.glob("*.distcp"))) == 2
    resumed = tmp_path / "resumed"
    proc = run_cli(
        [f"hydra.run.dir={resumed}", *args, "trainer.max_steps=3", f"ckpt_path={ckpt}"],
        tmp_path,
        timeout=400,
        env=ENV,
    )
    assert "Restored all states" in proc.stdout + proc.stderr
    assert json.loads((resumed / "summary.json").read_text())["steps"] == 3
