"""The DPO stage: a trainable policy, a reference strategy, a preference loss, a forward engine.

Supports / assumptions: any loss of :mod:`dpo_lightning.losses` (a reference-free one skips the
reference forward: the stage reads ``is_reference_free``, never a name); pairs and K-wise
rankings alike (batches give ``chosen_idx`` / ``rejected_idx`` into the completions, the index
API of :func:`~dpo_lightning.losses.dpo_loss`); every strategy of ``conf/trainer`` (FSDP2 shards
the policy and the reference's model together, see :meth:`DPOModule.frozen_models`; the loss is a
mean over the global batch's pairs, its token-level terms over the global chosen tokens).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from dpo_lightning.engine import CompletionStats, EngineBatch, ForwardEngine
from dpo_lightning.losses import PreferenceLoss
from dpo_lightning.models.parallel import is_sharded
from dpo_lightning.reference import CopyReference, ReferenceStrategy
from dpo_lightning.stages.base import PolicyModule
from dpo_lightning.stages.metrics import preference_metrics

#: State-dict prefix of the reference strategy (its model, when it owns one).
REFERENCE_PREFIX = "reference."


class DPOModule(PolicyModule):
    """Direct Preference Optimization (https://arxiv.org/abs/2305.18290).

    Args:
        policy: the causal LM being trained (a HF ``PreTrainedModel``).
        loss: a :class:`~dpo_lightning.losses.PreferenceLoss` (``conf/loss/*.yaml``).
        optimizer: ``params -> Optimizer`` (a Hydra ``_partial_``).
        scheduler: ``(optimizer=, num_training_steps=) -> LRScheduler`` or None; stepped per step.
        reference: where reference log-probs come from (``conf/reference``; default: a frozen copy
            of ``policy``); ``reference.for_loss(loss)`` checks the pairing and picks for ``auto``.
        engine: batch layout + forward (``conf/engine``; default: padded rows, full logits).
        tokenizer: the policy's tokenizer; a reference with a checkpoint of its own
            (``reference=model``) is checked against it before its weights load.

    Batches come from the engine's collator: B completions and P pairs given as ``chosen_idx`` /
    ``rejected_idx`` into them.
    """

    def __init__(
        self,
        policy: nn.Module,
        loss: PreferenceLoss,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        reference: ReferenceStrategy | None = None,
        engine: ForwardEngine | None = None,
        tokenizer: Any = None,
    ) -> None:
        super().__init__(policy, optimizer, scheduler, engine, tokenizer)
        self.loss_fn = loss
        self.reference = (reference or CopyReference()).for_loss(loss)
        if tokenizer is not None:
            self.reference.check_tokenizer(tokenizer)
        self.reference.build(policy)

    @property
    def reference_model(self) -> nn.Module | None:
        return self.reference.model

    def forward_only_params(self) -> int:
        return 0 if self.loss_fn.is_reference_free else self.reference.forward_params(self.policy)

    # The reference strategy may need the trainer and data (a precomputed cache) or callbacks
    # (a reference that follows the policy); it is asked, never inspected.
    def setup(self, stage: str) -> None:
        self.reference.prepare(self.trainer, self.policy, self.engine)

    # After configure_model: a pass over the data runs the sharded policy (reference=precomputed).
    def on_fit_start(self) -> None:
        self.reference.precompute(self.trainer, self.policy, self.engine)

    def on_validation_start(self) -> None:
        self.reference.precompute(self.trainer, self.policy, self.engine)  # trainer.validate alone

    def configure_callbacks(self) -> list[L.Callback]:
        return self.reference.callbacks()

    # FSDP2 (trainer=fsdp) shards the reference's model with the policy
    # (PolicyModule.configure_model); with reference.offload its shards stay in CPU memory.
    def frozen_models(self) -> list[nn.Module]:
        model = self.reference.model
        return [] if model is None or self.reference.offload else [model]

    def offloaded_models(self) -> list[nn.Module]:
        model = self.reference.model
        return [model] if model is not None and self.reference.offload else []

    def forward(self, batch: EngineBatch | dict[str, Any]) -> CompletionStats:
        return self.engine(self.policy, batch)

    def _shared_step(self, batch: dict[str, Any], stage: str) -> Tensor:
        shared = EngineBatch(batch)  # what policy and reference derive once (the packed mask)
        policy = self(shared)
        reference = (
            None
            if self.loss_fn.is_reference_free
            else self.reference.completion_logps(shared, self.policy, self.engine)
        )
        ci, ri = batch["chosen_idx"], batch["rejected_idx"]
        chosen_nll = -policy.logps[ci] / policy.lengths[ci].clamp(min=1.0)
        # Token-level terms (RPO/ORPO/SFT NLL) divide by the global batch's mean chosen length.
        (pairs, chosen_tokens), _ = self.global_sum(float(ci.numel()), policy.lengths[ci].sum())
        losses, chosen_rewards, rejected_rewards = self.loss_fn(
            policy.logps[ci],
            policy.logps[ri],
            None if reference is None else reference.logps[ci],
            None if reference is None else reference.logps[ri],
            chosen_lengths=policy.lengths[ci],
            rejected_lengths=policy.lengths[ri],
            chosen_nll=chosen_nll,
            mean_chosen_length=chosen_tokens / pairs.clamp(min=1.0),
        )
        loss, value = self.reduce_loss(losses.sum(), float(ci.numel()), stage)  # mean over global pairs
        metrics = preference_metrics(
            losses,
            chosen_rewards,
            rejected_rewards,
            policy.logps[ci],
            policy.logps[ri],
            policy.mean_logits[ci],
            policy.mean_logits[ri],
        )
        metrics["loss"] = value
        n = int(batch["num_pairs"])
        self.log_stage(metrics, stage, n)
        self.log_stage({"acc": metrics["rewards/accuracies"]}, stage, n, prog_bar=True, logger=False)
        return loss

    # A reference rebuilt at every start stays out of checkpoints, so a checkpoint holds one copy
    # of the weights. Sharded (FSDP2) checkpoints load key by key into the live module (DCP has
    # no partial load through Lightning), so they keep it (sharded too).
    def _reference_left_out(self) -> bool:
        return self.reference.rebuilt_on_start and not is_sharded(self.policy)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._reference_left_out():
            state = checkpoint["state_dict"]
            for key in [k for k in state if k.startswith(REFERENCE_PREFIX)]:
                del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._reference_left_out():
            current = self.state_dict()
            checkpoint["state_dict"].update(
                {k: v for k, v in current.items() if k.startswith(REFERENCE_PREFIX)}
            )
