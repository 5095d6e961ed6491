"""Throughput benchmark against TRL: ``python -m dpo_lightning.bench`` (see :mod:`.cli`).

``workload`` (shapes, data, tokenizer, clock), ``engines`` (dpo_lightning and TRL, one per
subprocess), ``cli`` (the command line, the figures and the alternating repeats).
"""

from dpo_lightning.bench.cli import main

__all__ = ["main"]
