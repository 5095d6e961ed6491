"""Length-grouped batching: batches of examples of similar length.

Indices are shuffled, cut into mega-batches of ``batch_size × mega_batches`` examples, each
mega-batch is sorted by length and cut into batches, and the batch order is shuffled again. Batches
stay random across epochs but hold similar lengths, so a padded batch wastes less compute and a
packed one has steadier tokens (and memory) per step.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from torch.utils.data import BatchSampler, DataLoader


class LengthGroupedBatchSampler(BatchSampler):
    """Yields lists of dataset indices (a ``batch_sampler``).

    Args:
        lengths: tokens per example (prompt + all completions).
        batch_size: examples per batch; the last batch may be smaller.
        mega_batches: batches per sorted group (larger: less padding, less randomness).
        seed: shuffling seed; the epoch (``set_epoch``) is added to it.
        sampler: where the indices come from (default: all of them, shuffled). Under DDP
            Lightning re-creates a ``BatchSampler`` with a ``DistributedSampler`` here, so each
            rank groups its own share.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        mega_batches: int = 50,
        seed: int = 0,
        sampler: Iterable[int] | None = None,
    ) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.mega = batch_size * mega_batches
        self.seed = seed
        self.sampler = sampler
        self.drop_last = False
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        n = len(self.sampler) if self.sampler is not None else len(self.lengths)
        return -(-n // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        rng = random.Random(self.seed + self.epoch)
        if self.sampler is not None:
            order = list(self.sampler)
        else:
            order = list(range(len(self.lengths)))
            rng.shuffle(order)
        batches = []
        for s in range(0, len(order), self.mega):
            group = sorted(order[s : s + self.mega], key=self.lengths.__getitem__, reverse=True)
            batches += [
                group[i : i + self.batch_size] for i in range(0, len(group), self.batch_size)
            ]
        rng.shuffle(batches)
        self.epoch += 1  # a new order next epoch even if nobody calls set_epoch
        return iter(batches)


def example_lengths(dataset: Any) -> list[int]:
    """Tokens per example of a tokenized preference data set (prompt + every completion)."""
    return [
        len(p) + sum(len(c) for c in comps)
        for p, comps in zip(dataset["prompt_ids"], dataset["completion_ids"], strict=True)
    ]


def group_train_batches_by_length(datamodule: Any, mega_batches: int = 50) -> None:
    """Make ``datamodule.train_dataloader()`` return length-grouped batches (same data, same
    collator, same batch size); validation loaders are left alone."""
    original = datamodule.train_dataloader

    def train_dataloader() -> DataLoader:
        loader = original()
        sampler = LengthGroupedBatchSampler(
            example_lengths(loader.dataset),
            loader.batch_size,
            mega_batches,
            getattr(datamodule, "seed", 0),
        )
        return DataLoader(
            loader.dataset,
            batch_sampler=sampler,
            collate_fn=loader.collate_fn,
            num_workers=loader.num_workers,
        )

    datamodule.train_dataloader = train_dataloader
