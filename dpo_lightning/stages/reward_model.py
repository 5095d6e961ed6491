"""Reward-model training on the same preference data: a scalar head on the causal LM, trained
with the Bradley–Terry loss (DPO paper Eq. 2; InstructGPT's reward model).

    dpo-train experiment=reward_model                        # tiny model, built-in data
    dpo-train experiment=reward_model model=hf model.name_or_path=<sft dir> data=file data.path=...

The causal LM's backbone is kept (not copied) under a fresh linear head that reads the hidden
state of each row's last real token: ``r(x, y) = w · h_last``. K-wise rankings give every pair
of the ranking, as for DPO. ``hf_model/`` is an ``AutoModelForSequenceClassification``
(``num_labels=1``) saved with ``save_pretrained``; ``val/rewards/accuracies`` is the share of
held-out pairs whose chosen completion gets the higher reward.

Supports / assumptions: HF architectures with an ``*ForSequenceClassification`` class whose head
is a linear ``score``; padded rows only (``engine=padded``); no LoRA yet; every strategy (FSDP2
shards the classification model per decoder layer; the loss is a mean over the global batch's
pairs, see :meth:`~dpo_lightning.stages.base.PolicyModule.reduce_loss`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from dpo_lightning.engine import ForwardEngine
from dpo_lightning.engine.logps import position_ids_from_mask
from dpo_lightning.losses import reward_model_loss
from dpo_lightning.run.errors import UserError
from dpo_lightning.stages.base import PolicyModule


def reward_model_from_causal_lm(lm: PreTrainedModel, pad_token_id: int | None = None) -> PreTrainedModel:
    """An ``*ForSequenceClassification`` model sharing ``lm``'s backbone, with a new scalar head.

    The classification model is built on the meta device (no second copy of the weights), its
    backbone replaced by ``lm``'s, and its ``score`` head initialised like HF does
    (normal, std ``initializer_range``).
    """
    if hasattr(lm, "disable_adapter"):
        raise ValueError("reward-model training does not support model.lora yet: set model.lora=null")
    config = copy.deepcopy(lm.config)
    config.num_labels = 1
    config.pad_token_id = pad_token_id if pad_token_id is not None else config.eos_token_id
    if config.pad_token_id is None:  # HF's forward refuses batches of more than one row without it
        raise ValueError("the model config has no EOS id to pad with: set stage.module.pad_token_id")
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config, dtype=lm.dtype)
    if not isinstance(getattr(model, "score", None), nn.Linear):
        raise ValueError(f"{type(model).__name__} has no linear `score` head: unsupported architecture")
    setattr(model, model.base_model_prefix, lm.base_model)
    device = next(lm.parameters()).device
    model.score = nn.Linear(model.score.in_features, 1, bias=False, dtype=lm.dtype, device=device)
    nn.init.normal_(model.score.weight, std=getattr(config, "initializer_range", 0.02))
    return model


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Index of each row's last real token, for left or right padding: (B, T) -> (B,)."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(-1)


def sequence_rewards(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Scalar reward per row from the head applied to the last real token: (B, T) -> (B,).

    Runs the model's own ``forward`` (under FSDP2 its root hooks gather the embeddings and the
    head; calling the backbone directly would skip them) and reads the head's per-position output
    at :func:`last_token_index`. HF's own pooling (the last position whose id is not the pad id)
    is not used: it misses a final EOS when the pad id is the EOS id.
    """
    scores: list[Tensor] = []
    hook = model.score.register_forward_hook(lambda _module, _args, out: scores.append(out))
    try:
        model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        )
    finally:
        hook.remove()
    per_position = scores[-1].squeeze(-1)  # (B, T)
    rows = torch.arange(per_position.shape[0], device=per_position.device)
    return per_position[rows, last_token_index(attention_mask)].float()  # (B,)


class RewardModelModule(PolicyModule):
    """Bradley–Terry reward model: ``L = −log σ(r(x, yw) − r(x, yl))`` per pair.

    Args:
        policy: the causal LM whose backbone the reward model keeps (``model=`` config).
        optimizer: ``params -> Optimizer`` (a Hydra ``_partial_``).
        scheduler: ``(optimizer=, num_training_steps=) -> LRScheduler`` or None.
        engine: must keep one padded row per completion (``engine=padded``; ``auto`` picks it):
            the head reads each row's last real token.
        center_rewards_coefficient: weight of ``mean((r_w + r_l)²)``, which keeps rewards centred
            on 0 (Eisenstein et al. 2023, https://arxiv.org/abs/2312.09244; TRL 1.16's option of the
            same name). 0 disables it.
        pad_token_id: written to the exported config (default: the model's EOS id).
    """

    def __init__(
        self,
        policy: PreTrainedModel,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        engine: ForwardEngine | None = None,
        center_rewards_coefficient: float = 0.0,
        pad_token_id: int | None = None,
        tokenizer: Any = None,
    ) -> None:
        model = reward_model_from_causal_lm(policy, pad_token_id)
        super().__init__(model, optimizer, scheduler, engine, tokenizer)
        self.center_rewards_coefficient = center_rewards_coefficient

    def padded_rows_reason(self) -> str:
        return "stage=reward_model reads each padded row's last real token"

    def forward(self, batch: dict[str, Any]) -> Tensor:
        return sequence_rewards(self.policy, batch["input_ids"], batch["attention_mask"])

    def _shared_step(self, batch: dict[str, Any], stage: str) -> Tensor:
        ci, ri = batch["chosen_idx"], batch["rejected_idx"]
        if ci.numel() == 0:
            raise UserError("stage=reward_model trains on pairs; this batch has none (unpaired or text rows)")
        rewards = self(batch)  # (B,)
        losses = reward_model_loss(rewards, ci, ri)  # (P,)
        if self.center_rewards_coefficient:
            losses = losses + self.center_rewards_coefficient * (rewards[ci] + rewards[ri]) ** 2
        loss, value = self.reduce_loss(losses.sum(), float(ci.numel()), stage)  # mean over global pairs
        chosen, rejected = rewards[ci].detach(), rewards[ri].detach()
        metrics = {
            "loss": value,
            "rewards/accuracies": (chosen > rejected).float().mean(),  # held-out: val/...
            "rewards/chosen": chosen.mean(),
            "rewards/rejected": rejected.mean(),
            "rewards/margins": (chosen - rejected).mean(),
        }
        self.log_stage(metrics, stage, int(batch["num_pairs"]))
        return loss
