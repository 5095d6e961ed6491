"""The DPO stage: a trainable policy, a reference strategy, a preference loss, a forward engine.

Supports / assumptions: any loss of :mod:`dpo_lightning.losses` (a reference-free one skips the
reference forward: the stage reads ``is_reference_free``, never a name); pairs and K-wise
rankings alike (batches give ``chosen_idx`` / ``rejected_idx`` into the completions, the index
API of :func:`~dpo_lightning.losses.dpo_loss`); every strategy of ``conf/trainer`` (FSDP2 shards
the policy and the reference's model together in :meth:`DPOModule.configure_model`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from dpo_lightning.engine import CompletionStats, EngineBatch, ForwardEngine
from dpo_lightning.losses import PreferenceLoss
from dpo_lightning.models.parallel import apply_parallelism, is_sharded
from dpo_lightning.reference import CopyReference, ReferenceStrategy
from dpo_lightning.stages.base import PolicyModule
from dpo_lightning.stages.metrics import preference_metrics, token_metrics

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
    ) -> None:
        reference = (reference or CopyReference()).for_loss(loss)
        # The engine is resolved for the policy before the reference copies it (the copy then
        # carries the attention the engine switched the policy to).
        super().__init__(policy, optimizer, scheduler, engine, readers=[reference])
        self.loss_fn = loss
        self.reference = reference
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

    def configure_callbacks(self) -> list[L.Callback]:
        return self.reference.callbacks()

    # FSDP2 (trainer=fsdp): shards the policy and the reference's model; a no-op elsewhere.
    def configure_model(self) -> None:
        strategy = self.trainer.strategy if self._trainer is not None else None
        frozen = [] if self.reference.model is None else [self.reference.model]
        apply_parallelism(strategy, self.policy, frozen)

    def forward(self, batch: EngineBatch | dict[str, Any], token_metrics: bool = False) -> CompletionStats:
        return self.engine(self.policy, batch, token_metrics=token_metrics)

    def _shared_step(self, batch: dict[str, Any], stage: str) -> Tensor:
        shared = EngineBatch(batch)  # what policy and reference derive once (the packed mask)
        policy = self(shared, token_metrics=True)  # entropy / token accuracy from the same logits
        reference = (
            None
            if self.loss_fn.is_reference_free
            else self.reference.completion_logps(shared, self.policy, self.engine)
        )
        ci, ri = batch["chosen_idx"], batch["rejected_idx"]
        chosen_nll = -policy.logps[ci] / policy.lengths[ci].clamp(min=1.0)
        losses, chosen_rewards, rejected_rewards = self.loss_fn(
            policy.logps[ci],
            policy.logps[ri],
            None if reference is None else reference.logps[ci],
            None if reference is None else reference.logps[ri],
            chosen_lengths=policy.lengths[ci],
            rejected_lengths=policy.lengths[ri],
            chosen_nll=chosen_nll,
        )
        metrics = preference_metrics(
            losses,
            chosen_rewards,
            rejected_rewards,
            policy.logps[ci],
            policy.logps[ri],
            policy.mean_logits[ci],
            policy.mean_logits[ri],
        )
        metrics |= token_metrics(policy, ci)
        pairs = int(batch["num_pairs"])
        self.log_stage(metrics, stage, pairs)
        self.log_stage({"acc": metrics["rewards/accuracies"]}, stage, pairs, prog_bar=True, logger=False)
        return losses.mean()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Before clipping: the norm the optimizer would have seen unclipped.
        grads = [p.grad for p in self.policy.parameters() if p.grad is not None]
        if grads:
            self.log("train/grad_norm", torch.nn.utils.get_total_norm(grads), on_step=True)

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
