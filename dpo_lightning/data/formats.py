"""Row formats: turn one raw row into ``{prompt, completions, pairs}`` or name what is wrong.

A format is a callable ``row -> dict`` that raises :class:`InvalidRow` with a short reason key
(``null_chosen``, ``chosen_equals_rejected``, ``differ_only_by_whitespace``, ...);
:mod:`dpo_lightning.data.validate` counts reasons per row and applies ``data.on_invalid``.
``completions`` is a list of K completions and ``pairs`` a list of ``[winner, loser]`` indices
into it. A format may add ``notes`` (``{kind: count}``) for things it changed without dropping
the row (ties dropped, ...).

Text formats (this module, :class:`~dpo_lightning.data.ranked.RankedFormat`) give strings;
:class:`~dpo_lightning.data.chat.ConversationalFormat` gives message lists rendered later with the
tokenizer's chat template. Each format says how its rows are tokenised (``tokenize_batch``).

Formats by config name (``data.format=<name>``): see :data:`dpo_lightning.data.auto.FORMATS`.
"""

from __future__ import annotations

import copy
import string
from collections.abc import Callable, Sequence
from typing import Any

from dpo_lightning.data.tokenize import tokenize_text_batch


class InvalidRow(ValueError):
    """A row that cannot be trained on; ``args[0]`` is the reason key."""


def require_value(row: dict[str, Any], key: str) -> Any:
    """``row[key]``, else :class:`InvalidRow` ``missing_<key>`` / ``null_<key>``."""
    if key not in row:
        raise InvalidRow(f"missing_{key}")
    if row[key] is None:
        raise InvalidRow(f"null_{key}")
    return row[key]


def check_text(value: Any, key: str) -> str:
    """``value`` as a non-empty string, else ``null_/wrong_type_/empty_<key>``."""
    if value is None:
        raise InvalidRow(f"null_{key}")
    if not isinstance(value, str):
        raise InvalidRow(f"wrong_type_{key}")
    if not value.strip():
        raise InvalidRow(f"empty_{key}")
    return value


def require_text(row: dict[str, Any], key: str) -> str:
    """``row[key]`` as a non-empty string, else :class:`InvalidRow` naming the fault."""
    return check_text(require_value(row, key), key)


def squash_whitespace(value: Any) -> Any:
    """``value`` with the whitespace removed from every string in it (message lists too)."""
    if isinstance(value, str):
        return "".join(value.split())
    if isinstance(value, dict):
        return {k: squash_whitespace(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [squash_whitespace(v) for v in value]
    return value


def check_preference(chosen: Any, rejected: Any) -> None:
    """:class:`InvalidRow` when chosen and rejected are the same (``chosen_equals_rejected``) or
    the same up to whitespace (``differ_only_by_whitespace``): no preference to learn."""
    if chosen == rejected:
        raise InvalidRow("chosen_equals_rejected")
    if squash_whitespace(chosen) == squash_whitespace(rejected):
        raise InvalidRow("differ_only_by_whitespace")


def render_template(template: str, row: dict[str, Any]) -> str:
    """``template.format_map(row)`` with every field checked (``missing_/null_<field>``).

    Fields may index nested values: ``"TITLE: {info[title]}"`` (the TL;DR comparisons schema).
    """
    fmt = string.Formatter()
    for _, field, _, _ in fmt.parse(template):
        if field is None:
            continue
        try:
            value, _ = fmt.get_field(field, (), row)
        except (KeyError, IndexError, TypeError):
            raise InvalidRow(f"missing_{field}") from None
        check_text(value, field)
    return template.format_map(row)


class RowFormat:
    """Shared by all formats: column mapping, an optional prompt template and system prompt.

    Args:
        columns: our field names to the data's (``{prompt: question, chosen: good}``); a field
            mapped to ``null`` is treated as absent.
        system_prompt: text put before every prompt (text formats: followed by
            ``system_separator``; chat formats: a leading ``system`` message). A ``system``
            column, when mapped and present in a row, overrides it for that row.
        system_separator: between a system prompt and the prompt, for text formats.
        prompt_template: build the prompt from several columns, e.g.
            ``"TITLE: {info[title]}\\nPOST: {info[post]}\\nTL;DR:"`` (overrides ``columns.prompt``).
    """

    fields: tuple[str, ...] = ()

    def __init__(
        self,
        columns: dict[str, str | None] | None = None,
        system_prompt: str | None = None,
        system_separator: str = "\n\n",
        prompt_template: str | None = None,
    ) -> None:
        self.columns: dict[str, str | None] = {k: k for k in self.fields} | dict(columns or {})
        self.system_prompt = system_prompt
        self.system_separator = system_separator
        self.prompt_template = prompt_template

    def configured(
        self, columns: dict[str, str] | None = None, system_prompt: str | None = None
    ) -> RowFormat:
        """A copy with ``columns`` merged over this format's mapping and, when given, another
        system prompt (``data.columns`` / ``data.system_prompt``); this object is left as it is."""
        out = copy.copy(self)
        out.columns = {**self.columns, **(columns or {})}
        if system_prompt is not None:
            out.system_prompt = system_prompt
        return out

    def col(self, key: str) -> str | None:
        return self.columns.get(key, key)

    def source_columns(self) -> list[str]:
        return [c for c in self.columns.values() if c]

    def number_columns(self) -> tuple[str, ...]:
        """Columns read as numbers (parsed from text in csv files); none for pair formats."""
        return ()

    def system_for(self, row: dict[str, Any]) -> str | None:
        col = self.columns.get("system")
        if col and row.get(col) is not None:
            return check_text(row[col], col)
        return self.system_prompt

    def with_system_text(self, prompt: str, row: dict[str, Any]) -> str:
        """``prompt`` with the row's (or the format's) system prompt in front, for text formats."""
        system = self.system_for(row)
        return prompt if system is None else f"{system}{self.system_separator}{prompt}"

    def with_system_message(self, prompt: list[dict[str, Any]], row: dict[str, Any]) -> list[dict[str, Any]]:
        """Messages with a leading ``system`` turn from the system prompt (none when the
        conversation already opens with one)."""
        system = self.system_for(row)
        if system is None or prompt[0]["role"] == "system":
            return prompt
        return [{"role": "system", "content": system}, *prompt]

    def text_prompt(self, row: dict[str, Any]) -> str:
        """The prompt string: template or column, with the system prompt in front."""
        if self.prompt_template is not None:
            return self.with_system_text(render_template(self.prompt_template, row), row)
        return self.with_system_text(require_text(row, self.col("prompt")), row)

    @property
    def tokenize_batch(self) -> Callable[..., dict[str, list]]:
        """The ``datasets.map`` function for this format's rows (text: prompt and completions
        tokenised separately, see :mod:`dpo_lightning.data.tokenize`)."""
        return tokenize_text_batch

    def __repr__(self) -> str:
        return f"{type(self).__name__}({vars(self)})"


class StandardFormat(RowFormat):
    """``{prompt, chosen, rejected}`` strings (the paper's IMDb pairs and most pair sets)."""

    fields = ("prompt", "chosen", "rejected")

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        prompt = self.text_prompt(row)
        chosen, rejected = (require_text(row, self.col(k)) for k in ("chosen", "rejected"))
        check_preference(chosen, rejected)
        return {"prompt": prompt, "completions": [chosen, rejected], "pairs": [[0, 1]]}


def common_prefix(a: Sequence, b: Sequence) -> int:
    """Length of the longest common prefix of two sequences (strings or lists)."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def shared_prefix_cut(a: str, b: str, marker: str | None) -> int:
    """Where the prompt of two transcripts ends.

    With ``marker`` (HH-RLHF: ``"\\n\\nAssistant:"``): just after its last occurrence inside the
    longest common prefix. Otherwise, or when the marker is absent: the longest common prefix,
    backed off to the last whitespace so no word is split between prompt and completion.
    """
    n = common_prefix(a, b)
    if marker:
        at = a.rfind(marker, 0, n)
        if at >= 0 and at + len(marker) <= n:
            return at + len(marker)
    if n < min(len(a), len(b)) and n > 0 and not a[n - 1].isspace():
        n = max(a.rfind(" ", 0, n), a.rfind("\n", 0, n)) + 1
    return n


class ImplicitPromptFormat(RowFormat):
    """``{chosen, rejected}`` whole transcripts sharing their prompt (Anthropic HH-RLHF).

    The prompt is the shared prefix (see :func:`shared_prefix_cut`), the completions the rest.

    Args:
        marker: the prompt ends after the last ``marker`` in the shared prefix (null: longest
            common prefix).
    """

    fields = ("chosen", "rejected")

    def __init__(self, marker: str | None = "\n\nAssistant:", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.marker = marker

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        chosen, rejected = (require_text(row, self.col(k)) for k in ("chosen", "rejected"))
        check_preference(chosen, rejected)
        cut = shared_prefix_cut(chosen, rejected, self.marker)
        prompt = chosen[:cut]
        if not prompt.strip():
            raise InvalidRow("no_shared_prompt")
        completions = [chosen[cut:], rejected[cut:]]
        if not all(c.strip() for c in completions):
            raise InvalidRow("empty_completion")
        return {"prompt": self.with_system_text(prompt, row), "completions": completions, "pairs": [[0, 1]]}


class TextFormat(RowFormat):
    """Plain text rows ``{text}`` for language-model fine-tuning (``data=text``): an empty prompt
    (the tokenizer adds BOS where the model uses one), the text as the single completion, no pairs.

    Args:
        columns: ``{"text": your column}`` when the text column has another name.
    """

    fields = ("text",)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        return {"prompt": "", "completions": [require_text(row, self.col("text"))], "pairs": []}
