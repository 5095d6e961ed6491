"""Batch layouts and forwards: how a batch of completions becomes per-completion log-probs.

``padded`` (one row per completion) and ``packed`` (one padding-free row, prefix sharing, a
chunked LM head, per-document attention) engines, ``auto`` (the default: packed wherever it is
exact, ``support`` says where), and the pure tensor functions under them (``logps``,
``chunked_head``, ``packing``, ``doc_attention``). Knows nothing of stages, losses,
references or runs: imports only torch, transformers and the data layer's batch conventions.
"""

from dpo_lightning.engine.auto import AutoEngine
from dpo_lightning.engine.base import BatchReader, EngineBatch, ForwardEngine, UnsupportedLayout
from dpo_lightning.engine.logps import CompletionStats
from dpo_lightning.engine.packed import PackedEngine
from dpo_lightning.engine.padded import PaddedEngine

__all__ = [
    "AutoEngine",
    "BatchReader",
    "CompletionStats",
    "EngineBatch",
    "ForwardEngine",
    "PackedEngine",
    "PaddedEngine",
    "UnsupportedLayout",
]
