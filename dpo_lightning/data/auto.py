"""Formats by name (``data.format=standard``) and ``data.format=auto`` detection."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from dpo_lightning.data.chat import ConversationalFormat
from dpo_lightning.data.formats import ImplicitPromptFormat, RowFormat, StandardFormat
from dpo_lightning.data.ranked import RankedFormat
from dpo_lightning.data.unpaired import ConversationalUnpairedFormat, UnpairedFormat
from dpo_lightning.run.errors import check_choice

FORMATS: dict[str, type[RowFormat]] = {
    "standard": StandardFormat,
    "implicit_prompt": ImplicitPromptFormat,
    "conversational": ConversationalFormat,
    "ranked": RankedFormat,
    "unpaired": UnpairedFormat,
    "unpaired_conversational": ConversationalUnpairedFormat,
}


# The share of the sampled rows that show a layout which that layout must have to be picked:
# a minority of bad rows does not block detection (they are then checked, and counted, as rows
# of the detected format), a real mix of layouts does.
MAJORITY = 0.8


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
        if prompt is None:  # no prompt column, or a null one: the prompt is in the transcripts
            return "implicit_prompt"
        return "standard" if isinstance(prompt, str) else None
    completions, scores = get("completions"), get("scores")
    if isinstance(completions, list) and isinstance(scores, list):
        return "ranked"
    completion, label = get("completion"), get("label")
    if isinstance(label, bool) and isinstance(completion, str | list):
        return "unpaired_conversational" if isinstance(completion, list) else "unpaired"
    return None


class AutoFormat:
    """Picks a format from the first rows (``data.format=auto``); refuses when unclear.

    The layout shown by at least :data:`MAJORITY` of the sampled rows that show one is picked;
    the other rows (an int prompt, a null, ...) are then checked, and dropped or stopped on, as
    rows of that format. Below that share the data is a mix, and detection refuses.

    Detected: ``{prompt, chosen, rejected}`` strings → standard; ``{chosen, rejected}`` strings →
    implicit_prompt; message lists → conversational; ``{prompt, completions, scores}`` → ranked;
    ``{prompt, completion, label: bool}`` → unpaired (message lists: unpaired_conversational).
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
        rows = list(rows)
        votes = Counter(k for k in (detect_one(r, self.columns) for r in rows) if k)
        name, n = votes.most_common(1)[0] if votes else (None, 0)
        if name is None or n < MAJORITY * sum(votes.values()):
            seen = dict(votes) or "no known layout"
            raise ValueError(
                f"{source}: cannot detect the format ({seen}); set data.format to one of "
                f"{sorted(FORMATS)} (and data.columns.* for other column names)"
            )
        others = f"; the other {len(rows) - n} are checked as such rows" if n < len(rows) else ""
        print(f"[dpo_lightning] data {source}: detected format {name!r} ({n} of {len(rows)} rows{others})")
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
