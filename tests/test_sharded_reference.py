"""``reference=precomputed`` under FSDP2 and TP + FSDP2: the pass runs the *sharded* policy
(after ``configure_model``, before any checkpoint weights load), so a model that only fits
sharded can precompute. The table it writes equals the one computed by one process on the
unsharded policy (same cache key: the key comes from the initial weights, before sharding), and
training from it gives the single-process weights.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli
from tests.test_distributed_cli import COMMON, ENV, _assert_same_weights, _run, data_arg

pytestmark = pytest.mark.slow
__all__ = ["data_arg"]  # fixture shared with test_distributed_cli


def _table(cache: Path) -> tuple[str, dict[int, tuple[float, float]]]:
    (path,) = cache.glob("*.pt")  # one merged file, the per-rank shards removed
    saved = torch.load(path, weights_only=True)
    values = zip(saved["logps"].tolist(), saved["lengths"].tolist(), strict=True)
    return path.name, dict(zip(saved["keys"].tolist(), values, strict=True))


@pytest.fixture(scope="module")
def single_precomputed(tmp_path_factory, data_arg):
    tmp = tmp_path_factory.mktemp("single_precomputed")
    cache = tmp / "cache"
    args = [
        "trainer=cpu",
        "data.batch_size=8",
        data_arg,
        "reference=precomputed",
        f"reference.cache_dir={cache}",
    ]
    return _run(tmp, "one", args), cache


@pytest.mark.parametrize(("preset", "batch"), [("fsdp_cpu", 4), ("tp_fsdp_cpu", 8)])
def test_precompute_runs_on_the_sharded_policy(preset, batch, single_precomputed, data_arg, tmp_path):
    one, one_cache = single_precomputed
    cache = tmp_path / "cache"
    run = tmp_path / preset
    args = [f"trainer={preset}", f"data.batch_size={batch}", data_arg, "reference=precomputed"]
    proc = run_cli(
        [f"hydra.run.dir={run}", *COMMON, *args, f"reference.cache_dir={cache}"],
        tmp_path,
        timeout=400,
        env=ENV,
    )
    assert "reference log-probs computed (sharded policy)" in proc.stdout + proc.stderr
    name1, table1 = _table(one_cache)
    name2, table2 = _table(cache)
    assert name1 == name2  # same key: fingerprinted before sharding
    assert table1.keys() == table2.keys() and len(table1) == 40 * 2  # every completion row once
    diff = max(abs(table1[k][0] - table2[k][0]) for k in table1)
    print(f"\n[precompute] {preset}: max |Δ reference logp| = {diff:.3g} over {len(table1)} rows")
    assert diff < 1e-4 and all(table1[k][1] == table2[k][1] for k in table1)
    _assert_same_weights(one, run, f"reference=precomputed × {preset} vs 1 process")
