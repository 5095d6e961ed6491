"""Accounting for every row that is dropped or changed, so nothing is lost silently."""

from __future__ import annotations

import bisect
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from dpo_lightning.run.errors import UserError


class InvalidDataError(UserError, ValueError):
    """Raised (under ``on_invalid=error``) with one line per kind of fault."""


# What to do about a fault, by the start of its reason key (first match wins).
HINTS = {
    "missing_": "map the column with data.columns.<field>=<your column>",
    "prompt_fills_max_length": "raise data.max_length or set data.max_prompt_length to cut prompts",
    "undecodable_line": "the line is not UTF-8",
    "malformed_json_line": "the line is not one JSON object",
    "csv_extra_fields": "more fields than the header: quote fields that hold the delimiter",
    "csv_missing_fields": "fewer fields than the header: a line break or quote inside an unquoted field?",
    "malformed_csv_line": "bad quoting: a quote inside a field must be doubled and the field quoted",
    "unencodable_text": "a string holds a lone UTF-16 surrogate (JSON \\ud800 ...), not text",
    "nonfinite_score": "a score is NaN or infinite: give it a finite value or remove the completion",
    "differ_only_by_whitespace": "chosen and rejected are the same text up to whitespace: no preference",
    "identical_after_truncation": "raise data.max_length (or data.max_prompt_length) to keep the difference",
    "identical_after_tokenization": "the texts differ only in what the tokenizer cannot tell apart",
    "unknown_role": "roles must be system/user/assistant/tool (format.roles)",
    "chat_template_not_prefix": "the chat template renders the history unlike the prompt",
    "malformed_tool_call": "tool_calls must be a list of {function: {name, arguments: object}}",
    "malformed_tools": "tools must be a list of function specs (or set data.columns.tools=null)",
    "tool_message_in_completion": "a tool result is not model output: end the completion before it",
}


def hint(reason: str) -> str:
    return next((f" — {h}" for k, h in HINTS.items() if reason.startswith(k)), "")


@dataclass
class DataReport:
    """Counts of dropped and truncated rows by reason, with the first five row numbers of each.

    One report per file (or in-memory data set). Every row read is counted once:
    ``rows_in = rows_kept + sum(dropped.values())``. ``dropped`` rows are not trained on;
    ``truncated`` rows are trained on, shortened; ``notes`` count changes inside kept rows (tied
    pairs not formed, pairs that lost their difference to truncation, chat completions
    re-tokenised). ``unit`` names what the numbers in ``examples`` count (``line`` for JSON Lines
    and csv files, ``row`` for Arrow-backed data). ``duplicated_across_splits`` counts, by split,
    the rows whose content is also in the other split.
    """

    source: str = "<data>"
    dropped: Counter = field(default_factory=Counter)
    truncated: Counter = field(default_factory=Counter)
    examples: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    rows_in: int = 0
    unit: str = "row"
    notes: Counter = field(default_factory=Counter)
    rows_kept: int = 0
    tokenize_cache: str | None = None  # "hit" | "miss": whether tokenisation was loaded from cache
    # Rows whose content is also in the other split, by the split they are in.
    duplicated_across_splits: Counter = field(default_factory=Counter)
    # Reasons of rows dropped by a setting (de-duplication), not faults: no error under "error".
    deliberate: set[str] = field(default_factory=set)

    def drop(self, reason: str, row: int, deliberate: bool = False) -> None:
        self.dropped[reason] += 1
        if deliberate:
            self.deliberate.add(reason)
        # the first five rows of the file, whichever pass (validation, tokenisation) found them
        first = self.examples[reason]
        bisect.insort(first, row)
        del first[5:]

    def truncate(self, reason: str, n: int = 1) -> None:
        self.truncated[reason] += n

    def note(self, kind: str, n: int = 1) -> None:
        self.notes[kind] += n

    def error_lines(self) -> list[str]:
        """One readable line per fault kind: file, kind, first rows, total."""
        return [
            f"{self.source}: {n} row(s) with {reason} "
            f"({self.unit}s {', '.join(map(str, self.examples[reason]))}"
            f"{', ...' if n > len(self.examples[reason]) else ''}){hint(reason)}"
            for reason, n in sorted(self.dropped.items())
            if reason not in self.deliberate
        ]

    def as_dict(self) -> dict:
        return {
            "source": self.source,
            "rows_in": self.rows_in,
            "rows_dropped": sum(self.dropped.values()),
            "dropped": dict(self.dropped),
            "truncated": dict(self.truncated),
            "example_rows": {k: v for k, v in self.examples.items() if v},
            "unit": self.unit,
            "notes": dict(self.notes),
            "rows_kept": self.rows_kept,
            "tokenize_cache": self.tokenize_cache,
            "duplicated_across_splits": dict(self.duplicated_across_splits),
        }

    def summary_line(self) -> str:
        return (
            f"{self.source}: {self.rows_in} rows, kept {self.rows_kept}, "
            f"dropped {dict(self.dropped) or 0}, truncated {dict(self.truncated) or 0}"
            + (f", notes {dict(self.notes)}" if self.notes else "")
            + (f", tokenization cache {self.tokenize_cache}" if self.tokenize_cache else "")
            + (
                f", also in the other split {dict(self.duplicated_across_splits)}"
                if self.duplicated_across_splits
                else ""
            )
        )
