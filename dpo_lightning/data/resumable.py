"""A training loader that resumes in the middle of an epoch.

Lightning restores its loop counters from a checkpoint but does not fast-forward a plain
``DataLoader``: a run resumed mid-epoch would train on the epoch's first batches again. Here the
order is a pure function of ``(seed, epoch)`` (as in ``DistributedSampler``), the loader counts
the batches it has handed out, and Lightning stores that count in the checkpoint (a loader with
``state_dict``/``load_state_dict`` is "stateful" to Lightning, which calls ``load_state_dict``
before it creates the iterator). The resumed run skips exactly the batches already trained on.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

from torch.utils.data import DataLoader, DistributedSampler


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (one replica by default) with a one-shot mid-epoch fast-forward.

    Being a ``DistributedSampler``, Lightning leaves it in place under DDP instead of wrapping
    it; ``set_epoch`` (called by Lightning each epoch) reseeds the permutation.

    Args:
        dataset: the indexed data set.
        batch_size: examples per batch on this rank (to convert batches into indices).
        num_replicas, rank: data-parallel world size and this rank.
        shuffle: permute each epoch (seeded by ``seed + epoch``).
        seed: permutation seed.
    """

    def __init__(
        self,
        dataset: Sized,
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.batch_size = batch_size
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
        self.applied_skip = self.pending_skip()  # read by the loader's batch count
        self._resume = None
        return iter(indices[self.applied_skip * self.batch_size :])


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResumableSampler` whose state is its epoch position.

    ``state_dict()`` = ``{"epoch", "batches"}``: the batches handed out so far in this epoch
    (Lightning does not prefetch from sized loaders, so that is what was trained on when a
    checkpoint is written after a batch).
    """

    sampler: ResumableSampler

    def __init__(self, dataset: Any, sampler: ResumableSampler, **kwargs: Any) -> None:
        super().__init__(dataset, sampler=sampler, batch_size=sampler.batch_size, **kwargs)
        self._yielded = 0

    def __iter__(self) -> Iterator[Any]:
        self._yielded = self.sampler.pending_skip()
        return _Counting(super().__iter__(), self)

    def state_dict(self) -> dict[str, int]:
        if self._yielded >= len(self):  # epoch finished: resume at the next one's start
            return {"epoch": self.sampler.epoch + 1, "batches": 0}
        return {"epoch": self.sampler.epoch, "batches": self._yielded}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.sampler.set_epoch(state_dict["epoch"])
        self.sampler.fast_forward(state_dict["epoch"], state_dict["batches"])


class _Counting:
    """Iterator wrapper counting the batches a loader yields."""

    def __init__(self, it: Iterator[Any], loader: ResumableDataLoader) -> None:
        self._it, self._loader = it, loader
        self._first = True

    def __iter__(self) -> _Counting:
        return self

    def __next__(self) -> Any:
        batch = next(self._it)
        if self._first:  # the sampler has run now: count from the skip it really applied
            self._loader._yielded = self._loader.sampler.applied_skip
            self._first = False
        self._loader._yielded += 1
        return batch

    def __len__(self) -> int:
        return len(self._it)
