"""``reference=precomputed`` under DDP (2 CPU processes): shards computed once, merged, reused."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli


@pytest.mark.slow  # two 2-process CLI runs
def test_precomputed_under_ddp_computes_once_then_loads(tmp_path):
    cache = tmp_path / "cache"
    common = [
        "trainer=ddp_cpu",
        "reference=precomputed",
        f"reference.cache_dir={cache}",
        "debug=fast",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "data.generator.n=200",
    ]
    first = run_cli([*common, f"hydra.run.dir={tmp_path / 'a'}"], tmp_path, timeout=600)
    out = first.stdout + first.stderr
    assert "reference log-probs computed" in out
    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].suffix == ".pt"  # rank shards merged, then removed
    second = run_cli([*common, f"hydra.run.dir={tmp_path / 'b'}"], tmp_path, timeout=600)
    out = second.stdout + second.stderr
    assert "reference log-probs loaded" in out and "reference log-probs computed" not in out
    val_a = json.loads((tmp_path / "a" / "summary.json").read_text())["val"]["loss"]
    val_b = json.loads((tmp_path / "b" / "summary.json").read_text())["val"]["loss"]
    assert val_a == pytest.approx(val_b, abs=1e-5)
