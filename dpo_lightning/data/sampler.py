"""Training-order sampling: one sampler for single-process, DDP, resume and length grouping.

The order of an epoch is a pure function of ``(seed, epoch)``:

* the permutation is ``randperm(n)`` from a generator seeded ``seed + epoch`` and rank r of W takes
  ``r::W`` — exactly Lightning's ``DistributedSampler``. So one process with batch ``W·b`` sees,
  step for step, the union of what W ranks with batch ``b`` see (results do not depend on the
  device count);
* optionally (``lengths``) each rank's shard is length-grouped: cut into mega-batches, each sorted
  by length and cut into batches, full batches shuffled, a short batch last — less padding, still
  every row once per epoch in random order;
* a run resumed mid-epoch skips exactly the batches already trained on
  (:class:`ResumableDataLoader` stores the count in the checkpoint).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence, Sized
from typing import Any

from torch.utils.data import DistributedSampler


def data_parallel_position(trainer: Any) -> tuple[int, int]:
    """``(rank, replicas)`` among the ranks that see different batches: Lightning's sampler
    settings (the data-parallel mesh dimension under tensor parallelism, where the ranks of one
    TP group must read the same batch), else one process."""
    kwargs = getattr(trainer, "distributed_sampler_kwargs", None) if trainer is not None else None
    if not kwargs:
        return 0, 1
    return int(kwargs["rank"]), int(kwargs["num_replicas"])


def length_grouped_order(
    indices: Sequence[int], lengths: Sequence[int], batch_size: int, mega_batch_mult: int, seed: int
) -> list[int]:
    """Reorder ``indices`` so consecutive ``batch_size`` chunks hold similar lengths.

    Mega-batches of ``batch_size * mega_batch_mult`` indices are sorted by descending length and
    cut into batches; the full batches are shuffled (``seed``) and a short batch, if any, goes
    last, so re-chunking the flat result by ``batch_size`` gives back exactly these batches.
    """
    mega = batch_size * mega_batch_mult
    full, short = [], []
    for start in range(0, len(indices), mega):
        chunk = sorted(indices[start : start + mega], key=lambda i: -lengths[i])
        for j in range(0, len(chunk), batch_size):
            (full if len(chunk[j : j + batch_size]) == batch_size else short).append(
                chunk[j : j + batch_size]
            )
    random.Random(seed).shuffle(full)
    return [i for batch in (*full, *short) for i in batch]


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (one replica by default) with length grouping and a mid-epoch
    fast-forward.

    Being a ``DistributedSampler``, Lightning leaves it in place under DDP instead of wrapping it;
    ``set_epoch`` (called by Lightning each epoch) reseeds the permutation.

    Args:
        dataset: the indexed data set.
        batch_size: examples per batch on this rank (to convert batches into indices).
        num_replicas, rank: data-parallel world size and this rank.
        shuffle: permute each epoch (seeded by ``seed + epoch``).
        seed: permutation seed.
        lengths: per-index lengths to group batches by, or None for plain shuffling.
        mega_batch_mult: mega-batch size, in batches, for grouping.
    """

    def __init__(
        self,
        dataset: Sized,
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        lengths: Sequence[int] | None = None,
        mega_batch_mult: int = 50,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.batch_size = batch_size
        self.lengths = None if lengths is None else list(lengths)
        self.mega_batch_mult = mega_batch_mult
        self._resume: tuple[int, int] | None = None  # (epoch, batches already trained)
        self.applied_skip = 0  # batches skipped by the latest iteration

    def fast_forward(self, epoch: int, batches: int) -> None:
        """Make the next iteration of ``epoch`` start after its first ``batches`` batches."""
        self._resume = (epoch, batches)

    def pending_skip(self) -> int:
        """Batches the next iteration will skip (0 unless resuming in this epoch)."""
        return self._resume[1] if self._resume and self._resume[0] == self.epoch else 0

    # __len__ stays the full epoch, so Lightning's batch counters keep their meaning.
    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        if self.lengths is not None:
            indices = length_grouped_order(
                indices, self.lengths, self.batch_size, self.mega_batch_mult, self.seed + self.epoch
            )
        self.applied_skip = self.pending_skip()  # read by the loader's batch count
        self._resume = None
        return iter(indices[self.applied_skip * self.batch_size :])
