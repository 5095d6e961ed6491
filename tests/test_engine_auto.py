"""``engine=auto`` (the default) and what the packed engine supports: soft-capped Gemma-2,
sliding windows, token metrics equal to the naive computation, the reference in inference mode."""

from __future__ import annotations

import logging
import pickle

import pytest
import torch
from hydra.utils import instantiate

from dpo_lightning.data.collate import PreferenceCollator
from dpo_lightning.engine import AutoEngine, EngineBatch, PackedEngine, PaddedEngine, UnsupportedLayout
from dpo_lightning.engine.doc_attention import packed_layout, packed_positions
from dpo_lightning.engine.logps import TOKEN_METRICS
from dpo_lightning.losses import DPOLoss
from dpo_lightning.models.loading import load_causal_lm
from dpo_lightning.reference import PrecomputedReference
from dpo_lightning.stages import DPOModule
from dpo_lightning.stages.metrics import token_metrics
from tests.conftest import compose, make_tiny_model
from tests.test_engine import V, _examples

METRICS = frozenset({TOKEN_METRICS})

RANK_ZERO = "lightning.pytorch.utilities.rank_zero"


def _dpo(model, engine, **kwargs):
    sgd = lambda p: torch.optim.SGD(p, lr=0.1)  # noqa: E731
    return DPOModule(model, DPOLoss(beta=0.1), optimizer=sgd, engine=engine, **kwargs)


def _gemma2(**overrides):
    """A tiny Gemma-2: final logits soft-capped at 2, attention scores at 1, every other layer a
    sliding window of 3 positions; weights large enough (init 0.3) that each of them matters."""
    config = dict(
        model_type="gemma2",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        query_pre_attn_scalar=8,
        final_logit_softcapping=2.0,
        attn_logit_softcapping=1.0,
        sliding_window=3,
        max_position_embeddings=256,
        initializer_range=0.3,
    )
    return load_causal_lm(config=config | overrides, vocab_size=V, attn_implementation="eager")


def test_default_config_resolves_to_packed_for_the_tiny_model(tmp_path, caplog, tokenizer):
    """``engine`` defaults to auto; built for the default tiny model and DPO stage it is the
    packed engine, said in one logged line."""
    from dpo_lightning.train import build_module

    cfg = compose([], tmp_path)
    engine = instantiate(cfg.engine)
    assert isinstance(engine, AutoEngine)
    collate = engine.collator(0)  # the DataModule asks first: built on the first batch
    with caplog.at_level(logging.INFO, logger=RANK_ZERO):
        module = build_module(cfg, tokenizer, engine)
    assert isinstance(module.engine, PackedEngine) and engine.choice() is module.engine
    assert [r.message for r in caplog.records if r.message.startswith("engine=auto")] == [
        "engine=auto: packed rows (padding-free, prefix sharing, chunked LM head)"
    ]
    batch = collate(_examples())
    assert "logit_index" in batch and batch["input_ids"].shape[0] == 1  # one packed row


def _built(overrides, tmp_path, tokenizer, caplog):
    """The stage ``train.py`` builds for ``overrides`` (its DataModule asked for the collator
    first), and the ``engine=auto`` lines it logged."""
    from dpo_lightning.train import build_module

    cfg = compose(overrides, tmp_path)
    engine = instantiate(cfg.engine)
    engine.collator(0, cfg.data.padding_side)
    with caplog.at_level(logging.INFO, logger=RANK_ZERO):
        module = build_module(cfg, tokenizer, engine)
    return module, [r.message for r in caplog.records if r.message.startswith("engine=auto")]


def test_config_that_needs_padded_rows_falls_back_with_one_line(tmp_path, caplog, tokenizer):
    module, lines = _built(["data.padding_side=left"], tmp_path, tokenizer, caplog)
    assert isinstance(module.engine, PaddedEngine)
    why = "data.padding_side='left' (one packed row has no padding side)"
    assert lines == [f"engine=auto: padded rows, because {why}"]


def test_precomputed_reference_keeps_the_packed_engine(tmp_path, caplog, tokenizer):
    """The precomputed cache is keyed by completion content, not padded rows: auto stays packed."""
    module, lines = _built(["reference=precomputed"], tmp_path, tokenizer, caplog)
    assert isinstance(module.engine, PackedEngine) and lines[0].startswith("engine=auto: packed rows")
    by_hand = _dpo(make_tiny_model(V), PackedEngine(), reference=PrecomputedReference())
    assert isinstance(by_hand.engine, PackedEngine)


def test_reward_model_stage_falls_back_and_packed_is_refused(tokenizer, caplog):
    from dpo_lightning.stages.reward_model import RewardModelModule

    with caplog.at_level(logging.INFO, logger=RANK_ZERO):
        module = RewardModelModule(make_tiny_model(len(tokenizer)), optimizer=None, engine=AutoEngine())
    assert isinstance(module.engine, PaddedEngine)
    assert "because stage=reward_model reads each padded row's last real token" in caplog.text
    with pytest.raises(UnsupportedLayout, match="engine=packed: stage=reward_model"):
        RewardModelModule(make_tiny_model(len(tokenizer)), optimizer=None, engine=PackedEngine())


def test_probe_catches_a_model_that_does_not_do_what_its_config_says():
    """A Llama whose config claims a final soft-cap its forward never applies: the packed engine
    would cap, the model does not — the probe batch disagrees, so auto keeps padded rows."""
    model = make_tiny_model(V)
    model.config.final_logit_softcapping = 0.1
    reason = PackedEngine().unsupported(model)
    assert reason.startswith("on a probe batch the packed log-probs differ from the padded ones")
    assert model.config._attn_implementation == "sdpa"  # switched back for the padded engine
    engine, note = AutoEngine().resolve(model)
    assert isinstance(engine, PaddedEngine) and note == f"engine=auto: padded rows, because {reason}"


def test_model_without_decoder_accessors_is_named():
    class Bare(torch.nn.Module):
        config = None

    assert "Bare has no get_decoder()" in PackedEngine().unsupported(Bare())


def test_deferred_collator_pickles_as_the_built_collator():
    engine = AutoEngine()
    collate = engine.collator(3)
    engine.resolve(make_tiny_model(V))
    clone = pickle.loads(pickle.dumps(collate))  # a spawned DataLoader worker
    assert clone.auto is None and clone(_examples())["input_ids"].shape[0] == 1


def test_gemma2_softcapped_sliding_window_packed_equals_padded():
    """Final-logit and attention soft-capping and a 3-position sliding window: the packed engine
    (per-chunk transform, per-document capped attention, windows by position) gives the padded
    engine's (eager) log-probs, token metrics and gradients."""
    model = _gemma2()
    assert PackedEngine().unsupported(model) is None  # supported now, not refused
    ex = _examples((2, 3, 2), seed=4)
    padded = PaddedEngine()(model, EngineBatch(PreferenceCollator(0)(ex), outputs=METRICS))
    engine = PackedEngine(chunk_size=5)
    batch = engine.collator(0)(ex)
    packed = engine(model, EngineBatch(batch, outputs=METRICS))
    for name in ("logps", "lengths", "mean_logits", "entropy", "top1"):
        torch.testing.assert_close(getattr(packed, name), getattr(padded, name), atol=1e-5, rtol=1e-5)
    want = torch.autograd.grad(padded.logps.sum(), list(model.parameters()))
    got = torch.autograd.grad(packed.logps.sum(), list(model.parameters()))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_packed_positions_and_sliding_window_mask_hand_worked():
    """Document [p p c1 c1 c2]: positions 0 1 2 3 2; a window of 2 keeps keys 1 position back."""
    doc = torch.tensor([1, 1, 1, 1, 1])
    branch = torch.tensor([0, 0, 1, 1, 2])
    assert packed_positions(doc, branch).tolist() == [0, 1, 2, 3, 2]
    m = packed_layout(doc, branch).mask_for(2)[0, 0].int()
    assert m.tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 1, 1, 0, 0],  # c1 at position 2 sees position 1 and itself
        [0, 0, 1, 1, 0],
        [0, 1, 0, 0, 1],  # c2 at position 2: the prompt's position 1 and itself, never c1
    ]
    b = PackedEngine().collator(0, pad_to_multiple_of=16)(_examples((2, 3), seed=5))
    assert torch.equal(packed_positions(b["doc_ids"], b["branch_ids"]), b["position_ids"][0])


@pytest.mark.parametrize("engine", [PaddedEngine(), PackedEngine(chunk_size=4)], ids=["padded", "packed"])
def test_token_metrics_equal_the_naive_full_logits_computation(engine):
    """Per completion: summed entropy and argmax hits from the model's full logits, one padded
    row at a time; then the logged metrics (TRL 1.16's definitions) from them."""
    model = make_tiny_model(V).requires_grad_(False)
    ex = _examples((2, 3, 2), seed=6)
    batch = engine.collator(0)(ex)
    stats = engine(model, EngineBatch(batch, outputs=METRICS))
    entropy, hits = [], []
    for e in ex:
        for comp in e["completion_ids"]:
            ids = torch.tensor([e["prompt_ids"] + comp])
            logits = model(input_ids=ids).logits[0, len(e["prompt_ids"]) - 1 : -1]  # predicts comp
            logp = torch.log_softmax(logits, -1)
            entropy.append(-(logp.exp() * logp).sum())
            hits.append((logits.argmax(-1) == torch.tensor(comp)).float().sum())
    torch.testing.assert_close(stats.entropy, torch.stack(entropy), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats.top1, torch.stack(hits))
    chosen = torch.unique(batch["chosen_idx"])  # the K=3 example's completion 1 is chosen and rejected
    logged = token_metrics(stats, batch["chosen_idx"])
    torch.testing.assert_close(logged["entropy"], torch.stack(entropy).sum() / stats.lengths.sum())
    torch.testing.assert_close(
        logged["mean_token_accuracy"], torch.stack(hits)[chosen].sum() / stats.lengths[chosen].sum()
    )


def test_dpo_step_logs_entropy_and_token_accuracy_and_reference_runs_in_inference_mode():
    model = make_tiny_model(V)
    engine = PackedEngine()
    module = _dpo(model, engine)
    logged, modes = {}, []
    module.log_stage = lambda metrics, *a, **k: logged.update(metrics)
    decoder = module.reference.model.get_decoder()  # what the packed engine calls
    decoder.register_forward_pre_hook(lambda *a: modes.append(torch.is_inference_mode_enabled()))
    loss = module._shared_step(engine.collator(0)(_examples()), "train")
    loss.backward()  # reference outputs are ordinary tensors: the loss may save them
    assert modes and all(modes)
    assert 0 < logged["entropy"] <= torch.log(torch.tensor(float(V))) + 1e-4
    assert 0 <= logged["mean_token_accuracy"] <= 1


def test_lora_policy_with_adapter_reference_resolves_to_packed_and_matches_padded():
    """A PEFT-wrapped policy (LoRA on attention and on the LM head, so the head is no plain
    ``nn.Linear``: checkpointed chunks) and the adapter-off reference: auto picks packed, and its
    first-step loss is the padded one."""
    from dpo_lightning.models.lora import apply_lora
    from dpo_lightning.reference import AdapterReference

    losses = {}
    for name, engine in (("auto", AutoEngine()), ("padded", PaddedEngine())):
        policy = apply_lora(make_tiny_model(V), r=4, alpha=8, target_modules=["q_proj", "v_proj", "lm_head"])
        with torch.no_grad():  # a non-zero adapter: policy and reference differ
            for n, p in policy.named_parameters():
                if "lora_B" in n:
                    p.normal_(std=0.2)
        module = _dpo(policy, engine, reference=AdapterReference())
        module.log_stage = lambda *a, **k: None
        collate = (engine.choice() if name == "auto" else engine).collator(0)
        losses[name] = module._shared_step(collate(_examples(seed=7)), "train")
        if name == "auto":
            assert isinstance(module.engine, PackedEngine)
    assert abs(losses["padded"].item() - 0.6931472) > 1e-4  # not log 2: the adapter matters
    torch.testing.assert_close(losses["auto"], losses["padded"], atol=1e-6, rtol=1e-5)
