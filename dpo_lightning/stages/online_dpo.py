"""Online DPO: the policy samples, a reward scores, pairs form and train in the same step.

Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback"
(https://arxiv.org/abs/2402.04792); with the reference refreshed to the policy every N steps
(``reference=iterative``), iterative DPO (Xiong et al. 2024, https://arxiv.org/abs/2312.11456).

    dpo-train stage=online_dpo                                     # built-in prompts, VADER reward
    dpo-train stage=online_dpo data=prompts data.path=prompts.jsonl online/reward=reward_model \\
        online.reward.path=<stage=reward_model run>/hf_model model=hf model.name_or_path=<sft>
    dpo-train stage=online_dpo reference=iterative reference.sync_steps=64  # iterative DPO
    dpo-train stage=online_dpo trainer=ddp_cpu                     # each rank samples its prompts

Each batch of N prompts (``data=prompts``) becomes a training batch before any callback sees it
(:meth:`OnlineDPOModule.on_after_batch_transfer`): K completions per prompt are sampled from the
current policy (``online.generation``, no grad, seeded per step), decoded, scored by
``online.reward`` as prompt + completion in one call, turned into pairs by ``online.pairing``
(ties make no pair and are counted) and collated by the engine's collator: one example per
prompt with its K completions, so every completion is forwarded once and the loss reads pairs
through the index API (``chosen_idx`` / ``rejected_idx``) exactly as offline DPO does. The step
itself is :class:`~dpo_lightning.stages.dpo.DPOModule`'s loss, reference strategy and metrics.

Supports / assumptions: any loss of the family and any reference strategy that can score new
samples (``copy``, ``sync``/``iterative``, ``adapter``; not ``precomputed``); both engines; DDP
and FSDP2 (``synced_gpus`` generation when sharded). Under data parallelism the loss is the sum
over every rank's pairs divided by the global pair count, and every logged value is reduced over
ranks; a step with no pair anywhere makes no optimizer update. The sampling seed is a
function of (``seed``, rank, batches sampled), the counter is in the checkpoint: a resumed run
samples what the uninterrupted one did. ``train/online/kl`` is the Monte-Carlo
KL(π‖π_ref) of the samples (nats per completion): unbiased when they are drawn from π itself
(temperature 1, no top-k/top-p), as by default.
"""

from __future__ import annotations

import hashlib
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor, nn

from dpo_lightning.data.prompts import PromptDataModule
from dpo_lightning.engine import EngineBatch, ForwardEngine
from dpo_lightning.losses import PreferenceLoss
from dpo_lightning.models.parallel import is_sharded, is_zero3_partitioned
from dpo_lightning.online.generation import GenerationBackend, HFGeneration, Samples, eos_token_ids
from dpo_lightning.online.pairing import AllPairs, Pairing, PromptPairs, sequence_ids
from dpo_lightning.online.rewards import Reward
from dpo_lightning.reference import ReferenceStrategy
from dpo_lightning.run.errors import UserError
from dpo_lightning.stages.base import model_flops_per_token
from dpo_lightning.stages.dpo import DPOModule
from dpo_lightning.stages.metrics import preference_metrics

#: Checkpoint key of the sampling counters.
STATE_KEY = "online_dpo"
WRONG_DATA = (
    "stage=online_dpo samples its completions and trains on prompt-only data: use "
    "data=prompts data.path=<{prompt} rows> (or data=sentiment_prompts)"
)
# Sampling in on_after_batch_transfer is this stage's design, whatever DataModule feeds it.
warnings.filterwarnings("ignore", message=r".*overridden `on_after_batch_transfer`.*")


def sampling_seed(seed: int, stage: str, rank: int, index: int) -> int:
    """A 63-bit seed for batch ``index`` of ``stage`` on ``rank``: distinct streams per rank and
    per batch, the same on every run with the same ``seed``."""
    digest = hashlib.blake2b(f"{seed}/{stage}/{rank}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass
class Rollout:
    """What sampling produced for one batch (this rank), kept next to the collated batch."""

    prompt_rows: list[int]  # (N) source rows of the prompts
    scores: Tensor  # (N, K) rewards of the samples
    pairs: PromptPairs
    samples: Samples
    prompt_tokens: int
    reward_calls: int
    started: float  # perf_counter when the rollout began (for the generation share)


class OnlineDPOModule(DPOModule):
    """Online DPO (see the module docstring).

    Args:
        policy, loss, optimizer, scheduler, reference, engine: as for
            :class:`~dpo_lightning.stages.dpo.DPOModule`.
        reward: a :class:`~dpo_lightning.online.rewards.Reward` (``online.reward``).
        tokenizer: the policy's tokenizer (decodes samples for the reward); given by ``train.py``.
        generation: a :class:`~dpo_lightning.online.generation.GenerationBackend`
            (default: the policy's ``generate``, 64 new tokens, sampling from π).
        pairing: scores → pairs (default :class:`~dpo_lightning.online.pairing.AllPairs`).
        num_samples: K ≥ 2 completions per prompt.
        seed: base of the sampling seeds.
        pad_to_multiple_of: passed to the engine's collator (``data.pad_to_multiple_of``).
    """

    def __init__(
        self,
        policy: nn.Module,
        loss: PreferenceLoss,
        optimizer: Callable[..., torch.optim.Optimizer],
        reward: Reward,
        tokenizer: Any = None,
        generation: GenerationBackend | None = None,
        pairing: Pairing | None = None,
        num_samples: int = 4,
        scheduler: Callable[..., Any] | None = None,
        reference: ReferenceStrategy | None = None,
        engine: ForwardEngine | None = None,
        seed: int = 0,
        pad_to_multiple_of: int | None = None,
    ) -> None:
        if num_samples < 2:
            raise UserError(f"online.k={num_samples}: a pair needs at least 2 completions per prompt")
        if tokenizer is None:
            raise ValueError("OnlineDPOModule needs the policy's tokenizer (train.py passes it)")
        super().__init__(policy, loss, optimizer, scheduler, reference, engine, tokenizer=tokenizer)
        if not self.reference.live:
            raise UserError(
                f"reference={type(self.reference).__name__} only knows the data set's rows, and "
                "online DPO scores new samples every step: use reference=copy (or iterative/sync/adapter)"
            )
        self.reward, self.tokenizer, self.k, self.seed = reward, tokenizer, num_samples, seed
        self.generation = generation or HFGeneration()
        self.pairing = pairing or AllPairs()
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_token_id = pad
        self.eos_ids = eos_token_ids(policy, tokenizer.eos_token_id)
        self.collate = self.engine.collator(pad, "right", pad_to_multiple_of)
        #: Batches sampled / reward evaluations made, by stage: the sampling seeds' counter and
        #: the budget; checkpointed.
        self.counters = {"train_batches": 0, "train_reward_calls": 0, "val_reward_calls": 0}
        self._val_batches = 0
        self._step_pairs = 0  # pairs (all ranks) in the micro-batches of the current step
        self.batch_started_at: float | None = None  # when the current training batch's sampling began

    # -- set-up -------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        if datamodule is not None and not isinstance(datamodule, PromptDataModule):
            raise UserError(WRONG_DATA)  # before the reference pass or any sampling
        super().setup(stage)
        self.reward.prepare(self.trainer.strategy.root_device)

    def on_validation_epoch_start(self) -> None:
        self._val_batches = 0  # every validation samples with the same seeds

    # -- sampling: prompts -> the training batch, before any callback sees it --------------------
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> dict[str, Any]:
        if not isinstance(batch, dict) or "prompt_ids" not in batch:
            raise UserError(WRONG_DATA)
        training = self.trainer.training
        key = "train" if training else "val"
        index = self.counters["train_batches"] if training else self._val_batches
        seed = sampling_seed(self.seed, key, self.global_rank, index)
        if training:  # sampling is part of the training batch's time (RunTotals reads this)
            self.batch_started_at = time.perf_counter()
        collated = self.rollout(batch, key, seed)
        if training:
            self.counters["train_batches"] += 1
        else:
            self._val_batches += 1
        return collated

    def rollout(self, batch: dict[str, Any], stage: str, seed: int) -> dict[str, Any]:
        """Sample K completions per prompt, score and pair them, collate: the training batch
        (the engine's layout, on this module's device) with its :class:`Rollout` under
        ``"rollout"``."""
        started = time.perf_counter()
        prompts, rows = batch["prompt_ids"], batch["prompt_row_ids"].tolist()
        with self.trainer.precision_plugin.forward_context():
            samples = self.generation.generate(
                self.policy, prompts, self.k, seed, self.pad_token_id, self.eos_ids, self._synced_gpus()
            )
        prompt_texts = self.tokenizer.batch_decode(prompts, skip_special_tokens=True)
        flat = self.tokenizer.batch_decode(
            [c for cs in samples.completion_ids for c in cs], skip_special_tokens=True
        )
        completion_texts = [flat[i : i + self.k] for i in range(0, len(flat), self.k)]
        scores = self.reward.score(prompt_texts, completion_texts)  # (N, K), one batched call
        pairs = self.pairing(scores, sequence_ids(samples.completion_ids))
        per_prompt = pairs.per_prompt(len(prompts))
        examples = [
            {"prompt_ids": p, "completion_ids": c, "pairs": pp, "row_id": r}
            for p, c, pp, r in zip(prompts, samples.completion_ids, per_prompt, rows, strict=True)
        ]
        calls = self.reward.calls(len(prompts), self.k)
        self.counters[f"{stage}_reward_calls"] += calls
        collated = move_data_to_device(self.collate(examples), self.device)
        prompt_tokens = sum(len(p) for p in prompts)
        collated["rollout"] = Rollout(rows, scores, pairs, samples, prompt_tokens, calls, started)
        return collated

    def _synced_gpus(self) -> bool:
        # Sharded weights are gathered in every forward: all ranks must step together.
        sharded = is_sharded(self.policy) or is_zero3_partitioned(self.policy)
        return sharded and self.trainer.world_size > 1

    # -- the step -------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)  # the training forward's FLOPs
        rollout: Rollout = batch["rollout"]
        # Generation reads the policy once per prompt token of each of the K rows (prefill) and
        # once per generated token (the KV cache holds the rest).
        read = self.k * rollout.prompt_tokens + rollout.samples.num_tokens
        params = sum(p.numel() for p in self.policy.parameters())
        self.flops_per_batch += model_flops_per_token(params, training=False) * read
        return loss

    def on_train_batch_end(self, outputs: Any, batch: dict[str, Any], batch_idx: int) -> None:
        rollout: Rollout = batch["rollout"]
        # Share of the whole step (sampling, scoring, forward, backward, optimizer) spent sampling.
        fraction = rollout.samples.seconds / max(time.perf_counter() - rollout.started, 1e-9)
        self.log("train/online/gen_fraction", fraction, on_step=True, sync_dist=True, batch_size=1)

    def _shared_step(self, batch: dict[str, Any], stage: str) -> Tensor:
        rollout: Rollout = batch["rollout"]
        shared = EngineBatch(batch, outputs=self.policy_outputs)
        policy = self(shared)  # (B,) every sampled completion, forwarded once
        reference = self.reference_stats(shared)
        ci, ri = batch["chosen_idx"], batch["rejected_idx"]
        local_pairs = int(ci.numel())
        sums = self._sample_sums(rollout, policy.logps, None if reference is None else reference.logps)
        mean_length = self.mean_chosen_length(policy, ci)  # collective: with or without pairs here
        if local_pairs:
            losses, chosen_rewards, rejected_rewards = self.pair_losses(
                policy, reference, ci, ri, mean_length
            )
            metrics = self.pair_metrics(losses, chosen_rewards, rejected_rewards, policy, ci, ri)
            sums |= {f"pair/{k}": v.detach().double() * local_pairs for k, v in metrics.items()}
        else:
            losses = policy.logps.new_zeros(0)
            sums |= {f"pair/{k}": 0.0 for k in self._pair_metric_names()}
        total = self._reduce(sums)
        self._log(total, stage)
        global_pairs = total["pairs"]
        if stage == "train":
            self._step_pairs += int(global_pairs)  # 0 after every micro-batch: no update
        # Σ of this rank's pair losses over the global pair count, times the ranks whose
        # gradients DDP/FSDP average: the update is the mean over every pair of the step.
        loss = losses.sum() * self.trainer.world_size / max(global_pairs, 1)
        if not local_pairs:  # no pair here: still in the collective backward, with zero gradients
            loss = loss + 0.0 * policy.logps.sum()
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # A step with no pair on any rank carries no signal: drop its (zero) gradients so the
        # optimizer leaves every parameter alone (AdamW's momentum and weight decay would move
        # them). Lightning refuses a skipped training_step under DDP; every rank agrees here.
        if self._step_pairs == 0:
            optimizer.zero_grad(set_to_none=True)
            self.log("train/grad_norm", 0.0, on_step=True)  # the gradient was zero
        else:
            super().on_before_optimizer_step(optimizer)
        self._step_pairs = 0

    # -- metrics, reduced over ranks ------------------------------------------------------------
    def _sample_sums(self, rollout: Rollout, pi_logps: Tensor, ref_logps: Tensor | None) -> dict[str, Any]:
        """This rank's sums and counts; their global sums give exact global means."""
        scores = rollout.scores.double()
        sums: dict[str, Any] = {
            "completions": scores.numel(),
            "pairs": rollout.pairs.chosen.numel(),
            "ties": rollout.pairs.ties,
            "reward_sum": scores.sum(),
            "reward_sq": (scores**2).sum(),
            "gen_tokens": rollout.samples.num_tokens,
            "clipped": rollout.samples.clipped,
            "gen_tokens_per_s": rollout.samples.num_tokens / max(rollout.samples.seconds, 1e-9),
            "reward_calls": self.counters["train_reward_calls"],
        }
        if ref_logps is not None:  # Monte-Carlo KL(π‖π_ref): the samples are drawn from π
            sums["kl_sum"] = (pi_logps.detach() - ref_logps).double().sum()
        return sums

    @staticmethod
    def _pair_metric_names() -> list[str]:
        one = torch.ones(1)
        return list(preference_metrics(one, one, one, one, one, one, one, one, one))

    def _reduce(self, sums: dict[str, Any]) -> dict[str, float]:
        """Every value summed over ranks, in one collective (identity on one process)."""
        keys = list(sums)
        vec = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64).to(self.device) for k in keys])
        total = self.trainer.strategy.reduce(vec, reduce_op="sum")
        return dict(zip(keys, total.tolist(), strict=True))

    def _log(self, total: dict[str, float], stage: str) -> None:
        n, pairs = total["completions"], total["pairs"]
        mean = total["reward_sum"] / n
        samples = {
            "online/reward_mean": mean,
            "online/reward_std": max(total["reward_sq"] / n - mean**2, 0.0) ** 0.5,
            "online/pairs": pairs,
            "online/ties": total["ties"],
            "online/completion_tokens": total["gen_tokens"] / n,
            "online/clipped": total["clipped"] / n,
            "online/gen_tokens_per_s": total["gen_tokens_per_s"],  # job-wide: summed over ranks
        }
        if "kl_sum" in total:
            samples["online/kl"] = total["kl_sum"] / n
        pair = {k[5:]: v / pairs for k, v in total.items() if k.startswith("pair/")} if pairs else {}
        if stage == "train":
            # Lightning re-logs a key's last value on a step that does not log it: a step with
            # no pair logs NaN (no value), not the previous step's.
            pair = pair or {k[5:]: math.nan for k in total if k.startswith("pair/")}
            samples["online/reward_calls"] = total["reward_calls"]  # cumulative, every rank
            self._log_values(samples | pair, stage, on_step=True, batch_size=1)
        else:  # epoch means weighted by completions (sample metrics) and by pairs (pair metrics)
            self._log_values(samples, stage, on_step=False, batch_size=int(n))
            if pair:
                self._log_values(pair, stage, on_step=False, batch_size=int(pairs))
        if pairs:
            acc, sync = pair["rewards/accuracies"], stage != "train"
            self.log(f"{stage}/acc", acc, prog_bar=True, logger=False, batch_size=1, sync_dist=sync)

    def _log_values(self, values: dict[str, float], stage: str, on_step: bool, batch_size: int) -> None:
        # Already global: every rank logs the same numbers (the epoch-end sync of validation
        # means is then a no-op average).
        self.log_dict(
            {f"{stage}/{k}": v for k, v in values.items()},
            on_step=on_step,
            on_epoch=not on_step,
            sync_dist=not on_step,
            batch_size=batch_size,
        )

    # -- checkpoints: the sampling counters ---------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[STATE_KEY] = dict(self.counters)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.counters.update(checkpoint.get(STATE_KEY) or {})
