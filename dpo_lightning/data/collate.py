"""Collation: every completion of a batch of examples into one padded (B, T) batch.

An example holds one prompt, K ≥ 2 completions and a list of (winner, loser) index pairs into
them. Each completion becomes one row ``prompt + completion``; pair indices are offset into the
flat batch so the loss can use the index API of :func:`dpo_lightning.losses.dpo_loss` and each
completion is forwarded once, however many pairs it is in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dpo_lightning.logps import IGNORE_INDEX


@dataclass
class PreferenceCollator:
    """Pads rows of ``prompt_ids + completion_ids[k]`` and builds labels and pair indices.

    Args:
        pad_token_id: id written in padding positions (masked everywhere, its value is irrelevant).
        padding_side: ``"right"`` or ``"left"``; same results (positions come from the mask).
        pad_to_multiple_of: round T up (tensor-core friendly shapes on GPU).

    Output keys: ``input_ids``, ``attention_mask``, ``labels`` (B, T); ``chosen_idx``,
    ``rejected_idx`` (P,) into B; ``pair_row_ids`` (P,) the source row of each pair;
    ``num_pairs`` and ``num_tokens`` (real tokens) as ints.
    """

    pad_token_id: int
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        rows, labels, chosen, rejected, pair_rows = [], [], [], [], []
        for ex in examples:
            base = len(rows)
            prompt = list(ex["prompt_ids"])
            for comp in ex["completion_ids"]:
                rows.append(prompt + list(comp))
                labels.append([IGNORE_INDEX] * len(prompt) + list(comp))
            for w, lose in ex["pairs"]:
                chosen.append(base + w)
                rejected.append(base + lose)
                pair_rows.append(ex.get("row_id", -1))
        width = max(len(r) for r in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        return {
            "input_ids": self._pad(rows, self.pad_token_id, width),
            "attention_mask": self._pad([[1] * len(r) for r in rows], 0, width),
            "labels": self._pad(labels, IGNORE_INDEX, width),
            "chosen_idx": torch.tensor(chosen, dtype=torch.long),
            "rejected_idx": torch.tensor(rejected, dtype=torch.long),
            "pair_row_ids": torch.tensor(pair_rows, dtype=torch.long),
            "num_pairs": len(chosen),
            "num_tokens": sum(len(r) for r in rows),
        }

    def _pad(self, seqs: list[list[int]], value: int, width: int) -> torch.Tensor:
        out = torch.full((len(seqs), width), value, dtype=torch.long)
        for i, s in enumerate(seqs):
            if self.padding_side == "right":
                out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            else:
                out[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        return out
