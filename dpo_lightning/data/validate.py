"""Reading raw rows with their location, and checking every row before any model work.

``datasets``' JSON loader stops at the first malformed line (and at a column whose type changes
between rows) without naming it, so JSON / JSON Lines files are read here, line by line: every
fault is tied to its 1-based line number. Other sources (parquet, csv, hub, ``save_to_disk``)
come through ``datasets`` and are located by 1-based row number.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from dpo_lightning.data.formats import InvalidRow
from dpo_lightning.data.loading import read_bytes
from dpo_lightning.data.report import DataReport, InvalidDataError

JSON_SUFFIXES = (".json", ".jsonl")


@dataclass
class Record:
    """One raw row: ``location`` (1-based line / row number), the row or why it is unreadable."""

    location: int
    row: dict[str, Any] | None = None
    fault: str | None = None


def parse_json_line(raw: bytes) -> dict[str, Any] | str:
    """A JSON Lines line as a dict, or the fault key."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return "undecodable_line"
    try:
        row = json.loads(text)
    except json.JSONDecodeError:
        return "malformed_json_line"
    return row if isinstance(row, dict) else "not_a_json_object"


def read_json_records(path: str | Path) -> Iterator[Record]:
    """Rows of a JSON Lines file (or a JSON array / column-dict file) with their line numbers.

    A whole-file JSON document (array of objects, or ``{column: [values]}``) is located by item
    number; anything else is read as JSON Lines, blank lines skipped.
    """
    data = read_bytes(path)  # decompressed when the suffix says so (.jsonl.gz)
    whole = _whole_document(data)
    if whole is not None:
        for i, row in enumerate(whole, start=1):
            yield Record(i, row) if isinstance(row, dict) else Record(i, fault="not_a_json_object")
        return
    if data.lstrip()[:1] == b"[":
        try:
            json.loads(data.decode("utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            where = f"line {err.lineno}" if isinstance(err, json.JSONDecodeError) else "bytes"
            raise InvalidDataError(f"{path}: not valid JSON ({where}): {err}; fix the file") from None
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if raw.strip():
            parsed = parse_json_line(raw)
            yield (Record(lineno, parsed) if isinstance(parsed, dict) else Record(lineno, fault=parsed))


def _whole_document(data: bytes) -> list | None:
    try:
        doc = json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if isinstance(doc, list):
        return doc
    if isinstance(doc, dict) and doc and all(isinstance(v, list) for v in doc.values()):
        n = len(next(iter(doc.values())))
        if all(len(v) == n for v in doc.values()):  # pandas-style {column: [values]}
            return [{k: v[i] for k, v in doc.items()} for i in range(n)]
    return None


def dataset_records(ds: datasets.Dataset) -> Iterator[Record]:
    """Rows of a ``datasets.Dataset``, numbered from 1."""
    for i, row in enumerate(ds, start=1):
        yield Record(i, row)


def normalize_records(
    records: Iterator[Record], fmt: Callable[[dict], dict], report: DataReport
) -> list[dict[str, Any]]:
    """Apply ``fmt`` to every record; faults go to ``report``, good rows are returned.

    Each returned row is ``{row_id, prompt, completions, pairs}``; ``row_id`` = location - 1 (a
    stable id per source row, carried through the batch as ``pair_row_ids``).
    """
    out = []
    for rec in records:
        report.rows_in += 1
        if rec.fault is not None:
            report.drop(rec.fault, rec.location)
            continue
        try:
            ex = fmt(rec.row)
        except InvalidRow as err:
            report.drop(str(err), rec.location)
            continue
        for kind, n in (ex.pop("notes", None) or {}).items():
            report.note(kind, n)
        out.append({"row_id": rec.location - 1, **ex})
    return out


def raise_if_invalid(reports: list[DataReport], on_invalid: str) -> None:
    """Under ``on_invalid=error``: one line per fault kind of every source, then stop."""
    lines = [line for r in reports for line in r.error_lines()]
    if lines and on_invalid == "error":
        raise InvalidDataError(
            "invalid preference rows (fix them, or data.on_invalid=skip trains on the rest):\n"
            + "\n".join(lines)
        )
