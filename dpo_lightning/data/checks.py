"""What the DataModule refuses before it reads a row: its own arguments, and columns that differ
from the expected ones only in case.

:func:`check_data_args` is the DataModule's argument check; ``train.py``'s preflight runs it on
``data.*`` before the tokenizer is built, the constructor on its own arguments (one definition).
"""

from __future__ import annotations

from typing import Any

from dpo_lightning.data.auto import resolve_format
from dpo_lightning.data.loading import DataFileError
from dpo_lightning.data.splits import CROSS_SPLIT_POLICIES
from dpo_lightning.data.tokenize import Limits
from dpo_lightning.run.errors import ConfigError, check_choice, check_number

ON_INVALID = ("error", "skip")
PADDING_SIDES = ("right", "left")
# The fields ``data.format=auto`` reads (a format object names its own in ``fields``).
AUTO_FIELDS = ("prompt", "chosen", "rejected", "completions", "scores")


def check_data_args(
    path: str | None = None,
    generator: Any = None,
    batch_size: int = 8,
    eval_batch_size: int | None = None,
    val_fraction: float = 0.05,
    on_invalid: str = "error",
    padding_side: str = "right",
    pad_to_multiple_of: int | None = None,
    num_workers: int = 0,
    group_mega_batch_mult: int = 50,
    num_proc: int | None = None,
    max_length: int = 512,
    max_prompt_length: int | None = None,
    truncation_mode: str = "keep_end",
    format: Any = None,
    cross_split_duplicates: str = "report",
    **_: Any,
) -> Limits:
    """The checks of :class:`PreferenceDataModule`'s arguments that need neither data nor a
    tokenizer (its constructor runs them; so does ``train.py``'s preflight, on ``data.*``, before
    the tokenizer is built). Returns the length limits. ``data.path`` itself is checked when it is
    read (:func:`~dpo_lightning.data.loading.check_data_path`; the preflight calls it too)."""
    if path is None and generator is None:
        raise ConfigError("no data: set data.path (a file, a folder or a hub dataset id)")
    check_number("batch_size", batch_size, minimum=1, integer=True)
    check_number("eval_batch_size", eval_batch_size, minimum=1, integer=True, optional=True)
    check_number("val_fraction", val_fraction, above=0, below=1)
    check_choice("on_invalid", on_invalid, ON_INVALID)
    check_choice("padding_side", padding_side, PADDING_SIDES)
    check_number("pad_to_multiple_of", pad_to_multiple_of, minimum=1, integer=True, optional=True)
    check_number("num_workers", num_workers, minimum=0, integer=True)
    check_number("group_mega_batch_mult", group_mega_batch_mult, minimum=1, integer=True)
    check_number("num_proc", num_proc, minimum=1, integer=True, optional=True)
    check_choice("cross_split_duplicates", cross_split_duplicates, tuple(CROSS_SPLIT_POLICIES))
    if isinstance(format, str):
        resolve_format(format)
    return Limits(max_length, max_prompt_length, truncation_mode)


def expected_columns(fmt: Any) -> dict[str, str]:
    """Our field -> the column a format reads it from (``data.columns`` applied)."""
    columns = getattr(fmt, "columns", None) or {}
    fields = getattr(fmt, "fields", None) or AUTO_FIELDS
    return {f: columns.get(f, f) for f in fields if columns.get(f, f)}


def check_column_case(rows: list[dict[str, Any]], expected: dict[str, str], source: str) -> None:
    """Refuse columns that differ from the expected ones only in case (``Prompt``), with the
    ``data.columns`` mapping that fixes it (rather than a missing-column fault on every row)."""
    keys = {k for row in rows for k in row}
    wrong = {
        field: key
        for field, column in expected.items()
        if column not in keys
        for key in sorted(keys)
        if key.lower() == column.lower()
    }
    if wrong:
        fix = " ".join(f"data.columns.{f}={k}" for f, k in wrong.items())
        raise DataFileError(
            f"data {source}: column(s) {', '.join(map(repr, wrong.values()))} differ from the expected "
            f"{', '.join(repr(expected[f]) for f in wrong)} only in case: map them with {fix}"
        )
