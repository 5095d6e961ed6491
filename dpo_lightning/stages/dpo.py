"""The DPO stage: a trainable policy, a reference strategy, a preference loss, a forward engine.

Supports / assumptions: any loss of :mod:`dpo_lightning.losses`, read only through what it
declares, never its name: ``is_reference_free`` (skip the reference forward), ``extra_inputs``
(optional per-token statistics, :mod:`~dpo_lightning.stages.inputs`), ``unpaired`` (batches of
labelled completions instead of pairs, :mod:`~dpo_lightning.stages.unpaired`) and
``needs_mismatched`` (forward the batch's mismatched rows for a KL estimate); an optional
``weighting`` wrapper around the loss (``weighting=wpo``); pairs and K-wise rankings alike
(batches give ``chosen_idx`` / ``rejected_idx`` into the completions, the index API of
:func:`~dpo_lightning.losses.dpo_loss`); every strategy of ``conf/trainer`` (FSDP2 shards the
policy and the reference's model together, see :meth:`DPOModule.frozen_models`; the loss is a
mean over the global batch's pairs or rows, its token-level terms over the global chosen tokens).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from dpo_lightning.engine import CompletionStats, EngineBatch, ForwardEngine
from dpo_lightning.engine.logps import TOKEN_METRICS
from dpo_lightning.losses import PreferenceLoss, UnpairedLoss
from dpo_lightning.models.parallel import is_sharded
from dpo_lightning.reference import CopyReference, ReferenceStrategy
from dpo_lightning.run.errors import UserError
from dpo_lightning.stages.base import PolicyModule, model_flops_per_token
from dpo_lightning.stages.inputs import extra_inputs
from dpo_lightning.stages.metrics import preference_metrics, token_metrics
from dpo_lightning.stages.unpaired import check_data_matches_loss, require_unpaired_batch, unpaired_metrics

#: State-dict prefix of the reference strategy (its model, when it owns one).
REFERENCE_PREFIX = "reference."


class DPOModule(PolicyModule):
    """Direct Preference Optimization (https://arxiv.org/abs/2305.18290).

    Args:
        policy: the causal LM being trained (a HF ``PreTrainedModel``).
        loss: a :class:`~dpo_lightning.losses.PreferenceLoss`, or an
            :class:`~dpo_lightning.losses.UnpairedLoss` for labelled completions (``conf/loss/*.yaml``).
        optimizer: ``params -> Optimizer`` (a Hydra ``_partial_``).
        scheduler: ``(optimizer=, num_training_steps=) -> LRScheduler`` or None; stepped per step.
        reference: where reference log-probs come from (``conf/reference``; default: a frozen copy
            of ``policy``); ``reference.for_loss(loss)`` checks the pairing and picks for ``auto``.
        engine: batch layout + forward (``conf/engine``; default: padded rows, full logits).
        weighting: ``loss -> loss`` wrapper applied once here (``conf/weighting``: ``wpo``), or None.
        tokenizer: the policy's tokenizer; a reference with a checkpoint of its own
            (``reference=model``) is checked against it before its weights load.

    Batches come from the engine's collator: B completions and P pairs given as ``chosen_idx`` /
    ``rejected_idx`` into them (unpaired data: B labelled completions, ``completion_labels``).
    """

    def __init__(
        self,
        policy: nn.Module,
        loss: PreferenceLoss | UnpairedLoss,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        reference: ReferenceStrategy | None = None,
        engine: ForwardEngine | None = None,
        weighting: Callable[[PreferenceLoss], PreferenceLoss] | None = None,
        tokenizer: Any = None,
    ) -> None:
        loss_fn = loss if weighting is None else weighting(loss)
        reference = (reference or CopyReference()).for_loss(loss_fn)
        # The engine is resolved for the policy before the reference copies it (the copy then
        # carries the attention the engine switched the policy to).
        super().__init__(policy, optimizer, scheduler, engine, tokenizer, readers=[reference])
        self.loss_fn = loss_fn
        self.reference = reference
        if tokenizer is not None:
            self.reference.check_tokenizer(tokenizer)
        # What the forwards compute beyond summed log-probs: only what the loss reads.
        self.extra_inputs = extra_inputs(self.loss_fn.extra_inputs, type(self.loss_fn).__name__)
        self.policy_outputs = frozenset().union(*(e.policy for e in self.extra_inputs))
        self.reference_outputs = frozenset().union(*(e.reference for e in self.extra_inputs))
        needs_model = bool(self.reference_outputs) or getattr(self.loss_fn, "needs_mismatched", False)
        if needs_model and not self.reference.live:
            raise UserError(
                f"loss {type(self.loss_fn).__name__} needs reference statistics a cache of summed "
                f"log-probs cannot give (per-token log-probs, or rows built per batch); "
                f"reference={type(self.reference).__name__} is such a cache: use reference=copy"
            )
        self.reference.build(policy)
        self._balance_checked = False

    @property
    def reference_model(self) -> nn.Module | None:
        return self.reference.model

    def forward_only_params(self) -> int:
        return 0 if self.loss_fn.is_reference_free else self.reference.forward_params(self.policy)

    # The reference strategy may need the trainer and data (a precomputed cache) or callbacks
    # (a reference that follows the policy); it is asked, never inspected.
    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        check_data_matches_loss(self.loss_fn, datamodule)  # before a reference pass: one line
        self._warn_label_balance(datamodule)
        self.reference.prepare(self.trainer, self.policy, self.engine)

    def _warn_label_balance(self, datamodule: Any) -> None:
        counts = getattr(datamodule, "label_counts", lambda: None)()
        if counts is None or self._balance_checked or not hasattr(self.loss_fn, "balance_warning"):
            return
        self._balance_checked = True
        message = self.loss_fn.balance_warning(*counts)
        if message:
            rank_zero_warn(message)

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

    def _forwards(
        self, batch: dict[str, Any], token_metrics: bool = False
    ) -> tuple[CompletionStats, CompletionStats | None]:
        """Policy and reference statistics of every completion, with the outputs the loss reads
        (``token_metrics``: also the policy's entropy / token accuracy, from the same logits)."""
        outputs = self.policy_outputs | ({TOKEN_METRICS} if token_metrics else set())
        shared = EngineBatch(batch, outputs=outputs)  # the packed mask is derived once
        return self(shared), self.reference_stats(shared)

    def reference_stats(self, shared: EngineBatch) -> CompletionStats | None:
        """Reference statistics of every completion of the batch, with the reference's own
        optional outputs and the batch's derived state (None for a reference-free loss)."""
        if self.loss_fn.is_reference_free:
            return None
        reference_batch = dataclasses.replace(shared, outputs=self.reference_outputs)
        return self.reference.completion_logps(reference_batch, self.policy, self.engine)

    def mean_chosen_length(self, policy: CompletionStats, ci: Tensor) -> Tensor:
        """The global batch's mean chosen length (0-d), which token-level terms (RPO/ORPO/SFT NLL)
        divide by. Collective: every rank calls it, with or without pairs."""
        (pairs, chosen_tokens), _ = self.global_sum(float(ci.numel()), policy.lengths[ci].sum())
        return chosen_tokens / pairs.clamp(min=1.0)

    def pair_losses(
        self,
        policy: CompletionStats,
        reference: CompletionStats | None,
        ci: Tensor,
        ri: Tensor,
        mean_chosen_length: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The loss on pairs ``(ci, ri)`` (P,) of per-completion statistics (B,): per-pair
        ``(losses, chosen_rewards, rejected_rewards)``, each (P,)."""
        kwargs = {"mean_chosen_length": mean_chosen_length}
        for extra in self.extra_inputs:
            kwargs |= extra.build(policy, reference, ci, ri)
        return self.loss_fn(
            policy.logps[ci],
            policy.logps[ri],
            None if reference is None else reference.logps[ci],
            None if reference is None else reference.logps[ri],
            chosen_lengths=policy.lengths[ci],
            rejected_lengths=policy.lengths[ri],
            chosen_nll=-policy.logps[ci] / policy.lengths[ci].clamp(min=1.0),
            **kwargs,
        )

    def pair_metrics(
        self,
        losses: Tensor,
        chosen_rewards: Tensor,
        rejected_rewards: Tensor,
        policy: CompletionStats,
        ci: Tensor,
        ri: Tensor,
    ) -> dict[str, Tensor]:
        """The logged preference metrics of pairs ``(ci, ri)`` (:func:`preference_metrics`)."""
        return preference_metrics(
            losses,
            chosen_rewards,
            rejected_rewards,
            policy.logps[ci],
            policy.logps[ri],
            policy.mean_logits[ci],
            policy.mean_logits[ri],
            policy.lengths[ci],
            policy.lengths[ri],
        )

    def _shared_step(self, batch: dict[str, Any], stage: str) -> Tensor:
        if self.loss_fn.unpaired:
            return self._unpaired_step(batch, stage)
        ci, ri = batch["chosen_idx"], batch["rejected_idx"]
        if ci.numel() == 0:
            raise UserError(
                f"loss {type(self.loss_fn).__name__} trains on pairs but this batch has none "
                "(unpaired rows: use loss=kto or loss=bco)"
            )
        policy, reference = self._forwards(batch, token_metrics=True)
        mean_length = self.mean_chosen_length(policy, ci)
        losses, chosen_rewards, rejected_rewards = self.pair_losses(policy, reference, ci, ri, mean_length)
        metrics = self.pair_metrics(losses, chosen_rewards, rejected_rewards, policy, ci, ri)
        metrics |= token_metrics(policy, ci)
        loss, metrics["loss"] = self.reduce_loss(losses.sum(), float(ci.numel()), stage)  # global pairs
        n = int(batch["num_pairs"])
        self.log_stage(metrics, stage, n)
        self.log_stage({"acc": metrics["rewards/accuracies"]}, stage, n, prog_bar=True, logger=False)
        return loss

    def _unpaired_step(self, batch: dict[str, Any], stage: str) -> Tensor:
        """Labelled completions (KTO, BCO): per-row losses, metrics over desirable / undesirable rows."""
        require_unpaired_batch(batch, self.loss_fn)
        policy, reference = self._forwards(batch)
        kwargs = self._mismatched_logps(batch) if self.loss_fn.needs_mismatched else {}
        labels = batch["completion_labels"]
        losses, rewards, extra = self.loss_fn(
            policy.logps,
            None if reference is None else reference.logps,
            labels,
            lengths=policy.lengths,
            **kwargs,
        )
        groups = unpaired_metrics(
            losses, rewards, policy.logps, policy.mean_logits, labels, extra, self._reduce_sum
        )
        for metrics, rows in groups:  # "loss" among them: the global mean over rows
            self.log_stage(metrics, stage, rows)
        loss, _ = self.reduce_loss(losses.sum(), float(losses.numel()), stage)  # over global rows
        return loss

    def _mismatched_logps(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Summed log-probs of the batch's mismatched rows under policy and reference (no grad: the
        KL estimate they give is detached). A one-prompt batch has none."""
        rows = batch.get("mismatched")
        if rows is None:
            empty = batch["completion_labels"].new_zeros(0, dtype=torch.float32)
            return {"policy_kl_logps": empty, "reference_kl_logps": empty}
        shared = EngineBatch(rows)
        with torch.no_grad():
            policy = self(shared)
        reference = self.reference.completion_logps(shared, self.policy, self.engine)
        if self.flops_per_batch is not None:  # two forward-only passes more (policy and reference)
            params = sum(p.numel() for p in self.policy.parameters()) + self.forward_only_params()
            self.flops_per_batch += model_flops_per_token(params, training=False) * int(rows["num_tokens"])
        return {"policy_kl_logps": policy.logps, "reference_kl_logps": reference.logps}

    def _reduce_sum(self, tensor: Tensor) -> Tensor:
        return tensor if self._trainer is None else self.trainer.strategy.reduce(tensor, reduce_op="sum")

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
