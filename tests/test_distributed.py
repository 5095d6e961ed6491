"""Fast checks of the scale-out pieces: presets compose, sampler order, FSDP2 sharding and export.

The multi-process runs (DDP / FSDP2 equivalence) are in ``test_distributed_cli.py`` (slow).
"""

from __future__ import annotations

import functools
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
    strategy._device_mesh = {"data_parallel": one_rank_group, "tensor_parallel": one_rank_group}
    module = DPOModule(make_tiny_model(len(tokenizer)), DPOLoss(), optimizer=None, reference=CopyReference())
    assert module._reference_left_out()  # unsharded: a rebuilt copy stays out of checkpoints
    assert apply_parallelism(strategy, module.policy, [module.reference.model])
    assert is_sharded(module.policy) and is_sharded(module.reference_model)
    assert not any(p.requires_grad for p in module.reference_model.parameters())
    assert module.policy.is_gradient_checkpointing
    assert module._reference_left_out() is False  # sharded checkpoints keep the reference


# --- Every stage: one sharding rule, one global-batch loss -------------------------------------

EXAMPLES = [  # chosen completions of 3 | 2, 6 tokens: rank 0 and rank 1 have their own mean lengths
    {"prompt_ids": [1, 5, 6], "completion_ids": [[7, 8, 2], [9, 2]], "pairs": [[0, 1]]},
    {"prompt_ids": [1, 10], "completion_ids": [[11, 12, 13, 14, 2], [15, 2]], "pairs": [[1, 0]]},
    {"prompt_ids": [1, 16, 17], "completion_ids": [[18, 19, 20, 23, 24, 2], [21, 22, 2]], "pairs": [[0, 1]]},
]


def _stage(name: str, tokenizer):
    from dpo_lightning.losses import RPOLoss
    from dpo_lightning.reference import CopyReference
    from dpo_lightning.stages import DPOModule, RewardModelModule, SFTModule

    policy = make_tiny_model(len(tokenizer))
    sgd = functools.partial(torch.optim.SGD, lr=0.1)
    build = {
        "sft": lambda: SFTModule(policy, sgd),
        "reward_model": lambda: RewardModelModule(policy, sgd),
        "dpo_rpo": lambda: DPOModule(policy, RPOLoss(beta=0.5, alpha=1.0), sgd, reference=CopyReference()),
    }
    module = build[name]()
    module.log_dict = module.log = lambda *a, **k: None  # no trainer to log to
    return module


def _grads(module, steps) -> list[torch.Tensor]:
    """Gradients after running ``steps`` (each ``(batch, weight)``: backward of weight × loss)."""
    module.policy.zero_grad(set_to_none=True)
    for batch, weight in steps:
        (weight * module.training_step(batch, 0)).backward()
    return [p.grad.clone() for p in module.policy.parameters() if p.grad is not None]


class _OtherRank:
    """Stands in for the collective: adds what the other rank's ``global_sum`` call contributes
    (calls are matched by order, as the real all-reduce matches them)."""

    def __init__(self, contributions: list[torch.Tensor]) -> None:
        self.contributions = list(contributions)

    def __call__(self, values, strategy):
        return values + self.contributions.pop(0), 2


def _local_sums(module, batch, monkeypatch) -> list[torch.Tensor]:
    """What ``global_sum`` receives on a rank holding ``batch`` (its local sums), in call order."""
    seen = []
    monkeypatch.setattr(
        "dpo_lightning.stages.base.sum_over_data_parallel", lambda v, s: (seen.append(v) or v, 1)
    )
    with torch.no_grad():
        module.training_step(batch, 0)
    return seen


@pytest.mark.parametrize("stage", ["sft", "reward_model", "dpo_rpo"])
def test_two_ranks_give_the_gradient_of_the_whole_batch(stage, tokenizer, monkeypatch):
    """Rank 0 holds examples [0], rank 1 examples [1, 2] (unequal tokens and pairs). The mean of
    the two ranks' gradients (what DDP/FSDP2 compute) equals the one-process gradient of all
    three; the per-rank means (today's code before this change) do not."""
    from dpo_lightning.data.collate import PreferenceCollator

    module = _stage(stage, tokenizer)
    collate = PreferenceCollator(tokenizer.pad_token_id)
    whole, a, b = collate(EXAMPLES), collate(EXAMPLES[:1]), collate(EXAMPLES[1:])
    expected = _grads(module, [(whole, 1.0)])
    sums_a, sums_b = _local_sums(module, a, monkeypatch), _local_sums(module, b, monkeypatch)
    monkeypatch.setattr("dpo_lightning.stages.base.sum_over_data_parallel", _OtherRank(sums_b))
    g_a = _grads(module, [(a, 1.0)])
    monkeypatch.setattr("dpo_lightning.stages.base.sum_over_data_parallel", _OtherRank(sums_a))
    g_b = _grads(module, [(b, 1.0)])
    for want, ga, gb in zip(expected, g_a, g_b, strict=True):
        torch.testing.assert_close((ga + gb) / 2, want, atol=1e-6, rtol=1e-5)
    # Per-rank means (no global count) would weigh rank 0's few items up: a real difference.
    monkeypatch.setattr("dpo_lightning.stages.base.sum_over_data_parallel", lambda v, s: (v, 1))
    naive = [(x + y) / 2 for x, y in zip(_grads(module, [(a, 1.0)]), _grads(module, [(b, 1.0)]), strict=True)]
    assert max((n - w).abs().max().item() for n, w in zip(naive, expected, strict=True)) > 1e-4


@pytest.mark.parametrize("stage", ["sft", "reward_model"])
def test_accumulated_micro_batches_give_the_gradient_of_the_whole_batch(stage, tokenizer):
    """Two micro-batches of unequal size with ``accumulate_grad_batches=2`` (Lightning divides
    each loss by 2), then the rescale before the optimizer step: the gradient of the whole batch."""
    from types import SimpleNamespace

    from dpo_lightning.data.collate import PreferenceCollator

    module = _stage(stage, tokenizer)
    collate = PreferenceCollator(tokenizer.pad_token_id)
    expected = _grads(module, [(collate(EXAMPLES), 1.0)])
    module._trainer = SimpleNamespace(accumulate_grad_batches=2, strategy=None)
    got = _grads(module, [(collate(EXAMPLES[:1]), 0.5), (collate(EXAMPLES[1:]), 0.5)])
    assert module._window is not None
    module._finish_window()
    assert module._window is None  # the next step starts a new window
    got = [p.grad for p in module.policy.parameters() if p.grad is not None]
    for want, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, want, atol=1e-6, rtol=1e-5)


def test_token_terms_use_the_global_mean_length():
    """RPO / ORPO / SFT-loss NLL terms: with the global mean chosen length, the losses of two
    ranks' pairs summed over all pairs / P equal the one-process mean (lengths 2 | 6, 4)."""
    from dpo_lightning.losses import ORPOLoss, RPOLoss, SFTLoss

    logps = torch.tensor([-2.0, -9.0, -5.0])
    rejected = torch.tensor([-3.0, -7.0, -6.0])
    lengths = torch.tensor([2.0, 6.0, 4.0])
    ref = torch.zeros(3)
    for loss in (RPOLoss(beta=0.1, alpha=1.0), ORPOLoss(beta=0.1), SFTLoss()):
        args = (None, None) if loss.is_reference_free else (ref, ref)

        def losses(rows, mean=None, loss=loss, args=args):
            a = [x if x is None else x[rows] for x in args]
            kw = {
                "chosen_lengths": lengths[rows],
                "rejected_lengths": lengths[rows],
                "mean_chosen_length": mean,
            }
            return loss(logps[rows], rejected[rows], *a, **kw)[0]

        whole = losses(slice(None)).mean()
        mean = lengths.mean()
        split = (losses(slice(0, 1), mean).sum() + losses(slice(1, 3), mean).sum()) / 3
        torch.testing.assert_close(split, whole)
        local = (losses(slice(0, 1)).sum() + losses(slice(1, 3)).sum()) / 3  # per-rank mean lengths
        assert (local - whole).abs() > 1e-2
        if isinstance(loss, SFTLoss):  # -(−2 − 9 − 5) / (2 + 6 + 4): the token mean
            torch.testing.assert_close(whole, torch.tensor(16.0 / 12.0))


def test_every_stage_shards_through_the_base_class_and_exports(tokenizer, one_rank_group, tmp_path):
    """``configure_model`` is one rule in PolicyModule: SFT and the reward model shard under
    FSDP2 like DPO (today: FSDP2 refuses them), compute what they computed unsharded, and export
    a full HF model from the shards (the reward model an ``AutoModelForSequenceClassification``)."""
    from types import SimpleNamespace

    from transformers import AutoModelForSequenceClassification

    from dpo_lightning.data.collate import PreferenceCollator
    from dpo_lightning.models.lora import save_policy
    from dpo_lightning.stages.reward_model import sequence_rewards

    batch = PreferenceCollator(tokenizer.pad_token_id)(EXAMPLES)
    strategy = FSDP2Strategy(param_dtype=None, reduce_dtype=None)
    strategy._device_mesh = {"data_parallel": one_rank_group, "tensor_parallel": one_rank_group}
    for stage in ("sft", "reward_model"):
        module = _stage(stage, tokenizer)
        with torch.no_grad():
            before = module.training_step(batch, 0)
        module._trainer = SimpleNamespace(strategy=strategy, accumulate_grad_batches=1)
        module.configure_model()
        assert is_sharded(module.policy)
        with torch.no_grad():
            torch.testing.assert_close(module.training_step(batch, 0), before)
        save_policy(module.policy, tmp_path / stage, state_dict=full_state_dict(module.policy))
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "reward_model")
    assert loaded.config.num_labels == 1
    with torch.no_grad():
        torch.testing.assert_close(
            sequence_rewards(loaded, batch["input_ids"], batch["attention_mask"]),
            sequence_rewards(module.policy, batch["input_ids"], batch["attention_mask"]),
        )
