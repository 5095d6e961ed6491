"""``engine=auto`` (the default): the packed engine wherever it is exact, else the padded one.

The packed engine gives the padded engine's log-probs, losses and gradients (``tests/test_engine.py``)
at a fraction of the work, so it is the default whenever it can run. It cannot when

* a component that reads the batches needs one padded row per completion — the stage
  (``stage=reward_model`` reads each row's last token) or a reference strategy (none of the
  shipped ones does: ``reference=precomputed`` keys its cache by completion content): each is
  asked :meth:`~.base.BatchReader.padded_rows_reason`;
* the data asks for a padding side (``data.padding_side=left``): there is one packed row;
* the model is not one it runs exactly: :meth:`~.packed.PackedEngine.unsupported` (no decoder /
  head accessors, an attention that cannot take the packed mask, a probe batch that disagrees).

Then it is the padded engine, and :meth:`AutoEngine.resolve` returns one line saying why (the
stage logs it). The choice is made once, when the stage is built (after the DataModule, which asks
for its collator first: the collator is handed out now and built on the first batch).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor, nn

from dpo_lightning.engine.base import BatchReader, EngineBatch, ForwardEngine, padded_rows_reasons
from dpo_lightning.engine.logps import CompletionStats
from dpo_lightning.engine.packed import PackedEngine
from dpo_lightning.engine.padded import PaddedEngine


class AutoEngine(ForwardEngine):
    """The packed engine where it is supported, the padded one elsewhere (see the module docstring).

    Args: those of :class:`~.packed.PackedEngine` (``compile`` applies to either choice).
    """

    def __init__(
        self,
        prefix_sharing: bool = True,
        chunk_size: int | None = 1024,
        attn_implementation: str | None = "per_document",
        compile: bool = False,
    ) -> None:
        super().__init__(compile=compile)
        self.packed = PackedEngine(prefix_sharing, chunk_size, attn_implementation, compile)
        self.padded = PaddedEngine(compile=compile)
        self.chosen: ForwardEngine | None = None
        self.data_reason: str | None = None

    @property
    def row_per_completion(self) -> bool:  # type: ignore[override]
        return self.choice().row_per_completion

    def choice(self) -> ForwardEngine:
        """The engine :meth:`resolve` picked."""
        if self.chosen is None:
            raise RuntimeError(
                "engine=auto has not picked an engine yet: the stage module picks it when it is "
                "built (ForwardEngine.resolve)"
            )
        return self.chosen

    def collator(
        self, pad_token_id: int, padding_side: str = "right", pad_to_multiple_of: int | None = None
    ) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
        args = (pad_token_id, padding_side, pad_to_multiple_of)
        if self.chosen is not None:  # already picked: that engine's collator (and its checks)
            return self.chosen.collator(*args)
        if padding_side != "right":
            self.data_reason = f"data.padding_side={padding_side!r} (one packed row has no padding side)"
        return DeferredCollator(self, args)

    def resolve(self, model: nn.Module, readers: Iterable[BatchReader] = ()) -> tuple[ForwardEngine, str]:
        reasons = padded_rows_reasons(readers) + ([self.data_reason] if self.data_reason else [])
        reason = reasons[0] if reasons else self.packed.unsupported(model)
        self.chosen = self.padded if reason else self.packed
        if reason:
            return self.chosen, f"engine=auto: padded rows, because {reason}"
        return self.chosen, "engine=auto: packed rows (padding-free, prefix sharing, chunked LM head)"

    def forward(self, model: nn.Module, batch: EngineBatch, rows: Tensor | None) -> CompletionStats:
        return self.choice().forward(model, batch, rows)


class DeferredCollator:
    """The collator of the engine ``auto`` picks, built on the first batch.

    Pickled (DataLoader workers started by spawn) as the built collator, never the engine.
    """

    def __init__(self, auto: AutoEngine, args: tuple[Any, ...]) -> None:
        self.auto: AutoEngine | None = auto
        self.args = args
        self.built: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None

    def target(self) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
        if self.built is None:
            self.built = self.auto.choice().collator(*self.args)
        return self.built

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        return self.target()(examples)

    def __getstate__(self) -> dict[str, Any]:
        return {"auto": None, "args": self.args, "built": self.target()}
