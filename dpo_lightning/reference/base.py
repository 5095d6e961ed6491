"""Where reference log-probs come from: the interface, a frozen copy, and none.

A strategy is attached once to the module (``attach``), may prepare itself once the trainer and
data exist (``prepare``, from ``DPOModule.setup``), may add Lightning callbacks (``callbacks``), and
answers ``completion_logps(module, batch)`` with per-completion statistics. The module never checks
which strategy it has, and the strategy checks the loss only through ``is_reference_free``.
"""

from __future__ import annotations

import copy
from typing import Any

import lightning as L
import torch
from torch import nn

from dpo_lightning.logps import CompletionStats


class ReferenceStrategy:
    """Interface: ``attach`` at module construction, ``prepare`` at setup, then per batch
    ``completion_logps``."""

    #: Prefix of state-dict keys that must never be written to a checkpoint (frozen weights that
    #: are rebuilt from their source), or None.
    frozen_prefix: str | None = None

    #: Whether this strategy gives reference log-probs (False only for ``reference=none``).
    provides_logps: bool = True

    def attach(self, module: nn.Module) -> None:
        """Called once by the module, after its policy and loss exist: checks the pairing with the
        loss, then builds what the strategy needs (:meth:`build`)."""
        check_pairing(module.loss_fn, self)
        self.build(module)

    def build(self, module: nn.Module) -> None:
        """Attach what the strategy needs to ``module`` (a frozen copy, ...)."""

    def prepare(self, module: nn.Module, trainer: L.Trainer) -> None:
        """Called from ``DPOModule.setup``: the trainer, its datamodule and ranks exist."""

    def callbacks(self) -> list[L.Callback]:
        """Lightning callbacks this strategy needs (added by ``DPOModule.configure_callbacks``)."""
        return []

    def completion_logps(self, module: nn.Module, batch: dict[str, Any]) -> CompletionStats | None:
        """Reference statistics of every completion row of ``batch``: (B,) tensors."""
        raise NotImplementedError


def check_pairing(loss: Any, strategy: ReferenceStrategy) -> None:
    """Refuse a reference-free loss with a reference, and a reference-based loss without one.

    Raises:
        ValueError: one line naming the loss, the strategy and the fix.
    """
    loss_name, strategy_name = type(loss).__name__, type(strategy).__name__
    reference_free = bool(getattr(loss, "is_reference_free", False))
    if reference_free and strategy.provides_logps:
        raise ValueError(
            f"loss {loss_name} is reference-free but reference={strategy_name} would build and "
            "run a reference that is never read: add reference=none"
        )
    if not reference_free and not strategy.provides_logps:
        raise ValueError(
            f"loss {loss_name} needs reference log-probs but reference={strategy_name} gives none: "
            "use reference=copy (or precomputed/adapter/sync), or a reference-free loss "
            "(simpo, orpo, sft)"
        )


def auto_reference(loss: Any) -> ReferenceStrategy:
    """The default (``reference=auto``): a frozen copy for a reference-based loss, no reference
    for a reference-free one — read from the loss's ``is_reference_free``, never its name."""
    return NoReference() if getattr(loss, "is_reference_free", False) else CopyReference()


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode with no gradients (not trained, no dropout)."""
    return copy.deepcopy(model).eval().requires_grad_(False)


class CopyReference(ReferenceStrategy):
    """A frozen copy of the initial policy (the paper's πref = πSFT): eval mode, no grads,
    not in the optimizer, not in checkpoints (``frozen_prefix``)."""

    frozen_prefix = "reference_model."

    def build(self, module: nn.Module) -> None:
        module.reference_model = frozen_copy(module.policy)

    @torch.no_grad()
    def completion_logps(self, module: nn.Module, batch: dict[str, Any]) -> CompletionStats:
        # The module's engine: the reference reads the same (possibly packed) batch layout.
        return module.engine(module.reference_model, batch)


class NoReference(ReferenceStrategy):
    """For reference-free losses: no reference model, no reference log-probs."""

    provides_logps = False

    def completion_logps(self, module: nn.Module, batch: dict[str, Any]) -> None:
        return None
