"""Collation: every completion of a batch of examples into one padded (B, T) batch.

An example holds one prompt, K ≥ 2 completions and a list of (winner, loser) index pairs into
them. Each completion becomes one row ``prompt + completion``; pair indices are offset into the
flat batch (:func:`flat_pairs`) so the loss can use the index API of
:func:`dpo_lightning.losses.dpo_loss` and each completion is forwarded once, however many pairs
it is in. The packed layout (:mod:`dpo_lightning.engine.packing`) numbers completions and pairs
the same way.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

#: Label of positions that are not predicted (prompt, padding): HF's cross-entropy ignore index.
IGNORE_INDEX = -100


class BatchLayout(Protocol):
    """What the DataModule needs from whoever reads its batches (a forward engine): the collator.

    ``collator(pad_token_id, padding_side, pad_to_multiple_of)`` builds the ``examples -> batch``
    callable; a layout that cannot honour a padding setting raises a one-line error here.
    """

    def collator(
        self, pad_token_id: int, padding_side: str = "right", pad_to_multiple_of: int | None = None
    ) -> Any: ...


@dataclass
class FlatPairs:
    """Pairs of a batch as indices into its flat list of completions (0..B-1, example order).

    Attributes:
        chosen, rejected: (P,) completion index of each pair's winner / loser.
        row_ids: (P,) source row of each pair (-1 when the example carries none).
        num_completions: B.
    """

    chosen: list[int]
    rejected: list[int]
    row_ids: list[int]
    num_completions: int


def flat_pairs(examples: list[dict[str, Any]]) -> FlatPairs:
    """Offset each example's ``pairs`` by the completions of the examples before it."""
    out = FlatPairs([], [], [], 0)
    for ex in examples:
        base = out.num_completions
        for w, lose in ex["pairs"]:
            out.chosen.append(base + w)
            out.rejected.append(base + lose)
            out.row_ids.append(ex.get("row_id", -1))
        out.num_completions += len(ex["completion_ids"])
    return out


def content_key(prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> int:
    """A signed 64-bit key of one completion row from its token ids alone: the prompt's length,
    the prompt ids and the completion ids (so the prompt/completion split is part of the key).

    Independent of the batch layout (padded rows of either padding side and any width, or packed
    rows with or without prefix sharing), so caches keyed by it serve every engine.
    """
    h = hashlib.blake2b(digest_size=8)
    h.update(array("q", [len(prompt_ids), *prompt_ids]).tobytes())
    h.update(array("q", completion_ids).tobytes())
    return int.from_bytes(h.digest(), "little", signed=True)


def completion_keys(examples: list[dict[str, Any]]) -> list[int]:
    """:func:`content_key` of every completion of ``examples``, in the flat completion order (B)."""
    return [content_key(ex["prompt_ids"], comp) for ex in examples for comp in ex["completion_ids"]]


def pair_tensors(pairs: FlatPairs) -> dict[str, Any]:
    """The batch keys every layout shares: ``chosen_idx``, ``rejected_idx``, ``pair_row_ids`` (P,),
    ``num_completions`` (B) and ``num_pairs`` (P) as ints."""
    long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return {
        "chosen_idx": long(pairs.chosen),
        "rejected_idx": long(pairs.rejected),
        "pair_row_ids": long(pairs.row_ids),
        "num_completions": pairs.num_completions,
        "num_pairs": len(pairs.chosen),
    }


@dataclass
class PreferenceCollator:
    """Pads rows of ``prompt_ids + completion_ids[k]`` and builds labels and pair indices.

    Args:
        pad_token_id: id written in padding positions (masked everywhere, its value is irrelevant).
        padding_side: ``"right"`` or ``"left"``; same results (positions come from the mask).
        pad_to_multiple_of: round T up (tensor-core friendly shapes on GPU).

    Output keys: ``input_ids``, ``attention_mask``, ``labels`` (B, T); ``chosen_idx``,
    ``rejected_idx`` (P,) into B; ``pair_row_ids`` (P,) the source row of each pair;
    ``num_completions`` (B), ``num_pairs`` and ``num_tokens`` (real tokens) as ints;
    ``completion_keys`` (B python ints, :func:`content_key`).
    """

    pad_token_id: int
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        rows, labels = [], []
        for ex in examples:
            prompt = list(ex["prompt_ids"])
            for comp in ex["completion_ids"]:
                rows.append(prompt + list(comp))
                labels.append([IGNORE_INDEX] * len(prompt) + list(comp))
        width = max(len(r) for r in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        return {
            "input_ids": self._pad(rows, self.pad_token_id, width),
            "attention_mask": self._pad([[1] * len(r) for r in rows], 0, width),
            "labels": self._pad(labels, IGNORE_INDEX, width),
            **pair_tensors(flat_pairs(examples)),
            "num_tokens": sum(len(r) for r in rows),
            "completion_keys": completion_keys(examples),
        }

    def _pad(self, seqs: list[list[int]], value: int, width: int) -> torch.Tensor:
        out = torch.full((len(seqs), width), value, dtype=torch.long)
        for i, s in enumerate(seqs):
            if self.padding_side == "right":
                out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            else:
                out[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        return out
