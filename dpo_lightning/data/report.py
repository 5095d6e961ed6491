"""Accounting for every row that is dropped or changed, so nothing is lost silently."""

from __future__ import annotations

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
    """Counts of dropped and truncated rows by reason, with the first few row numbers of each.

    ``dropped`` rows are not trained on; ``truncated`` rows are trained on, shortened; ``notes``
    count changes inside kept rows (tied pairs not formed, chat completions re-tokenised).
    ``unit`` names what the numbers in ``examples`` count (``line`` for JSON Lines files).
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

    def drop(self, reason: str, row: int) -> None:
        self.dropped[reason] += 1
        if len(self.examples[reason]) < 5:
            self.examples[reason].append(row)

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
        }

    def summary_line(self) -> str:
        return (
            f"{self.source}: {self.rows_in} rows, kept {self.rows_kept}, "
            f"dropped {dict(self.dropped) or 0}, truncated {dict(self.truncated) or 0}"
            + (f", notes {dict(self.notes)}" if self.notes else "")
            + (f", tokenization cache {self.tokenize_cache}" if self.tokenize_cache else "")
        )
