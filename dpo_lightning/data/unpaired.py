"""Unpaired preference data: labelled completions ``{prompt, completion, label}``, no pairs.

TRL 1.16's unpaired preference format (KTO, BCO): each row is one prompt and one completion
marked desirable (``label: true``) or undesirable. A normalised row holds ``labels`` — one bool per
completion — and no ``pairs``. Paired data becomes unpaired with ``data.unpair=true``
(:func:`unpair_example`: per pair, the chosen completion desirable and the rejected one
undesirable, both kept with their shared prompt, as TRL's ``unpair_preference_dataset``).

At collation (:class:`LabelledCollator`) every batch of labelled rows also gets ``mismatched``:
the same collator's batch of each prompt with the completions of the previous example of the batch
(example i's prompt with example i − 1's completions, cyclically), the mismatched pairs from which
KTO estimates its KL reference point. TRL 1.16 builds them when tokenising, over a fixed batch order
(which forces sequential sampling); here they come from whatever batch the sampler drew.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from dpo_lightning.data.chat import ROLES, as_turns, tokenize_chat_batch
from dpo_lightning.data.formats import InvalidRow, RowFormat, require_text, require_value
from dpo_lightning.data.tokenize import Limits


def require_label(row: dict[str, Any], key: str) -> bool:
    """``row[key]`` as a bool (``missing_/null_/wrong_type_<key>``; 0/1 and strings are refused)."""
    value = require_value(row, key)
    if not isinstance(value, bool):
        raise InvalidRow(f"wrong_type_{key}")
    return value


class UnpairedFormat(RowFormat):
    """``{prompt, completion, label}`` rows with string prompt and completion (TRL's standard
    unpaired preference type), tokenised like the pair formats. ``label`` must be a bool."""

    fields = ("prompt", "completion", "label")

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        prompt = self.text_prompt(row)
        completion = require_text(row, self.col("completion"))
        label = require_label(row, self.col("label"))
        return {"prompt": prompt, "completions": [completion], "pairs": [], "labels": [label]}


class ConversationalUnpairedFormat(UnpairedFormat):
    """``{prompt, completion, label}`` with message lists (TRL's conversational unpaired type, e.g.
    ``trl-lib/kto-mix-14k``): the prompt's messages (a string: one user turn) and the completion's
    assistant messages (a string: one assistant turn), rendered with the chat template."""

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        col = self.col("prompt")
        prompt = self.with_system_message(as_turns(require_value(row, col), col, "user", ROLES), row)
        col = self.col("completion")
        completion = as_turns(require_value(row, col), col, "assistant", ROLES)
        if completion[0]["role"] != "assistant":
            raise InvalidRow("completion_not_assistant")
        label = require_label(row, self.col("label"))
        return {"prompt": prompt, "completions": [completion], "pairs": [], "labels": [label]}

    @property
    def tokenize_batch(self) -> Callable[..., dict[str, list]]:
        return tokenize_chat_batch


def unpair_example(example: dict[str, Any]) -> dict[str, Any]:
    """A normalised paired row as labelled completions; an unpaired row unchanged.

    Every pair ``[w, l]`` gives completion w labelled desirable and completion l undesirable (a
    completion in several pairs of a ranking appears once per pair, as TRL's unpairing does per
    row). Raises :class:`InvalidRow` ``no_pairs_to_unpair`` for a row with neither.
    """
    if "labels" in example:
        return example
    pairs = example.get("pairs") or []
    if not pairs:
        raise InvalidRow("no_pairs_to_unpair")
    completions = [example["completions"][i] for pair in pairs for i in pair]
    out = {k: v for k, v in example.items() if k not in ("completions", "pairs")}
    return {**out, "completions": completions, "pairs": [], "labels": [True, False] * len(pairs)}


def mismatched_examples(
    examples: list[dict[str, Any]], limits: Limits | None = None, bos_token_id: int | None = None
) -> list[dict[str, Any]]:
    """Example i's prompt with example i − 1's completions (cyclic), cut to ``limits`` by the data's
    truncation policy (None: as is; a leading ``bos_token_id`` of the prompt is kept).

    Needs two examples or more (one example has no other completions to pair with).
    """
    out = []
    for i, ex in enumerate(examples):
        prompt, completions = list(ex["prompt_ids"]), [list(c) for c in examples[i - 1]["completion_ids"]]
        if limits is not None:
            cut = limits.apply(prompt, completions, bos_token_id)
            prompt, completions = cut.prompt_ids, cut.completion_ids
        out.append(
            {"prompt_ids": prompt, "completion_ids": completions, "pairs": [], "row_id": ex.get("row_id", -1)}
        )
    return out


@dataclass
class LabelledCollator:
    """Wraps a layout's collator; batches of labelled examples get the unpaired keys.

    Args:
        collate: the engine's ``examples -> batch`` collator (padded or packed).
        limits: the data's length limits, applied to the mismatched rows (a long prompt with
            another example's long completion would exceed ``max_length`` otherwise).
        bos_token_id: the tokenizer's BOS, kept at the start of a cut prompt.

    Added keys (only when the examples carry ``labels``): ``completion_labels`` (B,) bool, one per
    completion; ``pair_row_ids`` (B,) the source row of each labelled completion (the units a
    fault report names); ``mismatched``: the collator's batch of :func:`mismatched_examples`, or
    None for a single-example batch.
    """

    collate: Callable[[list[dict[str, Any]]], dict[str, Any]]
    limits: Limits | None = None
    bos_token_id: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collate(examples)
        if "labels" not in examples[0]:
            return batch
        labels = [bool(x) for ex in examples for x in ex["labels"]]
        rows = [ex.get("row_id", -1) for ex in examples for _ in ex["labels"]]
        batch["completion_labels"] = torch.tensor(labels, dtype=torch.bool)
        batch["pair_row_ids"] = torch.tensor(rows, dtype=torch.long)
        batch["mismatched"] = (
            self.collate(mismatched_examples(examples, self.limits, self.bos_token_id))
            if len(examples) > 1
            else None
        )
        return batch
