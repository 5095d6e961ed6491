"""Equivalence across device counts, for every stage, through the CLI (multi-process runs never
inside pytest).

One epoch of 38 training pairs: 1 process with batch 8 against 2 processes (DDP, FSDP2) with
batch 4 each, and against gradient accumulation (2 micro-batches per step), same seed, for
``stage=dpo``, ``stage=sft`` and the reward model. They must agree because
- every loss is normalised over the global batch (``PolicyModule.reduce_loss``): pairs for DPO
  and the reward model, completion tokens for SFT (whose per-rank counts differ: the per-rank
  token means this replaced left the SFT weights 1.4e-3 apart);
- the 1-process sampler draws the permutation Lightning's DistributedSampler draws and rank r
  takes its entries r::2, so global batch k is the same set of pairs in every run;
- dropout is off, gradients are clipped on the global norm, the split is seeded.
What remains is float reduction order (≤ 2e-6 after 5 AdamW steps at lr 3e-4 here; the measured
maximum weight differences are printed: run with ``-s``).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

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
#: stage -> (overrides, per-step metrics compared across runs, the class its hf_model/ loads as)
STAGES = {
    "dpo": (
        [],
        ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "grad_norm"),
        AutoModelForCausalLM,
    ),
    "sft": (["stage=sft"], ("loss", "ppl", "grad_norm"), AutoModelForCausalLM),
    "reward_model": (
        ["experiment=reward_model"],
        ("loss", "rewards/accuracies", "rewards/margins", "grad_norm"),
        AutoModelForSequenceClassification,
    ),
}
#: Weights of runs that must be equal: measured ≤ 2e-6 (float reduction order), far below one
#: AdamW step (lr 3e-4 moves a weight by ~3e-4); per-rank means missed by 1.4e-3 (SFT, DDP), the
#: per-micro-batch mean of the short last accumulation step by 2.6e-5 (reward model).
WEIGHT_TOL = {"atol": 1e-5, "rtol": 1e-5}


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
def single(tmp_path_factory, data_arg):
    """``single(stage)``: the run dir of 1 process with batch 8 (run once per stage)."""
    runs: dict[str, Path] = {}

    def get(stage: str) -> Path:
        if stage not in runs:
            args = ["trainer=cpu", "data.batch_size=8", data_arg, *STAGES[stage][0]]
            runs[stage] = _run(tmp_path_factory.mktemp(f"single_{stage}"), "one", args)
        return runs[stage]

    return get


def _train_rows(run_dir: Path, tracked: tuple[str, ...]) -> dict[int, dict[str, float]]:
    rows = {}
    for row in csv.DictReader((run_dir / "csv" / "metrics.csv").open()):
        if row.get("train/loss"):
            rows[int(row["step"])] = {k: float(row[f"train/{k}"]) for k in tracked if row.get(f"train/{k}")}
    return rows


def _pair_ids(run_dir: Path, rank: int) -> list[list[int]]:
    return json.loads((run_dir / "pair_ids" / f"rank{rank}.json").read_text())


def _assert_same_weights(one: Path, other: Path, label: str) -> float:
    """The exported weights agree to float tolerance; prints and returns the max abs difference."""
    w1 = load_file(one / "hf_model" / "model.safetensors")
    w2 = load_file(other / "hf_model" / "model.safetensors")
    assert w1.keys() == w2.keys()
    diff = max((w2[k] - w1[k]).abs().max().item() for k in w1)
    print(f"\n[equivalence] {label}: max |Δw| = {diff:.3g}")
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], **WEIGHT_TOL, msg=lambda m, k=key: f"{label} {k}: {m}")
    return diff


@pytest.mark.parametrize("preset", ["ddp_cpu", "fsdp_cpu"])
@pytest.mark.parametrize("stage", list(STAGES))
def test_two_processes_match_one_process_with_twice_the_batch(stage, preset, single, data_arg, tmp_path):
    overrides, tracked, auto_class = STAGES[stage]
    one = single(stage)
    multi = _run(tmp_path, preset, [f"trainer={preset}", "data.batch_size=4", data_arg, *overrides])

    # Data: each global batch is the same set of pairs; no duplicates or gaps over the epoch.
    b1, r0, r1 = _pair_ids(one, 0), _pair_ids(multi, 0), _pair_ids(multi, 1)
    assert len(b1) == len(r0) == len(r1) == 5
    for k in range(5):
        assert sorted(r0[k] + r1[k]) == sorted(b1[k]), f"step {k}"
    seen = [i for rank in (r0, r1) for batch in rank for i in batch]
    assert len(seen) == len(set(seen)) == 38
    assert set(seen) == {i for batch in b1 for i in batch}

    _assert_same_weights(one, multi, f"{stage} × {preset}")
    s1 = json.loads((one / "summary.json").read_text())
    s2 = json.loads((multi / "summary.json").read_text())
    if stage == "dpo":
        assert s1["train"]["loss"] != pytest.approx(0.6931, abs=1e-3)  # policy moved off the reference

    # Metrics: the logged values are those of the global batch, step by step (the loss is the
    # global mean, not a mean of per-rank means); counts are summed over ranks.
    m1, m2 = _train_rows(one, tracked), _train_rows(multi, tracked)
    assert m1.keys() == m2.keys() == set(range(5))
    for step in m1:
        for key in tracked:
            assert m2[step][key] == pytest.approx(m1[step][key], rel=1e-5, abs=1e-4), (step, key)
    assert s2["pairs_trained"] == s1["pairs_trained"] == 38
    assert s2["steps"] == s1["steps"] == 5

    # The export is a loadable HF model of the stage's class (re-assembled from the FSDP2 shards).
    model = auto_class.from_pretrained(multi / "hf_model")
    out = model(torch.tensor([[1, 2, 3]])).logits
    expected = 1 if auto_class is AutoModelForSequenceClassification else model.config.vocab_size
    assert out.shape[-1] == expected


@pytest.mark.parametrize(
    ("stage", "preset", "batch"),
    [("sft", "fsdp_cpu", 2), ("reward_model", "cpu", 4)],
)
def test_gradient_accumulation_matches_the_larger_batch(stage, preset, batch, single, data_arg, tmp_path):
    """``accumulate_grad_batches=2`` equals a batch twice as large exactly, also when the two
    micro-batches hold different counts: SFT tokens always; the last step's pairs (4 + 2) for all.
    SFT runs it on 2 FSDP2 ranks too (the gradient rescale acts on sharded DTensor gradients)."""
    accumulated = _run(
        tmp_path,
        f"{stage}_{preset}_accumulate",
        [
            f"trainer={preset}",
            f"data.batch_size={batch}",
            "trainer.accumulate_grad_batches=2",
            "trainer.val_check_interval=10",
            data_arg,
            *STAGES[stage][0],
        ],
    )
    one = single(stage)
    ranks = 1 if preset == "cpu" else 2
    micro = [_pair_ids(accumulated, r) for r in range(ranks)]
    steps = [sorted(i for rank in micro for b in rank[2 * k : 2 * k + 2] for i in b) for k in range(5)]
    assert steps == [sorted(b) for b in _pair_ids(one, 0)]
    assert [sum(len(rank[k]) for rank in micro) for k in (8, 9)] == [4, 2]  # the last step: 4 + 2
    assert json.loads((accumulated / "summary.json").read_text())["steps"] == 5
    _assert_same_weights(one, accumulated, f"{stage} × {preset} × accumulate 2")


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
