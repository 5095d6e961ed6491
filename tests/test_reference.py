"""Reference strategies: pairing with losses, precomputed cache, LoRA adapter, TR-DPO sync."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from dpo_lightning.data.collate import PreferenceCollator
from dpo_lightning.data.datamodule import PreferenceDataModule
from dpo_lightning.data.synthetic import sentiment_pairs
from dpo_lightning.engine import EngineBatch, PackedEngine, PaddedEngine
from dpo_lightning.engine.packing import PackedCollator
from dpo_lightning.losses import DPOLoss, MixLoss, SFTLoss, SimPOLoss
from dpo_lightning.reference import (
    AdapterReference,
    CopyReference,
    NoReference,
    PrecomputedReference,
    ReferenceSync,
    SyncReference,
    check_pairing,
)
from dpo_lightning.reference.precomputed import model_fingerprint
from dpo_lightning.stages.dpo import DPOModule
from tests.conftest import make_tiny_model


def sgd(params):
    return torch.optim.SGD(params, lr=0.5)


def module_with(tokenizer, reference, loss=None, seed=0, **model_kw):
    policy = make_tiny_model(len(tokenizer), seed=seed, **model_kw)
    return DPOModule(policy=policy, loss=loss or DPOLoss(0.5), optimizer=sgd, reference=reference)


@pytest.fixture(scope="module")
def datamodule(tokenizer):
    dm = PreferenceDataModule(
        tokenizer,
        generator=functools.partial(sentiment_pairs, n=60),
        batch_size=6,
        eval_batch_size=8,
        val_fraction=0.2,
        max_length=48,
    )
    dm.setup("fit")
    return dm


def quick_trainer(steps: int = 2) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def a_batch(datamodule):
    return next(iter(datamodule.val_dataloader()))


# ---- pairing --------------------------------------------------------------------------------


def test_reference_free_loss_refuses_a_reference_and_vice_versa(tokenizer):
    with pytest.raises(ValueError, match=r"reference-free.*add reference=none") as err:
        module_with(tokenizer, CopyReference(), loss=SimPOLoss())
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"needs reference log-probs.*reference=copy") as err:
        module_with(tokenizer, NoReference(), loss=DPOLoss())
    assert "\n" not in str(err.value)
    check_pairing(SimPOLoss(), NoReference())  # the valid pairs pass
    check_pairing(
        MixLoss([{"loss": DPOLoss(), "weight": 1}, {"loss": SFTLoss(), "weight": 1}]),
        CopyReference(),
    )


def test_reference_free_training_never_asks_the_strategy(tokenizer, datamodule):
    module = module_with(tokenizer, NoReference(), loss=SimPOLoss())
    assert module.reference_model is None
    loss = module._shared_step(a_batch(datamodule), "train")
    assert torch.isfinite(loss)


# ---- precomputed ------------------------------------------------------------------------------


def test_completion_keys_are_the_same_in_every_layout_and_follow_the_split(tokenizer, datamodule):
    ex = [datamodule.val_set[i] for i in range(3)]
    right = PreferenceCollator(tokenizer.pad_token_id, "right")(ex)
    left = PreferenceCollator(tokenizer.pad_token_id, "left", pad_to_multiple_of=64)(ex)
    packed = PackedCollator(tokenizer.pad_token_id, prefix_sharing=True)(ex)
    unshared = PackedCollator(tokenizer.pad_token_id, prefix_sharing=False, pad_to_multiple_of=128)(ex)
    keys = right["completion_keys"]
    assert keys == left["completion_keys"] == packed["completion_keys"] == unshared["completion_keys"]
    assert len(set(keys)) == len(keys) == 6
    # Moving one token from the prompt into the completion is another row (another context).
    moved = dict(ex[0], prompt_ids=ex[0]["prompt_ids"][:-1])
    moved["completion_ids"] = [ex[0]["prompt_ids"][-1:] + list(c) for c in ex[0]["completion_ids"]]
    assert PreferenceCollator(tokenizer.pad_token_id)([moved])["completion_keys"] != keys[:2]


def test_model_fingerprint_follows_the_weights(tokenizer):
    a, b = make_tiny_model(len(tokenizer), seed=0), make_tiny_model(len(tokenizer), seed=0)
    assert model_fingerprint(a) == model_fingerprint(b)
    with torch.no_grad():
        next(b.parameters())[0, 0] += 1e-3
    assert model_fingerprint(a) != model_fingerprint(b)


def test_cache_key_is_stable_across_fresh_objects_and_follows_settings(tokenizer):
    def key(max_length):
        dm = PreferenceDataModule(
            tokenizer, generator=functools.partial(sentiment_pairs, n=30), max_length=max_length
        )
        dm.setup("fit")
        module = module_with(tokenizer, PrecomputedReference())
        trainer = SimpleNamespace(precision="32-true")
        return module.reference.cache_key(module.policy, trainer, dm)

    assert key(48) == key(48)  # nothing run- or address-dependent in the key
    # (not 40: there 9 of the 30 generated pairs lose their difference to truncation, a fault)
    assert key(48) != key(64)


def fit_and_collect(module, datamodule, steps=2):
    L.seed_everything(0)
    trainer = quick_trainer(steps)
    trainer.fit(module, datamodule=datamodule)
    metrics = {k: v.item() for k, v in trainer.callback_metrics.items()}
    trainer.validate(module, datamodule=datamodule, verbose=False)
    return metrics | {k: v.item() for k, v in trainer.callback_metrics.items()}


def test_precomputed_matches_copy_and_second_run_calls_the_model_zero_times(tokenizer, datamodule, tmp_path):
    copy_metrics = fit_and_collect(module_with(tokenizer, CopyReference()), datamodule)

    first = PrecomputedReference(cache_dir=str(tmp_path))
    module = module_with(tokenizer, first)
    assert module.reference_model is None  # no second copy of the weights, ever
    first_metrics = fit_and_collect(module, datamodule)
    n_batches = sum(len(loader) for loader in datamodule.full_dataloaders())
    assert first.forward_calls == n_batches
    assert list(tmp_path.glob("*.pt")) == [first.cache_path]  # shards merged and removed

    second = PrecomputedReference(cache_dir=str(tmp_path))
    second_metrics = fit_and_collect(module_with(tokenizer, second), datamodule)
    assert second.forward_calls == 0
    assert second.cache_path == first.cache_path
    for key in ("train/loss", "val/loss", "val/rewards/margins", "val/rewards/chosen"):
        assert first_metrics[key] == pytest.approx(copy_metrics[key], abs=1e-5), key
        assert second_metrics[key] == pytest.approx(copy_metrics[key], abs=1e-5), key


def test_padded_and_packed_runs_share_one_cache_and_give_the_same_losses(tokenizer, tmp_path):
    """The cache is keyed by row content: a packed run reads what a padded run wrote (and the
    other way round) with zero model calls, and both train to the same metrics."""

    def run(engine):
        dm = PreferenceDataModule(
            tokenizer,
            generator=functools.partial(sentiment_pairs, n=60),
            batch_size=6,
            eval_batch_size=8,
            val_fraction=0.2,
            max_length=48,
            layout=engine,
        )
        dm.setup("fit")
        strategy = PrecomputedReference(cache_dir=str(tmp_path))
        policy = make_tiny_model(len(tokenizer), seed=0)
        module = DPOModule(policy=policy, loss=DPOLoss(0.5), optimizer=sgd, reference=strategy, engine=engine)
        return strategy, fit_and_collect(module, dm)

    padded, padded_metrics = run(PaddedEngine())
    assert padded.forward_calls > 0
    packed, packed_metrics = run(PackedEngine(chunk_size=16))
    assert packed.forward_calls == 0 and packed.cache_path == padded.cache_path
    again, again_metrics = run(PaddedEngine())
    assert again.forward_calls == 0
    for key in ("train/loss", "val/loss", "val/rewards/margins", "val/rewards/chosen", "val/logps/chosen"):
        assert packed_metrics[key] == pytest.approx(padded_metrics[key], abs=1e-5), key
        assert again_metrics[key] == pytest.approx(padded_metrics[key], abs=1e-6), key
    # The values the padded run wrote are the packed engine's own log-probs, to fp32 precision.
    dm = PreferenceDataModule(
        tokenizer,
        generator=functools.partial(sentiment_pairs, n=60),
        batch_size=6,
        eval_batch_size=8,
        val_fraction=0.2,
        max_length=48,
        layout=PackedEngine(),
    )
    dm.setup("fit")
    batch = EngineBatch(next(iter(dm.val_dataloader())))
    fresh = make_tiny_model(len(tokenizer), seed=0).eval()
    direct = PackedEngine()(fresh, batch)
    cached = packed.completion_logps(batch, fresh, PackedEngine())
    torch.testing.assert_close(cached.logps, direct.logps, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(cached.lengths, direct.lengths)


class KWiseData(L.LightningDataModule):
    """Three ranked completions per prompt (pairs 0≻1, 0≻2, 1≻2), no datasets fingerprint."""

    def __init__(self, tokenizer):
        super().__init__()
        self.tokenizer = tokenizer
        enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
        words = ["great fun", "fine I guess", "awful and dull", "a lovely film", "so boring"]
        self.examples = [
            {
                "prompt_ids": enc(f"Review number {i}:"),
                "completion_ids": [enc(words[(i + k) % 5]) for k in range(3)],
                "pairs": [[0, 1], [0, 2], [1, 2]],
                "row_id": i,
            }
            for i in range(8)
        ]
        self.collator = PreferenceCollator(tokenizer.pad_token_id)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.examples, batch_size=4, collate_fn=self.collator)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(self.examples[:4], batch_size=2, collate_fn=self.collator)


def test_precomputed_works_with_k_wise_rankings(tokenizer, tmp_path):
    data = KWiseData(tokenizer)
    strategy = PrecomputedReference(cache_dir=str(tmp_path))
    module = module_with(tokenizer, strategy)
    strategy.prepare(
        SimpleNamespace(
            datamodule=data,
            global_rank=0,
            world_size=1,
            is_global_zero=True,
            precision="32-true",
            strategy=SimpleNamespace(
                root_device=torch.device("cpu"),
                barrier=lambda name: None,
                restore_checkpoint_after_setup=False,
            ),
            precision_plugin=L.pytorch.plugins.precision.Precision(),
        ),
        module.policy,
        module.engine,
    )
    reference = CopyReference()
    reference.build(module.policy)
    batch = EngineBatch(next(iter(data.train_dataloader())))
    assert batch.data["chosen_idx"].numel() == 12  # 4 prompts × 3 pairs, 12 completion rows
    torch.testing.assert_close(
        strategy.completion_logps(batch, module.policy, module.engine).logps,
        reference.completion_logps(batch, module.policy, module.engine).logps,
        atol=1e-5,
        rtol=0,
    )


# ---- adapter ----------------------------------------------------------------------------------


def lora_module(tokenizer, seed=0):
    from dpo_lightning.models.lora import apply_lora

    policy = apply_lora(make_tiny_model(len(tokenizer), seed=seed), r=4, alpha=8)
    return DPOModule(policy=policy, loss=DPOLoss(0.5), optimizer=sgd, reference=AdapterReference())


def test_adapter_holds_one_base_copy(tokenizer):
    base = sum(p.numel() for p in make_tiny_model(len(tokenizer)).parameters())
    copy_module = module_with(tokenizer, CopyReference())
    adapter_module = lora_module(tokenizer)
    lora = sum(p.numel() for n, p in adapter_module.named_parameters() if "lora_" in n)
    assert sum(p.numel() for p in copy_module.parameters()) == 2 * base
    assert sum(p.numel() for p in adapter_module.parameters()) == base + lora
    assert 0 < lora < base / 4
    trainable = [p for p in adapter_module.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == lora


def test_adapter_matches_copy_on_the_first_step(tokenizer, datamodule):
    batch = a_batch(datamodule)
    copy_module = module_with(tokenizer, CopyReference())
    copy_loss = copy_module._shared_step(batch, "train")
    # B starts at zero: the LoRA policy computes exactly the base model
    torch.testing.assert_close(lora_module(tokenizer)(batch).logps, copy_module(batch).logps)
    adapter = lora_module(tokenizer)
    with torch.no_grad():  # a trained adapter: the policy moves, the reference must not
        for name, p in adapter.policy.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    ref = adapter.reference.completion_logps(EngineBatch(batch), adapter.policy, adapter.engine).logps
    initial = CopyReference()
    initial.build(make_tiny_model(len(tokenizer)))
    torch.testing.assert_close(
        ref, initial.completion_logps(EngineBatch(batch), adapter.policy, PaddedEngine()).logps
    )
    assert not torch.allclose(adapter(batch).logps, ref)
    assert adapter.policy.training  # eval only inside the reference forward
    torch.testing.assert_close(lora_module(tokenizer)._shared_step(batch, "train"), copy_loss)


def test_adapter_without_lora_fails_clearly(tokenizer):
    with pytest.raises(ValueError, match="reference=adapter needs a LoRA policy"):
        module_with(tokenizer, AdapterReference())


def test_export_saves_adapter_or_merged_model(tokenizer, datamodule, tmp_path):
    from transformers import AutoModelForCausalLM

    from dpo_lightning.models.lora import save_policy

    module = lora_module(tokenizer)
    with torch.no_grad():
        for name, p in module.policy.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    batch = a_batch(datamodule)
    want = module(batch).logps
    save_policy(module.policy, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    save_policy(module.policy, tmp_path / "merged", merge_adapter=True)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    module.policy = merged
    torch.testing.assert_close(module(batch).logps, want, atol=1e-4, rtol=0)


# ---- sync (TR-DPO) ----------------------------------------------------------------------------


def test_sync_soft_update_every_n_steps(tokenizer):
    module = module_with(tokenizer, SyncReference(alpha=0.25, sync_steps=2))
    (callback,) = module.configure_callbacks()
    assert isinstance(callback, ReferenceSync)
    with torch.no_grad():
        for p in module.policy.parameters():
            p.add_(1.0)
    before = [p.clone() for p in module.reference_model.parameters()]
    policy = [p.clone() for p in module.policy.parameters()]
    callback.on_train_batch_end(SimpleNamespace(global_step=1), module, None, None, 0)
    for r, b in zip(module.reference_model.parameters(), before, strict=True):
        torch.testing.assert_close(r, b)  # step 1: not a sync step
    callback.on_train_batch_end(SimpleNamespace(global_step=2), module, None, None, 0)
    for r, b, p in zip(module.reference_model.parameters(), before, policy, strict=True):
        torch.testing.assert_close(r, 0.25 * p + 0.75 * b)
    assert not any(p.requires_grad for p in module.reference_model.parameters())
    assert not module.reference.rebuilt_on_start  # a moving reference is checkpointed


def test_sync_hard_update_in_training(tokenizer, datamodule):
    module = module_with(tokenizer, SyncReference(alpha=1.0, sync_steps=1))
    quick_trainer(1).fit(module, datamodule=datamodule)
    for r, p in zip(module.reference_model.parameters(), module.policy.parameters(), strict=True):
        torch.testing.assert_close(r, p)
    assert not torch.equal(
        next(module.policy.parameters()), next(make_tiny_model(len(tokenizer)).parameters())
    )
