"""stage=online_dpo in process: its own samples train, seeded and reproducible; pairs reach the
index loss; the policy's generation settings; references; refusals."""

from __future__ import annotations

import copy
import functools

import lightning as L
import pytest
import torch

from dpo_lightning.data.prompts import PromptDataModule, sentiment_prompts
from dpo_lightning.engine import EngineBatch, PackedEngine, PaddedEngine
from dpo_lightning.losses import DPOLoss, IPOLoss, RPOLoss, SimPOLoss, dpo_loss
from dpo_lightning.online.generation import GenerationBackend, HFGeneration, Samples, split_at_eos
from dpo_lightning.online.rewards import TextReward
from dpo_lightning.reference import NoReference, PrecomputedReference, SyncReference
from dpo_lightning.run.errors import UserError
from dpo_lightning.stages.online_dpo import OnlineDPOModule, sampling_seed
from tests.conftest import make_tiny_model
from tests.online_fakes import FixedScores, constant_score, length_score, negative_length_score


def adamw(params):
    return torch.optim.AdamW(params, lr=1e-2)


def online_module(tokenizer, reward=None, seed=0, **kw):
    policy = make_tiny_model(len(tokenizer), seed=seed)
    return OnlineDPOModule(
        policy=policy,
        loss=kw.pop("loss", DPOLoss(0.5)),
        optimizer=adamw,
        reward=reward or TextReward(length_score),
        tokenizer=tokenizer,
        generation=kw.pop("generation", HFGeneration(max_new_tokens=8)),
        num_samples=kw.pop("num_samples", 3),
        **kw,
    )


@pytest.fixture(scope="module")
def prompts(tokenizer):
    dm = PromptDataModule(
        tokenizer,
        generator=functools.partial(sentiment_prompts, n=40),
        batch_size=4,
        eval_batch_size=4,
        val_fraction=0.1,
        max_length=64,
    )
    dm.setup("fit")
    return dm


def quick_trainer(steps: int) -> L.Trainer:
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


def attached(module):
    """The module with a trainer to read (precision, strategy) and logging recorded, not run."""
    module.trainer = quick_trainer(1)
    module.logged = {}
    module.log = lambda name, value, **kw: module.logged.__setitem__(name, value)
    module.log_dict = lambda values, **kw: module.logged.update(values)
    return module


def first_batch(dm):
    return next(iter(dm.train_dataloader()))


class FixedGeneration(GenerationBackend):
    """Returns the given completions (a stand-in for sampling)."""

    max_new_tokens = 8

    def __init__(self, completions):
        self.completions = completions

    def generate(self, model, prompt_ids, k, seed, pad_token_id, eos_token_ids, synced_gpus=False):
        chosen = self.completions[: len(prompt_ids)]
        return Samples(chosen, sum(len(c) for cs in chosen for c in cs), 0, 1e-3)


def weights(module):
    return [p.detach().clone() for p in module.policy.parameters()]


# ---- the pairs of a rollout reach the index loss ---------------------------------------------
@pytest.mark.parametrize("engine", [PaddedEngine(), PackedEngine(chunk_size=16)])
def test_rollout_pairs_k3_reach_the_index_loss(tokenizer, prompts, engine):
    """Known scores (the hand-worked K=3 case of test_online_pairing) → those index pairs in the
    collated batch, and the stage's loss is ``dpo_loss`` on the forwarded completions."""
    ids = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in (" great", " bad", " fine", " dull")]
    eos = tokenizer.eos_token_id
    completions = [[[*ids[0], eos], [*ids[1], eos], [*ids[2], eos]], [[*ids[3], eos], ids[1], [*ids[0], eos]]]
    reward = FixedScores([[0.5, -0.2, 0.5], [1.0, 2.0, 3.0]])
    module = attached(
        online_module(tokenizer, reward, generation=FixedGeneration(completions), engine=engine)
    )
    with torch.no_grad():  # the policy moves away from its frozen reference copy
        for p in module.policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    prompt_batch = first_batch(prompts)
    prompt_batch = {
        **prompt_batch,
        "prompt_ids": prompt_batch["prompt_ids"][:2],
        "prompt_row_ids": prompt_batch["prompt_row_ids"][:2],
    }
    batch = module.rollout(prompt_batch, "train", seed=0)
    assert batch["chosen_idx"].tolist() == [0, 2, 4, 5, 5]
    assert batch["rejected_idx"].tolist() == [1, 1, 3, 3, 4]
    assert batch["rollout"].pairs.ties == 1 and batch["num_completions"] == 6
    texts = reward.seen[0][1]  # the reward saw the decoded samples
    assert texts[0] == [" great", " bad", " fine"] and texts[1][1] == " bad"
    loss = module._shared_step(batch, "train")
    shared = EngineBatch(batch)
    with torch.no_grad():
        pi = module.engine(module.policy, shared).logps
        ref = module.engine(module.reference_model, shared).logps
    expected, _ = dpo_loss(pi, ref, batch["chosen_idx"], batch["rejected_idx"], beta=0.5)
    torch.testing.assert_close(loss, expected.mean())
    assert module.logged["train/online/pairs"] == 5 and module.logged["train/online/ties"] == 1
    torch.testing.assert_close(
        torch.tensor(module.logged["train/online/kl"]), (pi - ref).double().mean().float()
    )
    assert module.logged["train/online/reward_mean"] == pytest.approx(reward.scores.mean().item())


# ---- sampling: seeded, reproducible, from the current policy --------------------------------
def test_sampling_is_seeded_reproducible_and_leaves_the_run_rng_alone(tokenizer, prompts):
    module = attached(online_module(tokenizer))
    batch = first_batch(prompts)
    rng = torch.get_rng_state()
    a = module.rollout(batch, "train", seed=11)["rollout"].samples.completion_ids
    b = module.rollout(batch, "train", seed=11)["rollout"].samples.completion_ids
    c = module.rollout(batch, "train", seed=12)["rollout"].samples.completion_ids
    assert torch.equal(torch.get_rng_state(), rng)  # dropout / shuffling streams untouched
    assert a == b and a != c
    assert len(a) == 4 and all(len(cs) == 3 for cs in a)
    assert module.policy.training  # back in train mode after sampling in eval mode
    seeds = {sampling_seed(0, s, r, i) for s in ("train", "val") for r in (0, 1) for i in range(3)}
    assert len(seeds) == 12  # one stream per (stage, rank, batch)


def test_samples_come_from_the_current_policy(tokenizer, prompts):
    module = attached(online_module(tokenizer))
    batch = first_batch(prompts)
    before = module.rollout(batch, "train", seed=3)["rollout"].samples.completion_ids
    with torch.no_grad():
        module.policy.get_output_embeddings().weight.mul_(3.0)  # a sharper, different policy
    after = module.rollout(batch, "train", seed=3)["rollout"].samples.completion_ids
    assert before != after  # same seed, new weights: new samples (not a fixed set)


def fit(module, dm, steps):
    L.seed_everything(0)
    quick_trainer(steps).fit(module, datamodule=dm)
    return module


def test_the_reward_of_the_samples_decides_the_update(tokenizer, prompts):
    """One step from the same start and the same samples: rewarding length or its opposite
    gives different updates, and a reward with no preference (all ties) gives none."""
    start = weights(online_module(tokenizer))
    longer = weights(fit(online_module(tokenizer, TextReward(length_score)), prompts, 1))
    shorter = weights(fit(online_module(tokenizer, TextReward(negative_length_score)), prompts, 1))
    ties = fit(online_module(tokenizer, TextReward(constant_score)), prompts, 2)
    assert any(not torch.equal(a, b) for a, b in zip(longer, shorter, strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(longer, start, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(weights(ties), start, strict=True))  # no signal, no step
    assert ties.counters["train_batches"] == 2 and ties.counters["train_reward_calls"] == 2 * 4 * 3


def test_longer_samples_are_preferred_after_training(tokenizer, prompts):
    """The direction: training on length-rewarded pairs makes the chosen (longer) samples more
    likely relative to the rejected ones — the implicit reward margin becomes positive."""
    module = fit(online_module(tokenizer, TextReward(length_score)), prompts, 6)
    metrics = quick_trainer(1).validate(module, datamodule=prompts, verbose=False)[0]
    assert metrics["val/rewards/margins"] > 0 and metrics["val/rewards/accuracies"] > 0.5


# ---- generation ------------------------------------------------------------------------------
def test_split_at_eos_cuts_after_the_first_eos_and_counts_clipped():
    new = torch.tensor([[5, 2, 7, 7], [5, 6, 7, 8], [2, 0, 0, 0], [9, 3, 2, 2]])
    grouped, tokens, clipped = split_at_eos(new, eos_ids=[2, 3], k=2)
    assert grouped == [[[5, 2], [5, 6, 7, 8]], [[2], [9, 3]]]
    assert tokens == 2 + 4 + 1 + 2 and clipped == 1


def test_batched_left_padded_generation_equals_one_prompt_at_a_time(tokenizer):
    """Left padding and the KV cache change nothing: greedy rows (top_k=1) are the same batched
    with prompts of other lengths as alone."""
    model = make_tiny_model(len(tokenizer), seed=1)
    gen = HFGeneration(max_new_tokens=6, top_k=1)
    prompts = [
        tokenizer(t)["input_ids"] for t in ("Review of Iron Valley:", "My thoughts", "What did you think")
    ]
    args = (1, tokenizer.pad_token_id, [tokenizer.eos_token_id])
    widths = []
    forward = model.forward
    model.forward = lambda *a, **kw: widths.append(kw["input_ids"].shape[1]) or forward(*a, **kw)
    together = gen.generate(model, prompts, 2, *args).completion_ids
    assert widths[0] == max(len(p) for p in prompts) and set(widths[1:]) == {1}  # KV cache: 1 new token
    model.forward = forward
    alone = [gen.generate(model, [p], 2, *args).completion_ids[0] for p in prompts]
    assert together == alone
    assert all(a == b for a, b in together)  # greedy: the K rows agree


def test_the_policys_generation_config_is_respected(tokenizer):
    model = make_tiny_model(len(tokenizer), seed=1)
    from dpo_lightning.online.generation import eos_token_ids

    model.generation_config.eos_token_id = [7, tokenizer.eos_token_id]
    assert eos_token_ids(model, tokenizer.eos_token_id) == sorted({7, tokenizer.eos_token_id})
    model.generation_config.top_k = 1  # the policy's own setting: greedy
    prompt = [tokenizer("Review of Iron Valley:")["input_ids"]]
    args = (tokenizer.pad_token_id, [tokenizer.eos_token_id])
    deferring = HFGeneration(max_new_tokens=6, top_k=None)  # null: the policy's value
    assert deferring.generate(model, prompt, 2, 1, *args).completion_ids == (
        deferring.generate(model, prompt, 2, 2, *args).completion_ids
    )
    overriding = HFGeneration(max_new_tokens=6, top_k=0)  # the config's value wins over the policy's
    assert overriding.generate(model, prompt, 4, 1, *args).completion_ids != (
        overriding.generate(model, prompt, 4, 2, *args).completion_ids
    )


# ---- references and losses -------------------------------------------------------------------
def test_iterative_reference_is_the_policy_after_each_refresh(tokenizer, prompts):
    module = online_module(tokenizer, reference=SyncReference(alpha=1.0, sync_steps=2))
    fit(module, prompts, 2)
    for r, p in zip(module.reference_model.parameters(), module.policy.parameters(), strict=True):
        assert torch.equal(r, p)
    batch = module.rollout(first_batch(prompts), "train", seed=0)
    shared = EngineBatch(batch)
    with torch.no_grad():
        kl = module(shared).logps - module.reference_stats(shared).logps
    assert torch.equal(kl, torch.zeros_like(kl))  # refreshed: KL(π‖π_ref) restarts at 0


@pytest.mark.parametrize(
    ("loss", "reference"),
    [(IPOLoss(0.5), None), (RPOLoss(0.1, alpha=1.0), None), (SimPOLoss(), NoReference())],
)
def test_any_loss_of_the_family_trains_on_the_samples(tokenizer, prompts, loss, reference):
    """Length-normalised (IPO), with an NLL term (RPO), reference-free (SimPO: no KL to log)."""
    module = attached(online_module(tokenizer, loss=loss, reference=reference))
    batch = module.rollout(first_batch(prompts), "train", seed=0)
    out = module._shared_step(batch, "train")
    out.backward()
    assert torch.isfinite(out) and any(p.grad is not None for p in module.policy.parameters())
    assert ("train/online/kl" in module.logged) == (reference is None)


def test_run_totals_count_the_sampling_time(tokenizer, prompts):
    """summary.json's rates divide by the whole step, sampling included (it happens before the
    callbacks' batch start)."""
    import time

    from dpo_lightning.reporting.throughput import RunTotals

    class SlowGeneration(FixedGeneration):
        def generate(self, *args, **kwargs):
            time.sleep(self.pause)
            return super().generate(*args, **kwargs)

    class ClockCheck(L.Callback):  # runs after RunTotals' batch start
        def __init__(self):
            self.starts: list[tuple[float, float]] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.starts.append((totals._t0, pl_module.batch_started_at))

    eos = tokenizer.eos_token_id
    slow = SlowGeneration([[[5, eos], [6, eos], [7, eos]]] * 4)
    slow.pause = 0.5
    module = online_module(tokenizer, FixedScores([[1.0, 2.0, 3.0]] * 4), generation=slow)
    totals, check = RunTotals(), ClockCheck()
    trainer = quick_trainer(2)
    trainer.callbacks += [totals, check]
    trainer.fit(module, datamodule=prompts)
    assert len(check.starts) == 2 and all(t0 == began for t0, began in check.starts)
    assert totals.train_seconds >= 2 * 0.5 and totals.total_pairs == 2 * 4 * 3


def test_refusals_are_one_line(tokenizer, tmp_path):
    with pytest.raises(UserError, match=r"online\.k=1"):
        online_module(tokenizer, num_samples=1)
    with pytest.raises(UserError, match="reference=PrecomputedReference only knows the data set"):
        online_module(tokenizer, reference=PrecomputedReference(cache_dir=str(tmp_path)))


def test_preference_batches_are_refused_and_prompt_batches_refuse_offline_stages(tokenizer, prompts):
    from dpo_lightning.data.datamodule import PreferenceDataModule
    from dpo_lightning.data.synthetic import sentiment_pairs
    from dpo_lightning.stages.dpo import DPOModule

    module = attached(online_module(tokenizer))
    pairs = PreferenceDataModule(tokenizer, generator=lambda: sentiment_pairs(20), val_fraction=0.2)
    pairs.setup("fit")
    with pytest.raises(UserError, match=r"stage=online_dpo samples its completions.*data=prompts"):
        module.on_after_batch_transfer(next(iter(pairs.train_dataloader())), 0)
    offline = DPOModule(copy.deepcopy(module.policy), DPOLoss(), optimizer=adamw)
    with pytest.raises(UserError, match=r"holds prompts only.*stage=online_dpo"):
        offline.training_step(first_batch(prompts), 0)
