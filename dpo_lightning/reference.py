"""Where reference log-probs come from.

A strategy attaches what it needs to the module and answers ``completion_logps(module, batch)``
with per-completion statistics, or ``None`` for reference-free training. The module never checks
which strategy it has.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from dpo_lightning.engine import PaddedEngine
from dpo_lightning.logps import CompletionStats


class ReferenceStrategy:
    """Interface: ``attach`` once at module construction, then ``completion_logps`` per batch."""

    #: Prefix of state-dict keys that must never be written to a checkpoint (frozen weights that
    #: are rebuilt from their source), or None.
    frozen_prefix: str | None = None

    def attach(self, module: nn.Module) -> None:
        """Called once by the module, after its policy exists."""

    def completion_logps(self, module: nn.Module, batch: dict) -> CompletionStats | None:
        raise NotImplementedError


class CopyReference(ReferenceStrategy):
    """A frozen copy of the initial policy (the paper's πref = πSFT): eval mode, no grads,
    not in the optimizer, not in checkpoints (``frozen_prefix``)."""

    frozen_prefix = "reference_model."

    def attach(self, module: nn.Module) -> None:
        module.reference_model = copy.deepcopy(module.policy).eval().requires_grad_(False)

    @torch.no_grad()
    def completion_logps(self, module: nn.Module, batch: dict) -> CompletionStats:
        # The module's engine: the reference reads the same (possibly packed) batch layout.
        engine = getattr(module, "engine", None) or PaddedEngine()
        return engine(module.reference_model, batch)


class NoReference(ReferenceStrategy):
    """For reference-free losses: no reference model, no reference log-probs."""

    def completion_logps(self, module: nn.Module, batch: dict) -> None:
        return None
