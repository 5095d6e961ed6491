"""Reward and KL of a policy on held-out prompts, and the best-of-N reference point.

For samples y ~ π(·|x) on held-out prefixes x (temperature 1, no truncation):

* mean ground-truth reward ``E[r(x, y)]``;
* sequence-level ``KL(π‖π_ref) = E_{y~π}[log π(y|x) − log π_ref(y|x)]``, the Monte-Carlo mean
  of the samples' summed log-prob differences (nats per completion, as in the paper's Figure 2).

Best-of-N draws N samples from π_ref and keeps the one with the highest ground-truth reward; its
KL from π_ref is the closed form ``log N − (N − 1)/N`` (Stiennon et al. 2020, App. G.3), since
estimating it from samples would need the best-of-N policy's own density.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dpo_lightning.sentiment.rewards import RewardFunction
from dpo_lightning.sentiment.sampling import completion_logps, sample_completions


@dataclass
class PolicySamples:
    """Samples of a policy on N prompts, k each: texts, rewards (N, k), log-ratios (N, k)."""

    prompts: list[str]
    completions: list[list[str]]
    rewards: Tensor
    log_ratios: Tensor
    extra: dict = field(default_factory=dict)

    @property
    def reward(self) -> float:
        return float(self.rewards.mean())

    @property
    def kl(self) -> float:
        return float(self.log_ratios.mean())


def sequence_kl(policy_logps: Tensor, reference_logps: Tensor) -> Tensor:
    """Monte-Carlo KL(π‖π_ref) from summed log-probs of samples drawn from π: (...), (...) -> ()."""
    return (policy_logps - reference_logps).mean()


def best_of_n_kl(n: int) -> float:
    """KL of best-of-n sampling from its base policy: ``log n − (n − 1)/n`` nats."""
    return math.log(n) - (n - 1) / n


def best_of_n_reward(rewards: Tensor) -> float:
    """Mean over prompts of the best of the n rewards per prompt: (N, n) -> float."""
    return float(rewards.max(dim=1).values.mean())


def decode_completions(tokenizer: PreTrainedTokenizerBase, ids: list[list[list[int]]]) -> list[list[str]]:
    return [[tokenizer.decode(c, skip_special_tokens=True) for c in row] for row in ids]


def sample_and_score(
    policy: PreTrainedModel,
    reference: PreTrainedModel | None,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    prompt_ids: list[list[int]],
    reward: RewardFunction,
    k: int,
    max_new_tokens: int,
    batch_size: int = 64,
    seed: int = 0,
) -> PolicySamples:
    """Sample ``k`` completions per prompt from ``policy``, score them with ``reward`` (on
    prompt + completion) and, with a ``reference``, their log-ratios ``log π − log π_ref``
    (zeros without one)."""
    ids = sample_completions(policy, tokenizer, prompt_ids, k, max_new_tokens, batch_size, seed=seed)
    texts = decode_completions(tokenizer, ids)
    full = [p + c for p, row in zip(prompts, texts, strict=True) for c in row]
    rewards = reward(full).float().view(len(prompts), k)
    if reference is None:
        log_ratios = torch.zeros_like(rewards)
    else:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        log_ratios = completion_logps(policy, prompt_ids, ids, pad, batch_size) - completion_logps(
            reference, prompt_ids, ids, pad, batch_size
        )
    return PolicySamples(prompts, texts, rewards, log_ratios, extra={"completion_ids": ids})
