"""``reference=model``: a separate frozen reference checkpoint, on the policy's device or the CPU."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpo_lightning.data.datamodule import PreferenceDataModule
from dpo_lightning.data.synthetic import sentiment_pairs
from dpo_lightning.engine import EngineBatch, PaddedEngine
from dpo_lightning.losses import DPOLoss
from dpo_lightning.models.tokenizers import tokenizer_differences, train_bpe_tokenizer
from dpo_lightning.reference import ModelReference
from dpo_lightning.run.errors import UserError
from dpo_lightning.stages.dpo import REFERENCE_PREFIX, DPOModule
from tests.conftest import make_tiny_model
from tests.test_reference import fit_and_collect


def sgd(params):
    return torch.optim.SGD(params, lr=0.5)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer):
    """``policy/`` (seed 0) and ``sft/`` (seed 1): two checkpoints sharing one tokenizer."""
    root = tmp_path_factory.mktemp("checkpoints")
    for name, seed in (("policy", 0), ("sft", 1)):
        make_tiny_model(len(tokenizer), seed=seed).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root


@pytest.fixture(scope="module")
def datamodule(tokenizer):
    dm = PreferenceDataModule(
        tokenizer, generator=functools.partial(sentiment_pairs, n=40), batch_size=4, max_length=48
    )
    dm.setup("fit")
    return dm


def module_with(tokenizer, reference, tokenized=True):
    policy = make_tiny_model(len(tokenizer), seed=0)
    return DPOModule(
        policy=policy,
        loss=DPOLoss(0.5),
        optimizer=sgd,
        reference=reference,
        tokenizer=tokenizer if tokenized else None,
    )


def test_model_reference_is_the_checkpoint_frozen_and_stays_out_of_the_optimizer(
    tokenizer, folders, datamodule
):
    module = module_with(tokenizer, ModelReference(str(folders / "sft"), dtype="float32"))
    sft = AutoModelForCausalLM.from_pretrained(folders / "sft").eval()
    theirs, ours = sft.state_dict(), module.reference.model.state_dict()
    assert theirs.keys() == ours.keys()
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0, msg=key)
    module.train()
    assert not module.reference.model.training
    assert not any(p.requires_grad for p in module.reference.model.parameters())
    optimizer = module.configure_optimizers()
    optimized = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not optimized & {id(p) for p in module.reference.model.parameters()}

    # Its log-probs are the SFT checkpoint's, not the policy's.
    batch = EngineBatch(next(iter(datamodule.val_dataloader())))
    ref = module.reference.completion_logps(batch, module.policy, module.engine)
    torch.testing.assert_close(ref.logps, PaddedEngine()(sft, batch).logps)
    assert (ref.logps - module(batch).logps).abs().min() > 1e-3

    # Training moves the policy, never the reference; checkpoints leave the reference out.
    before = [p.clone() for p in module.policy.parameters()]
    fit_and_collect(module, datamodule, steps=2)
    assert any(not torch.equal(a, b) for a, b in zip(before, module.policy.parameters(), strict=True))
    for key, value in module.reference.model.state_dict().items():
        torch.testing.assert_close(value, theirs[key], rtol=0, atol=0, msg=key)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert not [k for k in checkpoint["state_dict"] if k.startswith(REFERENCE_PREFIX)]
    assert [k for k in checkpoint["state_dict"] if k.startswith("policy.")]
    # Loading it into a fresh stage keeps the reference rebuilt from its source.
    fresh = module_with(tokenizer, ModelReference(str(folders / "sft")))
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"])
    torch.testing.assert_close(
        fresh.reference.model.state_dict()["lm_head.weight"], theirs["lm_head.weight"], rtol=0, atol=0
    )


def test_dtype_and_attention_are_the_reference_s_own(tokenizer, folders, datamodule):
    reference = ModelReference(str(folders / "sft"), dtype="bfloat16", attn_implementation="eager")
    module = module_with(tokenizer, reference)
    assert {p.dtype for p in module.reference.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in module.policy.parameters()} == {torch.float32}
    assert module.reference.model.config._attn_implementation == "eager"
    batch = EngineBatch(next(iter(datamodule.val_dataloader())))
    loss = module._shared_step(batch.data, "val")
    assert torch.isfinite(loss)


def test_a_different_tokenizer_is_refused_in_one_line_before_the_weights_load(
    tokenizer, folders, tmp_path, monkeypatch
):
    other = train_bpe_tokenizer(["completely different words here"] * 50, vocab_size=len(tokenizer) + 8)
    make_tiny_model(len(tokenizer), seed=2).save_pretrained(tmp_path / "other")
    other.save_pretrained(tmp_path / "other")

    def no_weights(*args, **kwargs):
        raise AssertionError("the reference weights were loaded before the tokenizer check")

    monkeypatch.setattr("dpo_lightning.reference.model.load_causal_lm", no_weights)
    with pytest.raises(UserError, match=r"reference.name_or_path=.*its tokenizer is not the policy's") as err:
        module_with(tokenizer, ModelReference(str(tmp_path / "other")))
    assert "\n" not in str(err.value)

    # No tokenizer saved with the checkpoint: say where to point reference.tokenizer.
    make_tiny_model(len(tokenizer), seed=2).save_pretrained(tmp_path / "bare")
    with pytest.raises(UserError, match=r"no tokenizer .* reference.tokenizer=") as err:
        module_with(tokenizer, ModelReference(str(tmp_path / "bare")))
    assert "\n" not in str(err.value)
    # reference.tokenizer names where it is: then the check passes and the weights load.
    monkeypatch.undo()
    module = module_with(tokenizer, ModelReference(str(tmp_path / "bare"), tokenizer=str(folders / "sft")))
    assert module.reference.model is not None


def test_tokenizers_are_compared_by_content_not_identity(tokenizer, folders):
    reloaded = AutoTokenizer.from_pretrained(folders / "sft")
    assert reloaded is not tokenizer and tokenizer_differences(tokenizer, reloaded) == []
    larger = train_bpe_tokenizer(["a few words, merged"] * 10, vocab_size=len(tokenizer) + 4)
    assert "vocabulary sizes differ" in tokenizer_differences(tokenizer, larger)[0]
    swapped = AutoTokenizer.from_pretrained(folders / "sft")
    swapped.add_tokens(["<extra>"])
    tokenizer_plus = AutoTokenizer.from_pretrained(folders / "sft")
    tokenizer_plus.add_tokens(["<other>"])
    # Same size, one id mapped to another token: the first differing token is named.
    expected = f"token '<extra>' has id {len(tokenizer)} vs None"
    assert tokenizer_differences(swapped, tokenizer_plus) == [expected]


def test_the_check_also_runs_at_setup_when_the_stage_was_built_without_a_tokenizer(
    tokenizer, folders, tmp_path
):
    other = train_bpe_tokenizer(["completely different words here"] * 50, vocab_size=len(tokenizer) + 8)
    make_tiny_model(len(tokenizer), seed=2).save_pretrained(tmp_path / "other")
    other.save_pretrained(tmp_path / "other")
    module = module_with(tokenizer, ModelReference(str(tmp_path / "other")), tokenized=False)
    trainer = SimpleNamespace(
        strategy=SimpleNamespace(), world_size=1, datamodule=SimpleNamespace(tokenizer=tokenizer)
    )
    with pytest.raises(UserError, match="its tokenizer is not the policy's"):
        module.reference.prepare(trainer, module.policy, module.engine)


def test_device_cpu_keeps_the_reference_on_the_cpu_and_returns_log_probs_to_the_policy(
    tokenizer, folders, datamodule
):
    module = module_with(tokenizer, ModelReference(str(folders / "sft"), device="cpu"))
    batch = EngineBatch(next(iter(datamodule.val_dataloader())))
    expected = module.reference.completion_logps(batch, module.policy, module.engine)
    # What Lightning does with the stage (move to the policy's device, cast for *-true
    # precision) leaves this reference where it is: the meta device stands in for an accelerator.
    module.to(torch.float64)
    assert {p.dtype for p in module.policy.parameters()} == {torch.float64}
    assert {p.dtype for p in module.reference.model.parameters()} == {torch.float32}
    module.to("meta")
    assert {p.device.type for p in module.policy.parameters()} == {"meta"}
    assert {p.device.type for p in module.reference.model.parameters()} == {"cpu"}
    stats = module.reference.completion_logps(batch, module.policy, module.engine)
    assert stats.logps.device.type == "meta"  # sent back to the policy's device
    module.reference.to("cpu")  # no-op too: the reference is never moved
    on_cpu = module.reference.completion_logps(batch, make_tiny_model(len(tokenizer)), module.engine)
    torch.testing.assert_close(on_cpu.logps, expected.logps)


def test_placement_options_are_refused_where_they_cannot_work(tokenizer, folders):
    with pytest.raises(UserError, match=r"device=.cuda:1."):
        ModelReference(str(folders / "sft"), device="cuda:1")
    with pytest.raises(UserError, match="pick one"):
        ModelReference(str(folders / "sft"), device="cpu", offload=True)
    single = SimpleNamespace(strategy=SimpleNamespace(), world_size=1, datamodule=None)
    offloaded = ModelReference(str(folders / "sft"), offload=True)
    with pytest.raises(UserError, match=r"reference\.offload=true needs trainer=fsdp"):
        offloaded.prepare(single, None, None)
    fsdp = SimpleNamespace(strategy=ModelParallelStrategy.__new__(ModelParallelStrategy), world_size=2)
    fsdp.datamodule = None
    with pytest.raises(UserError, match=r"reference\.device=cpu is for a single device"):
        ModelReference(str(folders / "sft"), device="cpu").prepare(fsdp, None, None)


def test_preflight_checks_the_reference_source_like_the_policy_s(folders, tmp_path):
    """Before any tokenizing or model work: the folder or hub id, and the context length."""
    from dpo_lightning.run.preflight import preflight
    from tests.conftest import compose

    def run(*overrides):
        return preflight(compose(["reference=model", f"paths.output_dir={tmp_path}", *overrides], tmp_path))

    def error(*overrides):
        with pytest.raises(UserError) as err:
            run(*overrides)
        assert "\n" not in str(err.value)
        return str(err.value)

    assert error() == (
        "reference=model needs reference.name_or_path=<folder or hub id> (the reference checkpoint)"
    )
    # A hub id keeps the hub path (offline here: not cached, so refused with the fix).
    assert error("reference.name_or_path=org/sft-model").startswith(
        "reference.name_or_path='org/sft-model' is a hub id, the hub is offline"
    )
    assert "does not exist" in error(f"reference.name_or_path={tmp_path / 'nope'}")
    assert error(f"reference.name_or_path={folders / 'sft'}", "data.max_length=300") == (
        "data.max_length=300 is longer than the reference's context (256 positions): set data.max_length<=256"
    )
    good = f"reference.name_or_path={folders / 'sft'}"
    assert run(good, "data.max_length=128") is None  # a good folder passes
