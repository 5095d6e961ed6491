"""Reference strategies through the CLI: ``reference=model`` on one device (with the policy or on
the CPU), checkpoints without the reference, resume, FSDP2 (sharded, or offloaded to CPU memory);
``reference=precomputed`` shared by the padded and packed engines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests import test_distributed_cli as distributed
from tests.conftest import run_cli
from tests.test_distributed_cli import COMMON, ENV, STAGES, _train_rows

TRACKED = STAGES["dpo"][1]  # the per-step DPO metrics compared across runs

pytestmark = pytest.mark.slow
data_arg = distributed.data_arg  # the 40-pair file those equivalence tests use (a fixture)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """``policy/`` and ``sft/``: two tiny Llamas (other seeds) saved with the default tokenizer."""
    from dpo_lightning.models.tokenizers import offline_sentiment_tokenizer
    from tests.conftest import make_tiny_model

    root = tmp_path_factory.mktemp("checkpoints")
    tokenizer = offline_sentiment_tokenizer()  # model=tiny's: the data's texts tokenise the same
    for name, seed in (("policy", 0), ("sft", 1)):
        make_tiny_model(len(tokenizer), seed=seed).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root


def reference_args(folders: Path, *extra: str) -> list[str]:
    return [
        "model=hf",
        f"model.name_or_path={folders / 'policy'}",
        "reference=model",
        f"reference.name_or_path={folders / 'sft'}",
        "data.max_length=256",  # the folders' models have 256 positions
        *extra,
    ]


def test_cli_reference_model_trains_keeps_it_out_of_checkpoints_and_resumes(folders, tmp_path):
    base = ["debug=fast", "data.generator.n=120", "data.batch_size=4", "callbacks.progress_bar=null"]
    run = tmp_path / "gpu_placement"
    run_cli([*reference_args(folders), *base, "trainer.max_steps=2", f"hydra.run.dir={run}"], tmp_path)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert not [k for k in ckpt["state_dict"] if k.startswith("reference.")]
    assert [k for k in ckpt["state_dict"] if k.startswith("policy.")]
    # The export is the policy only, trained away from where it started.
    exported = load_file(run / "hf_model" / "model.safetensors")
    start = load_file(folders / "policy" / "model.safetensors")
    assert any(not torch.equal(exported[k], start[k]) for k in start)

    # reference.device=cpu: the same run, the reference kept and run on the CPU.
    cpu = tmp_path / "cpu_placement"
    args = reference_args(folders, "reference.device=cpu")
    run_cli([*args, *base, "trainer.max_steps=2", f"hydra.run.dir={cpu}"], tmp_path)
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (run, cpu))
    for key in ("loss", "rewards/margins", "rewards/chosen"):
        assert s2["val"][key] == pytest.approx(s1["val"][key], abs=1e-6), key

    # Resume: the reference is rebuilt from reference.name_or_path, training goes on.
    resume = [*reference_args(folders), *base, "trainer.max_steps=3", f"hydra.run.dir={run}", "resume=true"]
    run_cli(resume, tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["resumed_from"].endswith("last.ckpt")


def _probe(run_dir: Path, rank: int) -> dict:
    return json.loads((run_dir / "probe" / f"rank{rank}.json").read_text())


def test_cli_fsdp2_shards_or_offloads_the_reference_and_matches_one_process(folders, data_arg, tmp_path):
    sft_sum = sum(float(t.double().sum()) for t in load_file(folders / "sft" / "model.safetensors").values())
    runs = {}
    for name, extra in (
        ("one", ["trainer=cpu", "data.batch_size=8"]),
        ("fsdp", ["trainer=fsdp_cpu", "data.batch_size=4"]),
        ("offload", ["trainer=fsdp_cpu", "data.batch_size=4", "reference.offload=true"]),
    ):
        run = tmp_path / name
        probe = [
            "+callbacks.probe._target_=tests.probes.ReferenceProbe",
            f"+callbacks.probe.dirpath={run / 'probe'}",
        ]
        args = [*reference_args(folders), *COMMON, data_arg, *extra, *probe, f"hydra.run.dir={run}"]
        run_cli(args, tmp_path, timeout=500, env=ENV)
        runs[name] = run

    one = _train_rows(runs["one"], TRACKED)
    assert one[0]["loss"] != pytest.approx(0.6931, abs=1e-3)  # the SFT reference is not the policy
    for name, policy in (("fsdp", "OffloadPolicy"), ("offload", "CPUOffloadPolicy")):
        rows = _train_rows(runs[name], TRACKED)
        assert rows.keys() == one.keys()
        for step in one:
            for key in TRACKED:
                assert rows[step][key] == pytest.approx(one[step][key], abs=1e-4), (name, step, key)
        probes = [_probe(runs[name], r) for r in (0, 1)]
        for p in probes:
            assert p["sharded"] and p["offload_policies"] == [policy], (name, p)
            assert p["devices"] == ["cpu"] and not p["requires_grad"] and not p["in_optimizer"]
            assert not p["training"] and not p["training_at_end"]
            assert p["sum_before"] == pytest.approx(sft_sum, rel=1e-9) == p["sum_after"]
        # Each rank holds about half of the reference (FSDP2 pads shards to equal sizes).
        full = probes[0]["full_numel"]
        assert all(full / 2 <= p["local_numel"] <= full / 2 + 2048 for p in probes)
    single = _probe(runs["one"], 0)
    assert not single["sharded"] and single["local_numel"] == single["full_numel"]


def test_cli_precomputed_cache_serves_padded_and_packed_runs(tmp_path):
    """reference=precomputed with engine=packed (refused before): a padded run writes the cache,
    a packed run reads it with zero model calls (and the other way round), same losses."""
    cache = tmp_path / "ref_cache"
    base = ["debug=fast", "reference=precomputed", f"reference.cache_dir={cache}", "data.batch_size=4"]
    summaries, logs = {}, {}
    for name, engine in (("padded", "padded"), ("packed", "packed"), ("padded_again", "padded")):
        run = tmp_path / name
        proc = run_cli([*base, f"engine={engine}", f"hydra.run.dir={run}"], tmp_path)
        summaries[name] = json.loads((run / "summary.json").read_text())
        logs[name] = proc.stdout + proc.stderr
    assert "reference log-probs computed" in logs["padded"]
    assert (
        "reference log-probs loaded" in logs["packed"]
        and "reference log-probs computed" not in logs["packed"]
    )
    assert "reference log-probs loaded" in logs["padded_again"]
    assert len(list(cache.glob("*.pt"))) == 1
    for name in ("packed", "padded_again"):
        for key in ("loss", "rewards/margins", "logps/chosen"):
            assert summaries[name]["val"][key] == pytest.approx(summaries["padded"]["val"][key], abs=1e-5), (
                name,
                key,
            )
