"""The engine interface: one collator for the DataModule, one forward for every model.

An engine owns both ends of a batch layout — the collator that builds the batch
(:meth:`ForwardEngine.collator`, handed to the DataModule by ``train.py``) and the forward that
reads it — so a stage never checks which engine it has. Whatever an engine derives from a batch
once and shares between the models that read it (the packed attention mask) lives in an
:class:`EngineBatch` the stage creates per batch, never inside the batch dict.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from dpo_lightning.data.collate import PreferenceCollator
from dpo_lightning.engine.logps import CompletionStats


@dataclass
class EngineBatch:
    """One collated batch and what is derived from it once per batch.

    Attributes:
        data: the collator's output dict.
        derived: values built once and shared by every model that reads this batch (policy and
            reference), keyed by what they depend on (see :meth:`once`).
        outputs: optional statistics the forward must add to its
            :class:`~dpo_lightning.engine.logps.CompletionStats` (names in
            :data:`~dpo_lightning.engine.logps.OPTIONAL_OUTPUTS`); none by default, so a step pays
            only for what its loss reads. ``dataclasses.replace(batch, outputs=...)`` gives another
            model a different set while sharing ``derived``.
    """

    data: dict[str, Any]
    derived: dict[Any, Any] = field(default_factory=dict)
    outputs: frozenset[str] = frozenset()

    def once(self, key: Any, build: Callable[[], Any]) -> Any:
        """``build()`` the first time ``key`` is asked for on this batch; the same value after."""
        if key not in self.derived:
            self.derived[key] = build()
        return self.derived[key]


def as_engine_batch(batch: EngineBatch | dict[str, Any]) -> EngineBatch:
    """A collated dict wrapped for one forward (nothing shared), or the given batch."""
    return batch if isinstance(batch, EngineBatch) else EngineBatch(batch)


class ForwardEngine:
    """Interface: ``collator(...)`` once for the DataModule, then per batch
    ``engine(model, batch, rows=None) -> CompletionStats``.

    ``row_per_completion`` says whether batches keep one padded row per completion (what a stage
    that reads rows itself, such as the reward model, needs).

    Args:
        compile: ``torch.compile`` each decoder layer of every model the engine runs (regional
            compilation, dynamic shapes: one graph for all batch lengths). Pays on GPU; on a small
            CPU model the compile time exceeds what it saves.
    """

    row_per_completion: bool = True

    def __init__(self, compile: bool = False) -> None:
        self.compile = compile
        self._compiled: weakref.WeakSet[nn.Module] = weakref.WeakSet()

    # Which models were compiled is per process (weak references do not pickle): a spawned
    # DDP worker or a deep copy starts with none.
    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_compiled"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._compiled = weakref.WeakSet()

    def collator(
        self, pad_token_id: int, padding_side: str = "right", pad_to_multiple_of: int | None = None
    ) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
        """The ``examples -> batch`` callable this engine reads (the padded one by default)."""
        return PreferenceCollator(pad_token_id, padding_side, pad_to_multiple_of)

    def __call__(
        self, model: nn.Module, batch: EngineBatch | dict[str, Any], rows: Tensor | None = None
    ) -> CompletionStats:
        """Statistics of the completions ``rows`` (default: all B) of ``batch``: (R,) tensors."""
        if self.compile and model not in self._compiled:
            compile_decoder_layers(model)
            self._compiled.add(model)
        return self.forward(model, as_engine_batch(batch), rows)

    def forward(self, model: nn.Module, batch: EngineBatch, rows: Tensor | None) -> CompletionStats:
        raise NotImplementedError


def compile_decoder_layers(model: nn.Module) -> None:
    """``torch.compile`` every decoder layer in place (regional compilation: one small graph
    reused by all layers, compiled once; dynamic shapes so new batch lengths do not recompile)."""
    for layer in model.get_decoder().layers:
        layer.compile(dynamic=True)
