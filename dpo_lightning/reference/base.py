"""Where reference log-probs come from: the interface, a frozen copy, none, and ``auto``.

A strategy is an ``nn.Module`` the DPO stage holds as ``reference``: a model it builds is its own
submodule (``reference.model``), so it moves with the stage to the device, is sharded with the
policy under FSDP2 and, when it is state, is checkpointed. Everything else a strategy needs it
receives as arguments:

* :meth:`ReferenceStrategy.for_loss` (stage construction): checks the pairing with the loss and
  returns the strategy to use (``auto`` picks one);
* :meth:`ReferenceStrategy.check_tokenizer` (stage construction, when the stage has the policy's
  tokenizer): a strategy with its own checkpoint checks that it shares it;
* :meth:`ReferenceStrategy.build` (stage construction): builds what it holds from the policy;
* :meth:`ReferenceStrategy.prepare` (``setup``): the trainer, its data and ranks exist;
* :meth:`ReferenceStrategy.precompute` (``on_fit_start`` / ``on_validation_start``): the models
  are sharded and on their devices;
* :meth:`ReferenceStrategy.completion_logps` (every step): reference statistics of a batch;
* :meth:`ReferenceStrategy.callbacks`: Lightning callbacks it needs.

The stage never checks which strategy it has, and a strategy reads the loss only through
``is_reference_free``.
"""

from __future__ import annotations

import copy
from dataclasses import fields
from typing import Any

import lightning as L
import torch
from torch import nn

from dpo_lightning.engine import CompletionStats, EngineBatch, ForwardEngine
from dpo_lightning.models.parallel import is_sharded
from dpo_lightning.run.errors import ConfigError


class ReferenceStrategy(nn.Module):
    """Interface (see the module docstring). Always in eval mode: a reference never sees dropout.

    Attributes:
        model: the frozen model this strategy owns, or None (no reference, a cache, the policy
            itself with its adapter off).
    """

    #: Whether this strategy gives reference log-probs (False only for ``reference=none``).
    provides_logps: bool = True
    #: True when :attr:`model` is rebuilt from its source at every start (a frozen copy): then it
    #: is left out of checkpoints, which hold one copy of the weights.
    rebuilt_on_start: bool = False
    #: Under FSDP2, keep :attr:`model`'s shards in CPU memory (``fully_shard``'s CPU offload).
    offload: bool = False
    #: True when reference statistics come from a model run on the batch at hand, so any row
    #: (completions sampled during training included) and any optional output (per-token
    #: log-probs) can be asked for; False for a cache of summed log-probs of the data set's rows
    #: computed before training (``precomputed``).
    live: bool = True

    def __init__(self) -> None:
        super().__init__()
        self.model: nn.Module | None = None

    def for_loss(self, loss: nn.Module) -> ReferenceStrategy:
        """The strategy to use with ``loss``: this one, once the pairing is checked."""
        check_pairing(loss, self)
        return self

    def check_tokenizer(self, tokenizer: Any) -> None:
        """Called before :meth:`build` with the policy's tokenizer: a strategy that loads a model
        of its own refuses one whose tokenizer differs (one line, before its weights load)."""

    def check_policy(self, lora: Any) -> None:
        """Refuse a policy config this strategy cannot work with (``model.lora``), before any
        model is built (:class:`~dpo_lightning.run.errors.ConfigError`)."""

    def build(self, policy: nn.Module) -> None:
        """Build what the strategy holds from the initial policy (a frozen copy, ...)."""

    def prepare(self, trainer: L.Trainer, policy: nn.Module, engine: ForwardEngine) -> None:
        """Called from the stage's ``setup``: the trainer, its datamodule and ranks exist."""

    def precompute(self, trainer: L.Trainer, policy: nn.Module, engine: ForwardEngine) -> None:
        """Called once the models are sharded and on their devices, before the first step (and
        before a sharded strategy loads checkpoint weights): work that needs the policy where it
        trains (a pass over the data)."""

    def callbacks(self) -> list[L.Callback]:
        """Lightning callbacks this strategy needs (added by the stage's ``configure_callbacks``)."""
        return []

    def padded_rows_reason(self) -> str | None:
        """Why this strategy needs one padded row per completion (a
        :class:`~dpo_lightning.engine.BatchReader`); None: it reads batches through the engine."""
        return None

    def forward_params(self, policy: nn.Module) -> int:
        """Parameters one reference forward reads per token (0: no forward; for FLOP counts)."""
        return 0 if self.model is None else sum(p.numel() for p in self.model.parameters())

    def completion_logps(
        self, batch: EngineBatch, policy: nn.Module, engine: ForwardEngine
    ) -> CompletionStats | None:
        """Reference statistics of every completion of ``batch``: (B,) tensors."""
        raise NotImplementedError

    def train(self, mode: bool = True) -> ReferenceStrategy:
        # Lightning calls .train() on the whole stage each epoch: the reference stays in eval.
        return super().train(False)


def check_pairing(loss: Any, strategy: ReferenceStrategy) -> None:
    """Refuse a reference-free loss with a reference, and a reference-based loss without one.

    Raises:
        ConfigError: one line naming the loss, the strategy and the fix.
    """
    loss_name, strategy_name = type(loss).__name__, type(strategy).__name__
    reference_free = bool(getattr(loss, "is_reference_free", False))
    if reference_free and strategy.provides_logps:
        raise ConfigError(
            f"loss {loss_name} is reference-free but reference={strategy_name} would build and "
            "run a reference that is never read: add reference=none"
        )
    if not reference_free and not strategy.provides_logps:
        raise ConfigError(
            f"loss {loss_name} needs reference log-probs but reference={strategy_name} gives none: "
            "use reference=copy (or precomputed/adapter/sync), or a reference-free loss "
            "(simpo, orpo, sft)"
        )


def frozen_forward(engine: ForwardEngine, model: nn.Module, batch: EngineBatch) -> CompletionStats:
    """``engine(model, batch)`` under ``torch.inference_mode`` (no autograd state, no version
    counters: the cheapest forward torch has), its (B,) outputs returned as ordinary tensors so a
    loss may save them for its backward.

    A sharded model (FSDP2, TP: DTensor parameters) runs under ``no_grad`` instead: FSDP2's
    all-gather buffers need version counters (torch 2.13 under TP + FSDP2: "Inference tensors do
    not track version counter").
    """
    with torch.no_grad(), torch.inference_mode(not is_sharded(model)):
        stats = engine(model, batch)
    values = {f.name: getattr(stats, f.name) for f in fields(stats)}
    return CompletionStats(**{k: None if v is None else v.clone() for k, v in values.items()})


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode with no gradients (not trained, no dropout)."""
    return copy.deepcopy(model).eval().requires_grad_(False)


class CopyReference(ReferenceStrategy):
    """A frozen copy of the initial policy (the paper's πref = πSFT): eval mode, no grads, not in
    the optimizer, not in checkpoints (rebuilt from the policy's source at every start)."""

    rebuilt_on_start = True

    def build(self, policy: nn.Module) -> None:
        self.model = frozen_copy(policy)

    def completion_logps(
        self, batch: EngineBatch, policy: nn.Module, engine: ForwardEngine
    ) -> CompletionStats:
        # The stage's engine: the reference reads the same (possibly packed) batch layout.
        return frozen_forward(engine, self.model, batch)


class NoReference(ReferenceStrategy):
    """For reference-free losses: no reference model, no reference log-probs."""

    provides_logps = False

    def completion_logps(self, batch: EngineBatch, policy: nn.Module, engine: ForwardEngine) -> None:
        return None


class AutoReference(ReferenceStrategy):
    """The default (``reference=auto``): :meth:`for_loss` gives a frozen copy for a
    reference-based loss and no reference for a reference-free one — read from the loss's
    ``is_reference_free``, never its name. Never used as a strategy itself."""

    def for_loss(self, loss: nn.Module) -> ReferenceStrategy:
        chosen = NoReference() if getattr(loss, "is_reference_free", False) else CopyReference()
        return chosen.for_loss(loss)
