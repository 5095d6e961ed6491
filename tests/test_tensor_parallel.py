"""Tensor parallelism + FSDP2 (``trainer=tp_fsdp``): plan checks, norms across meshes, and 2 CPU
processes with TP=2 against one process (same loss per step, same weights within fp32 tolerance).

With TP=2 on 2 processes there is one data-parallel rank: both ranks must read the same batch
(the sampler follows the data-parallel mesh dimension, not the world size), the loss is
normalised over the data-parallel group only, and the run totals count each batch once.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from dpo_lightning.models.tensor_parallel import check_divisible, tensor_parallel_plan, total_grad_norm
from dpo_lightning.run.errors import UserError
from tests.conftest import make_tiny_model
from tests.test_distributed_cli import (
    STAGES,
    _assert_same_weights,
    _pair_ids,
    _run,
    _train_rows,
    data_arg,
    single,
)

__all__ = ["data_arg", "single"]  # fixtures shared with test_distributed_cli


def test_plan_comes_from_the_model_config():
    plan = tensor_parallel_plan(make_tiny_model(64))
    assert plan["layers.*.self_attn.q_proj"] == "colwise" and plan["layers.*.mlp.down_proj"] == "rowwise"


def test_plan_refusals_name_the_fix():
    model = make_tiny_model(64)
    model.config.base_model_tp_plan = {"layers.*.self_attn.q_proj": "colwise_rep"}
    with pytest.raises(UserError, match=r"styles not supported here: .*colwise_rep.*use trainer=fsdp"):
        tensor_parallel_plan(model)
    model.config.base_model_tp_plan = None
    with pytest.raises(UserError, match="declares no tensor-parallel plan"):
        tensor_parallel_plan(model)
    with pytest.raises(UserError, match=r"num_key_value_heads=2 does not split over .*size=4"):
        check_divisible(make_tiny_model(64), 4)  # 4 heads, 2 KV heads


def test_total_grad_norm_matches_torch_on_plain_tensors():
    g = [torch.randn(3, 4), torch.randn(5)]
    for p in (2.0, 1.0, float("inf")):
        torch.testing.assert_close(total_grad_norm(g, p), torch.nn.utils.get_total_norm(g, p))


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["dpo", "sft"])
def test_tp2_fsdp_matches_one_process(stage, single, data_arg, tmp_path):
    overrides, tracked, _ = STAGES[stage]
    one = single(stage)
    tp = _run(tmp_path, "tp", ["trainer=tp_fsdp_cpu", "data.batch_size=8", data_arg, *overrides])

    # Both ranks of the TP group trained on the batches the single process trained on.
    assert _pair_ids(tp, 0) == _pair_ids(tp, 1)
    assert [sorted(b) for b in _pair_ids(tp, 0)] == [sorted(b) for b in _pair_ids(one, 0)]

    m1, m2 = _train_rows(one, tracked), _train_rows(tp, tracked)
    assert m1.keys() == m2.keys() == set(range(5))
    for step in m1:
        for key in tracked:
            assert m2[step][key] == pytest.approx(m1[step][key], rel=1e-5, abs=1e-5), (step, key)
    diff = _assert_same_weights(one, tp, f"{stage} × TP=2 + FSDP2 (2 CPU processes) vs 1 process")
    assert diff < 1e-5
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (one, tp))
    assert s2["pairs_trained"] == s1["pairs_trained"] == 38  # counted once per TP group
    model = AutoModelForCausalLM.from_pretrained(tp / "hf_model")  # the full weights, re-assembled
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (64, 64)


def test_tp_fsdp_preset_builds_a_2d_strategy_and_checks_the_world():
    from hydra.utils import instantiate

    from dpo_lightning.models.parallel import FSDP2Strategy
    from tests.conftest import compose

    strategy = instantiate(compose(["trainer=tp_fsdp"]).trainer.strategy)
    assert isinstance(strategy, FSDP2Strategy) and strategy._tensor_parallel_size == 2
    strategy.num_nodes, strategy.parallel_devices = 1, [torch.device("cpu")] * 3
    with pytest.raises(UserError, match=r"tensor_parallel_size=2 does not divide the 3 processes"):
        strategy.setup_environment()
