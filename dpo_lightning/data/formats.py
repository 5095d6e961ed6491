"""Row formats: turn one raw row into ``{prompt, completions, pairs}`` or name what is wrong.

A format is a callable ``row -> dict`` that raises :class:`InvalidRow` with a short reason
(``null_chosen``, ``chosen_equals_rejected``, ...); the DataModule counts reasons per row and
applies the ``on_invalid`` policy. ``completions`` is a list of K strings and ``pairs`` a list of
``[winner, loser]`` indices into it.
"""

from __future__ import annotations

from typing import Any


class InvalidRow(ValueError):
    """A row that cannot be trained on; ``args[0]`` is the reason key."""


def require_text(row: dict[str, Any], key: str) -> str:
    """``row[key]`` as a non-empty string, else :class:`InvalidRow` naming the fault."""
    if key not in row:
        raise InvalidRow(f"missing_{key}")
    value = row[key]
    if value is None:
        raise InvalidRow(f"null_{key}")
    if not isinstance(value, str):
        raise InvalidRow(f"non_string_{key}")
    if not value.strip():
        raise InvalidRow(f"empty_{key}")
    return value


class StandardFormat:
    """``{prompt, chosen, rejected}`` strings; ``columns`` maps these names to the file's."""

    required = ("prompt", "chosen", "rejected")

    def __init__(self, columns: dict[str, str] | None = None) -> None:
        self.columns = {k: k for k in self.required} | dict(columns or {})

    def source_columns(self) -> list[str]:
        return [self.columns[k] for k in self.required]

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        prompt, chosen, rejected = (require_text(row, self.columns[k]) for k in self.required)
        if chosen == rejected:
            raise InvalidRow("chosen_equals_rejected")
        return {"prompt": prompt, "completions": [chosen, rejected], "pairs": [[0, 1]]}
