"""Formats by name (``data.format=standard``) and ``data.format=auto`` detection."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from dpo_lightning.data.chat import ConversationalFormat
from dpo_lightning.data.formats import ImplicitPromptFormat, RowFormat, StandardFormat
from dpo_lightning.data.ranked import RankedFormat
from dpo_lightning.run.errors import check_choice

FORMATS: dict[str, type[RowFormat]] = {
    "standard": StandardFormat,
    "implicit_prompt": ImplicitPromptFormat,
    "conversational": ConversationalFormat,
    "ranked": RankedFormat,
}


def detect_one(row: dict[str, Any], columns: dict[str, str | None]) -> str | None:
    """The format one row looks like, or None when it says nothing (nulls, odd types)."""

    def get(key: str) -> Any:
        return row.get(columns.get(key) or key)

    chosen, rejected = get("chosen"), get("rejected")
    if isinstance(chosen, list) and isinstance(rejected, list):
        return "conversational"
    if isinstance(chosen, str) and isinstance(rejected, str):
        prompt = get("prompt")
        if isinstance(prompt, list):
            return "conversational"
        return "standard" if isinstance(prompt, str) else "implicit_prompt"
    completions, scores = get("completions"), get("scores")
    if isinstance(completions, list) and isinstance(scores, list):
        return "ranked"
    return None


class AutoFormat:
    """Picks a format from the first rows (``data.format=auto``); refuses when unclear.

    Detected: ``{prompt, chosen, rejected}`` strings → standard; ``{chosen, rejected}`` strings →
    implicit_prompt; message lists → conversational; ``{prompt, completions, scores}`` → ranked.
    Anything else (UltraFeedback's raw ``completions`` dicts, SHP, TL;DR) needs a preset or an
    explicit ``data.format``. :meth:`detect` returns the detected format (built with this
    object's columns and system prompt); the DataModule reads rows with that one.
    """

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.columns: dict[str, str | None] = dict(kwargs.pop("columns", None) or {})
        self.system_prompt = kwargs.pop("system_prompt", None)

    def configured(
        self, columns: dict[str, str] | None = None, system_prompt: str | None = None
    ) -> AutoFormat:
        """A copy with ``columns`` merged in and, when given, another system prompt."""
        out = AutoFormat(**self.kwargs, columns={**self.columns, **(columns or {})})
        out.system_prompt = self.system_prompt if system_prompt is None else system_prompt
        return out

    def detect(self, rows: Iterable[dict[str, Any]], source: str = "data") -> RowFormat:
        votes = Counter(k for k in (detect_one(r, self.columns) for r in rows) if k)
        if len(votes) != 1:
            seen = dict(votes) or "no known layout"
            raise ValueError(
                f"{source}: cannot detect the format ({seen}); set data.format to one of "
                f"{sorted(FORMATS)} (and data.columns.* for other column names)"
            )
        name = next(iter(votes))
        print(f"[dpo_lightning] data {source}: detected format {name!r}")
        return FORMATS[name](columns=self.columns, system_prompt=self.system_prompt, **self.kwargs)

    def __repr__(self) -> str:
        return f"AutoFormat(columns={self.columns})"


def resolve_format(fmt: str | Callable | None) -> Callable:
    """A format object from a registry name, ``"auto"``, an instance, or None (standard)."""
    if fmt is None:
        return StandardFormat()
    if isinstance(fmt, str):
        if check_choice("format", fmt, ["auto", *sorted(FORMATS)]) == "auto":
            return AutoFormat()
        return FORMATS[fmt]()
    return fmt
