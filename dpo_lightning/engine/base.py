"""The engine interface: one collator for the DataModule, one forward for every model.

An engine owns both ends of a batch layout — the collator that builds the batch
(:meth:`ForwardEngine.collator`, handed to the DataModule by ``train.py``) and the forward that
reads it — so a stage never checks which engine it has. Whatever an engine derives from a batch
once and shares between the models that read it (the packed attention mask) lives in an
:class:`EngineBatch` the stage creates per batch, never inside the batch dict.

Which engine may run is settled once, when the stage is built: :meth:`ForwardEngine.resolve` is
given the model and the components that read the batches (the stage, its reference strategy —
each a :class:`BatchReader`, asked :meth:`~BatchReader.padded_rows_reason`), and answers with the
engine to use: itself, another (``engine=auto``), or a one-line error naming what cannot run.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from dpo_lightning.data.collate import PreferenceCollator
from dpo_lightning.engine.logps import CompletionStats
from dpo_lightning.run.errors import UserError, check_choice


class BatchReader(Protocol):
    """A component that reads the engine's batches besides the engine (a stage, a reference
    strategy): it says whether it needs one padded row per completion."""

    def padded_rows_reason(self) -> str | None:
        """Why this component needs padded rows (one line, e.g. ``"stage=reward_model reads each
        row's last real token"``), or None when any layout does."""
        ...


class UnsupportedLayout(UserError, ValueError):
    """An engine cannot run this model or these batch readers (the message says why and what to
    set instead)."""


def padded_rows_reasons(readers: Iterable[BatchReader]) -> list[str]:
    """The reasons the ``readers`` give for needing padded rows (empty: any layout)."""
    return [r for r in (reader.padded_rows_reason() for reader in readers) if r]


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
        """``build()`` the first time ``key`` is asked for on this batch; the same value after.

        Built outside inference mode even when a reference forward asks first, so a grad-mode
        forward may save the value for its backward (index tensors of the packed layout).
        """
        if key not in self.derived:
            with torch.inference_mode(False):
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
        self.compile = check_choice("compile", compile, (True, False))
        self._compiled: weakref.WeakSet[nn.Module] = weakref.WeakSet()

    # Which models were compiled is per process (weak references do not pickle): a spawned
    # DDP worker or a deep copy starts with none.
    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_compiled"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._compiled = weakref.WeakSet()

    def resolve(
        self, model: nn.Module, readers: Iterable[BatchReader] = ()
    ) -> tuple[ForwardEngine, str | None]:
        """The engine that will run ``model`` for these batch ``readers``, and a line to log (or
        None). This one supports every model and reader; see :class:`~.packed.PackedEngine` and
        :class:`~.auto.AutoEngine` for the others.

        Raises:
            UnsupportedLayout: the engine cannot serve a reader or the model (one line: why).
        """
        return self, None

    def collator(
        self, pad_token_id: int, padding_side: str = "right", pad_to_multiple_of: int | None = None
    ) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
        """The ``examples -> batch`` callable this engine reads (the padded one by default)."""
        return PreferenceCollator(pad_token_id, padding_side, pad_to_multiple_of)

    def __call__(
        self,
        model: nn.Module,
        batch: EngineBatch | dict[str, Any],
        rows: Tensor | None = None,
    ) -> CompletionStats:
        """Statistics of the completions ``rows`` (default: all B) of ``batch``: (R,) tensors,
        with the optional outputs ``batch.outputs`` names (``"token_metrics"``: the summed entropy
        and argmax hits per completion, TRL's ``entropy`` / ``mean_token_accuracy``, from the same
        logits: no extra forward)."""
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
