"""A Lightning callback that shows what the policy writes while it trains.

Every ``every_n_validations`` validation runs it samples one completion for each of the first
``num_prompts`` distinct validation prompts, scores prompt + completion with a reward function
and logs ``val/gen_reward`` and, when the stage holds a frozen reference model
(:attr:`~dpo_lightning.stages.base.PolicyModule.reference_model`),
``val/gen_kl`` (the samples' mean ``log π − log π_ref``, nats). Loggers with a ``log_table``
method (W&B's ``WandbLogger``) also get a table (step, prompt, completion, reward, log_ratio).

    dpo-train callbacks=generation                   # conf/callbacks/generation.yaml (VADER)
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from dpo_lightning.sentiment.evaluate import sample_and_score
from dpo_lightning.sentiment.rewards import RewardFunction


class GenerationLogger(L.Callback):
    """Sample, score and log a few validation prompts during training.

    Args:
        reward: a :class:`~dpo_lightning.sentiment.rewards.RewardFunction`.
        every_n_validations: run at the 1st, (N+1)th, (2N+1)th... validation.
        num_prompts: distinct validation prompts sampled (one completion each).
        max_new_tokens: completion length cap.
        seed: sampling seed (the global RNG is forked, so training randomness is unchanged).
        table_key: name of the logged table.
    """

    def __init__(
        self,
        reward: RewardFunction,
        every_n_validations: int = 1,
        num_prompts: int = 8,
        max_new_tokens: int = 32,
        seed: int = 0,
        table_key: str = "val/generations",
    ) -> None:
        self.reward = reward
        self.every = every_n_validations
        self.num_prompts, self.max_new_tokens = num_prompts, max_new_tokens
        self.seed, self.table_key = seed, table_key
        self._validations = 0

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._validations += 1
        if (self._validations - 1) % self.every:
            return
        dm = trainer.datamodule
        prompt_ids = first_distinct(dm.val_set["prompt_ids"], self.num_prompts)
        prompts = [dm.tokenizer.decode(p, skip_special_tokens=True) for p in prompt_ids]
        policy, reference = pl_module.policy, pl_module.reference_model
        was_training = policy.training
        with torch.random.fork_rng(devices=[]):
            res = sample_and_score(
                policy,
                reference,
                dm.tokenizer,
                prompts,
                prompt_ids,
                self.reward,
                k=1,
                max_new_tokens=self.max_new_tokens,
                seed=self.seed,
            )
        policy.train(was_training)
        pl_module.log("val/gen_reward", res.reward, on_epoch=True, batch_size=len(prompts))
        if reference is not None:
            pl_module.log("val/gen_kl", res.kl, on_epoch=True, batch_size=len(prompts))
        rows = [
            [trainer.global_step, p, c[0], float(r), float(lr)]
            for p, c, r, lr in zip(
                prompts, res.completions, res.rewards[:, 0], res.log_ratios[:, 0], strict=True
            )
        ]
        for logger in trainer.loggers:
            if hasattr(logger, "log_table") and trainer.is_global_zero:
                logger.log_table(
                    key=self.table_key,
                    columns=["step", "prompt", "completion", "reward", "log_ratio"],
                    data=rows,
                )

    def state_dict(self) -> dict[str, Any]:
        return {"validations": self._validations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._validations = state_dict["validations"]


def first_distinct(seqs: list[list[int]], n: int) -> list[list[int]]:
    """The first ``n`` distinct sequences, in order (K-wise data repeats a prompt per pair)."""
    seen, out = set(), []
    for s in seqs:
        key = tuple(s)
        if key not in seen:
            seen.add(key)
            out.append(list(s))
        if len(out) == n:
            break
    return out
