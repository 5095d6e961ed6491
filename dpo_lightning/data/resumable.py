"""A training loader that resumes in the middle of an epoch.

Lightning restores its loop counters from a checkpoint but does not fast-forward a plain
``DataLoader``: a run resumed mid-epoch would train on the epoch's first batches again. Here the
order is a pure function of ``(seed, epoch)`` (as in ``DistributedSampler``), the loader counts
the batches it has handed out, and Lightning stores that count in the checkpoint (a loader with
``state_dict``/``load_state_dict`` is "stateful" to Lightning, which calls ``load_state_dict``
before it creates the iterator). The resumed run skips exactly the batches already trained on.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader

from dpo_lightning.data.sampler import ResumableSampler


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
