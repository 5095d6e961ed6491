"""The DPO ``LightningModule``: a trainable policy, a frozen reference, a preference loss."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from dpo_lightning.engine import ForwardEngine, PaddedEngine
from dpo_lightning.logps import CompletionStats
from dpo_lightning.losses import PreferenceLoss
from dpo_lightning.metrics import preference_metrics
from dpo_lightning.parallel import apply_parallelism
from dpo_lightning.policy_module import PolicyModule
from dpo_lightning.reference import CopyReference, ReferenceStrategy


class DPOModule(PolicyModule):
    """Direct Preference Optimization (https://arxiv.org/abs/2305.18290).

    Args:
        policy: the causal LM being trained (a HF ``PreTrainedModel``).
        loss: a :class:`~dpo_lightning.losses.PreferenceLoss` (``conf/loss/*.yaml``).
        optimizer: ``params -> Optimizer`` (a Hydra ``_partial_``).
        scheduler: ``(optimizer=, num_training_steps=) -> LRScheduler`` or None; stepped per step.
        reference: where reference log-probs come from (default: a frozen copy of ``policy``).
        engine: batch layout + forward (``conf/engine``; default: padded rows, full logits).

    Batches come from :class:`~dpo_lightning.data.collate.PreferenceCollator`: B completion rows
    and P pairs given as ``chosen_idx`` / ``rejected_idx`` into the rows.
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
        super().__init__(policy, optimizer, scheduler)
        self.loss_fn = loss
        self.engine = engine or PaddedEngine()
        self.reference = reference or CopyReference()
        self.reference.attach(self)

    # Lightning calls .train() on the whole module each epoch; the reference must stay in eval
    # mode (no dropout) whatever happens to the policy.
    def train(self, mode: bool = True) -> DPOModule:
        super().train(mode)
        if hasattr(self, "reference_model"):
            self.reference_model.eval()
        return self

    # The reference strategy may need the trainer and data (a precomputed cache) or callbacks
    # (a reference that follows the policy); it is asked, never inspected.
    def setup(self, stage: str) -> None:
        self.reference.prepare(self, self.trainer)

    def configure_callbacks(self) -> list[L.Callback]:
        return self.reference.callbacks()

    # FSDP2 (trainer=fsdp): shards policy and reference; a no-op under other strategies.
    def configure_model(self) -> None:
        apply_parallelism(self)

    def forward(self, batch: dict[str, Any]) -> CompletionStats:
        return self.engine(self.policy, batch)

    def _shared_step(self, batch: dict[str, Any], stage: str) -> Tensor:
        policy = self(batch)
        reference = None if self.loss_fn.is_reference_free else self.reference.completion_logps(self, batch)
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
        pairs = int(batch["num_pairs"])
        self.log_stage(metrics, stage, pairs)
        self.log_stage({"acc": metrics["rewards/accuracies"]}, stage, pairs, prog_bar=True, logger=False)
        return losses.mean()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Before clipping: the norm the optimizer would have seen unclipped.
        grads = [p.grad for p in self.policy.parameters() if p.grad is not None]
        if grads:
            self.log("train/grad_norm", torch.nn.utils.get_total_norm(grads), on_step=True)

    # The frozen reference is rebuilt from its source: keep it out of checkpoints, so a
    # checkpoint holds one copy of the weights.
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        prefix = self.reference.frozen_prefix
        if prefix:
            state = checkpoint["state_dict"]
            for key in [k for k in state if k.startswith(prefix)]:
                del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        prefix = self.reference.frozen_prefix
        if prefix:
            current = self.state_dict()
            checkpoint["state_dict"].update({k: v for k, v in current.items() if k.startswith(prefix)})
