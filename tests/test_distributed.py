"""Fast checks of the scale-out pieces: presets compose, sampler order, FSDP2 sharding and export.

The multi-process runs (DDP / FSDP2 equivalence) are in ``test_distributed_cli.py`` (slow).
"""

from __future__ import annotations

import importlib.util
import socket

import pytest
import torch
import torch.distributed as dist
from hydra.utils import instantiate
from torch.utils.data import DistributedSampler

from dpo_lightning.data.sampler import ResumableSampler
from dpo_lightning.models.parallel import (
    FSDP2Strategy,
    apply_parallelism,
    decoder_layers,
    full_state_dict,
    is_sharded,
    shard_model,
)
from dpo_lightning.reporting.scale import global_batch_line
from tests.conftest import compose, make_tiny_model


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("epoch", [0, 1])
def test_one_process_sees_the_union_of_rank_batches(world, epoch):
    """Global batch k of W ranks with batch b == batch k of one process with batch W·b."""
    n, b, seed = 23 * world, 3, 7  # divisible by W: DistributedSampler pads nothing
    single = ResumableSampler(range(n), world * b, seed=seed)
    single.set_epoch(epoch)
    order = list(single)
    ranks = []
    for r in range(world):
        s = ResumableSampler(range(n), b, num_replicas=world, rank=r, seed=seed)
        assert list(s) == list(DistributedSampler(range(n), num_replicas=world, rank=r, seed=seed))
        s.set_epoch(epoch)
        ranks.append(list(s))
    assert sorted(order) == list(range(n))
    for k in range(n // (world * b)):
        union = sorted(i for rank in ranks for i in rank[k * b : (k + 1) * b])
        assert union == sorted(order[k * world * b : (k + 1) * world * b])


def test_sampler_reshuffles_per_epoch():
    s = ResumableSampler(range(50), 5, seed=0)
    first = list(s)
    s.set_epoch(1)
    assert list(s) != first and sorted(list(s)) == sorted(first)


def test_global_batch_line():
    assert global_batch_line(4, 8, 2).endswith("= 64 pairs per optimizer step")


def test_fsdp_presets_compose_and_build_strategy():
    gpu = compose(["trainer=fsdp"]).trainer
    assert gpu.precision == "32-true" and gpu.accelerator == "gpu"
    strategy = instantiate(gpu.strategy)
    assert isinstance(strategy, FSDP2Strategy)
    assert (strategy.param_dtype, strategy.reduce_dtype) == ("bfloat16", "float32")
    cpu = compose(["trainer=fsdp_cpu", "trainer.strategy.activation_checkpointing=true"]).trainer
    strategy = instantiate(cpu.strategy)
    assert cpu.devices == 2 and strategy.param_dtype is None and strategy.activation_checkpointing
    assert strategy.process_group_backend == "gloo"


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_presets(stage):
    trainer = compose([f"trainer=deepspeed_zero{stage}"]).trainer
    assert trainer.strategy.stage == stage
    assert trainer.strategy._target_ == "lightning.pytorch.strategies.DeepSpeedStrategy"
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (it needs CUDA to build); preset composed only")
    assert instantiate(trainer.strategy).config["zero_optimization"]["stage"] == stage


def test_decoder_layers_found_and_missing_is_a_clear_error(tokenizer):
    model = make_tiny_model(len(tokenizer))
    assert len(decoder_layers(model)) == 2
    with pytest.raises(ValueError, match="_no_split_modules"):
        decoder_layers(torch.nn.Linear(2, 2))


def test_apply_parallelism_is_a_noop_without_model_parallel(tokenizer):
    policy = make_tiny_model(len(tokenizer))
    assert not apply_parallelism(object(), policy, [])
    assert not apply_parallelism(None, policy, [])  # no trainer yet
    assert not is_sharded(policy)


@pytest.fixture
def one_rank_group(tmp_path):
    """A 1-process gloo group: FSDP2 on one rank runs the same code paths as on many."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    from torch.distributed.device_mesh import init_device_mesh

    yield init_device_mesh("cpu", (1,))
    dist.destroy_process_group()


def test_fsdp2_sharding_keeps_outputs_and_exports_full_tied_weights(tokenizer, one_rank_group):
    model = make_tiny_model(len(tokenizer), tie_word_embeddings=True)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, len(tokenizer), (2, 7))
    expected = model(ids).logits
    settings = {"param_dtype": None, "reduce_dtype": None, "reshard_after_forward": True}
    shard_model(model, one_rank_group, settings)
    assert is_sharded(model)
    torch.testing.assert_close(model(ids).logits, expected)
    state = full_state_dict(model)
    # One entry per distinct parameter (the tied LM head is not written twice), full tensors.
    assert set(state) == set(reference) - {"lm_head.weight"}
    for key, value in state.items():
        assert not isinstance(value, torch.distributed.tensor.DTensor)
        torch.testing.assert_close(value, reference[key])


def test_fsdp2_bf16_compute_fp32_master_weights(tokenizer, one_rank_group):
    model = make_tiny_model(len(tokenizer))
    settings = {"param_dtype": "bfloat16", "reduce_dtype": "float32", "reshard_after_forward": True}
    shard_model(model, one_rank_group, settings)
    out = model(torch.randint(0, len(tokenizer), (1, 5))).logits
    assert out.dtype == torch.bfloat16
    model.reshard()  # the root keeps its gathered (bf16) params until backward; free them
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_apply_parallelism_shards_policy_and_frozen_reference(tokenizer, one_rank_group):
    from dpo_lightning.losses import DPOLoss
    from dpo_lightning.reference import CopyReference
    from dpo_lightning.stages import DPOModule

    strategy = FSDP2Strategy(param_dtype=None, reduce_dtype=None, activation_checkpointing=True)
    strategy._device_mesh = {"data_parallel": one_rank_group}
    module = DPOModule(make_tiny_model(len(tokenizer)), DPOLoss(), optimizer=None, reference=CopyReference())
    assert module._reference_left_out()  # unsharded: a rebuilt copy stays out of checkpoints
    assert apply_parallelism(strategy, module.policy, [module.reference.model])
    assert is_sharded(module.policy) and is_sharded(module.reference_model)
    assert not any(p.requires_grad for p in module.reference_model.parameters())
    assert module.policy.is_gradient_checkpointing
    assert module._reference_left_out() is False  # sharded checkpoints keep the reference
