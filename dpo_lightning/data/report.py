"""Accounting for every row that is dropped or changed, so nothing is lost silently."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field


class InvalidDataError(ValueError):
    """Raised (under ``on_invalid=error``) with one line per kind of fault."""


@dataclass
class DataReport:
    """Counts of dropped and truncated rows by reason, with the first few row numbers of each.

    ``dropped`` rows are not trained on; ``truncated`` rows are trained on, shortened.
    """

    source: str = "<data>"
    dropped: Counter = field(default_factory=Counter)
    truncated: Counter = field(default_factory=Counter)
    examples: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    rows_in: int = 0

    def drop(self, reason: str, row: int) -> None:
        self.dropped[reason] += 1
        if len(self.examples[reason]) < 5:
            self.examples[reason].append(row)

    def truncate(self, reason: str, n: int = 1) -> None:
        self.truncated[reason] += n

    def error_lines(self) -> list[str]:
        """One readable line per fault kind: file, kind, first rows, total."""
        return [
            f"{self.source}: {n} row(s) with {reason} (rows {', '.join(map(str, self.examples[reason]))}"
            f"{', ...' if n > len(self.examples[reason]) else ''})"
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
        }

    def summary_line(self) -> str:
        return (
            f"{self.source}: {self.rows_in} rows, dropped {dict(self.dropped) or 0}, "
            f"truncated {dict(self.truncated) or 0}"
        )
