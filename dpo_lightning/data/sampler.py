"""Length-grouped (bucketed) batching: batches of similar length, so less padding.

Indices come from an ordinary sampler (``RandomSampler``; under DDP Lightning swaps in a
``DistributedSampler`` through the ``sampler`` argument, so each rank groups its own shard and all
ranks get the same number of batches). They are taken in mega-batches of
``batch_size * mega_batch_mult``, sorted by length inside each, cut into batches, and the batches
are shuffled, so an epoch still sees every row once, in random order, with little padding.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

from torch.utils.data import BatchSampler, Sampler


class LengthGroupedBatchSampler(BatchSampler):
    """A ``BatchSampler`` that groups indices of similar ``lengths[i]``.

    Args:
        sampler: yields dataset indices (its order is the randomness, its shard the rank's).
        batch_size: examples per batch.
        drop_last: drop the final incomplete batch.
        lengths: padded length of every dataset index (prompt + longest completion).
        mega_batch_mult: mega-batch size in batches (larger: less padding, less randomness).
        seed: seed of the batch-order shuffle (advanced every epoch).
    """

    def __init__(
        self,
        sampler: Sampler[int],
        batch_size: int,
        drop_last: bool = False,
        lengths: Sequence[int] = (),
        mega_batch_mult: int = 50,
        seed: int = 0,
    ) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self.lengths = list(lengths)
        self.mega_batch_mult = mega_batch_mult
        self.seed = seed
        self._epoch = 0

    def __iter__(self) -> Iterator[list[int]]:
        indices = list(self.sampler)
        mega = (
            self.batch_size * self.mega_batch_mult
        )  # a multiple of batch_size: one short batch at most
        batches = []
        for start in range(0, len(indices), mega):
            chunk = sorted(indices[start : start + mega], key=lambda i: -self.lengths[i])
            batches += [
                chunk[j : j + self.batch_size] for j in range(0, len(chunk), self.batch_size)
            ]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        epoch = getattr(self.sampler, "epoch", self._epoch)
        random.Random(self.seed + epoch).shuffle(batches)
        self._epoch += 1
        yield from batches
