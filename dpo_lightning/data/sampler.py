"""A shuffling sampler that draws the same permutation as Lightning's ``DistributedSampler``.

Under DDP/FSDP Lightning swaps a shuffling sampler for
``DistributedSampler(seed=PL_GLOBAL_SEED)``, which draws ``randperm(n)`` from a generator seeded
``seed + epoch`` and gives rank r the indices ``r::world_size``. This sampler draws the very same
permutation on one process, so one process with batch ``W·b`` sees, step for step, the union of
what ``W`` ranks with batch ``b`` see: results do not depend on how many devices ran them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch
from torch.utils.data import RandomSampler


class EpochSeededSampler(RandomSampler):
    """``randperm(len(data))`` seeded with ``seed + epoch`` (Lightning calls ``set_epoch``).

    A ``RandomSampler`` subclass, so Lightning sees the loader as shuffled and injects a
    shuffling ``DistributedSampler`` with the global seed when it runs on several processes.
    """

    def __init__(self, data_source: Sized, seed: int = 0) -> None:
        super().__init__(data_source)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        yield from torch.randperm(len(self.data_source), generator=g).tolist()
