"""The padded engine: one padded row per completion and full (B, T, V) logits.

Supports every causal LM and every stage; the reference computation the packed engine is tested
against (:func:`~dpo_lightning.engine.logps.concatenated_forward`).
"""

from __future__ import annotations

from torch import Tensor, nn

from dpo_lightning.engine.base import EngineBatch, ForwardEngine
from dpo_lightning.engine.logps import CompletionStats, concatenated_forward

ROW_KEYS = ("input_ids", "attention_mask", "labels")


class PaddedEngine(ForwardEngine):
    """One padded row per completion, full (B, T, V) logits: the reference computation.

    ``rows`` selects completions before the forward (the others cost nothing).
    """

    def forward(
        self, model: nn.Module, batch: EngineBatch, rows: Tensor | None, token_metrics: bool
    ) -> CompletionStats:
        ids, mask, labels = (batch.data[k] if rows is None else batch.data[k][rows] for k in ROW_KEYS)
        return concatenated_forward(model, ids, mask, labels, token_metrics)
