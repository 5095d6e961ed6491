"""The validation split: carved from train when the data has none; rows found in both splits.

A row whose content (prompt, completions, pairs: what trains) is in both the train and the
validation split makes validation metrics look better than they are. Such rows are always
counted, per source and split, in the log and in ``summary.json`` → ``data`` →
``duplicated_across_splits``; ``data.cross_split_duplicates`` says whether to keep them
(``report``, the default) or which side keeps them (``keep_in_train``: dropped from validation
as ``duplicate_of_train_row``; ``keep_in_validation``: dropped from train as
``duplicate_of_validation_row``). Such drops come from a setting, not from bad data: they are
counted but never stop a run under ``on_invalid=error``.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass
from typing import Any

import datasets

from dpo_lightning.data.validate import Ledger, SplitRows

# data.cross_split_duplicates -> (the split that drops its copies, the reason counted), or None.
CROSS_SPLIT_POLICIES: dict[str, tuple[str, str] | None] = {
    "report": None,
    "keep_in_train": ("validation", "duplicate_of_train_row"),
    "keep_in_validation": ("train", "duplicate_of_validation_row"),
}


def content_key(row: dict[str, Any]) -> bytes:
    """A digest of what a validated row trains on (its id and notes left out)."""
    body = json.dumps([row["prompt"], row["completions"], row["pairs"]], sort_keys=True, ensure_ascii=False)
    return hashlib.blake2b(body.encode(), digest_size=16).digest()


@dataclass
class Tokenized:
    """A tokenised split (``ds``: one row per kept example, with ``row_id``), the content key of
    each of its row ids and the ledger that locates them in their files."""

    ds: datasets.Dataset
    keys: dict[int, bytes]
    ledger: Ledger

    @classmethod
    def of(cls, ds: datasets.Dataset, split: SplitRows) -> Tokenized:
        return cls(ds, {r["row_id"]: content_key(r) for r in split.rows}, split.ledger)

    def select(self, indices: list[int]) -> Tokenized:
        return Tokenized(self.ds.select(indices), self.keys, self.ledger)


def split_fingerprint(split: Tokenized, salt: str) -> str:
    """A digest of what a split trains on, in order: the content keys of its rows after ``salt``
    (what else changes the tokens: tokenizer, limits). Independent of file names and row ids; an
    edit in one split leaves the other's fingerprint alone."""
    h = hashlib.sha256(salt.encode())
    for row_id in split.ds["row_id"]:
        h.update(split.keys[row_id])
    return h.hexdigest()


def carve(split: Tokenized, fraction: float, seed: int) -> tuple[Tokenized, Tokenized]:
    """Hold out ``fraction`` of the kept rows (at least one, never all), drawn with ``seed``.

    Carved after tokenisation: rows dropped there cannot leave the validation side empty, and
    the tokenisation cache does not depend on ``val_fraction`` / ``seed``.
    """
    order = list(range(len(split.ds)))
    random.Random(seed).shuffle(order)
    n_val = min(max(1, math.ceil(fraction * len(order))), max(len(order) - 1, 0))
    held = set(order[:n_val])
    return split.select([i for i in range(len(order)) if i not in held]), split.select(sorted(held))


def cross_split_duplicates(train: Tokenized, val: Tokenized, policy: str) -> tuple[Tokenized, Tokenized]:
    """Count rows whose content is in both splits (each in its own report); drop one side's
    copies when ``policy`` says so (see the module docstring). Returns the splits to train on."""
    sides = {"train": train, "validation": val}
    keys = {name: [s.keys[i] for i in s.ds["row_id"]] for name, s in sides.items()}
    other = {"train": set(keys["validation"]), "validation": set(keys["train"])}
    action = CROSS_SPLIT_POLICIES[policy]
    for name, s in sides.items():
        kept = []
        for i, (row_id, key) in enumerate(zip(s.ds["row_id"], keys[name], strict=True)):
            if key not in other[name]:
                kept.append(i)
                continue
            report, location = s.ledger.locate(row_id)
            report.duplicated_across_splits[name] += 1
            if action is not None and action[0] == name:
                report.drop(action[1], location, deliberate=True)
                report.rows_kept -= 1
            else:
                kept.append(i)
        if len(kept) < len(s.ds):
            sides[name] = s.select(kept)
    return sides["train"], sides["validation"]


def duplicates_line(train: Tokenized, val: Tokenized, policy: str) -> str | None:
    """The log line on rows found in both splits (None when there are none)."""
    reports = {id(r): r for s in (train, val) for r in s.ledger.reports}.values()
    counts = {k: sum(r.duplicated_across_splits[k] for r in reports) for k in ("train", "validation")}
    if not any(counts.values()):
        return None
    action = CROSS_SPLIT_POLICIES[policy]
    what = (
        "kept in both (data.cross_split_duplicates=keep_in_train|keep_in_validation drops one side's)"
        if action is None
        else f"dropped from {action[0]} ({action[1]})"
    )
    return (
        f"{counts['validation']} validation row(s) have the content of a train row "
        f"({counts['train']} train row(s) involved): {what}"
    )
