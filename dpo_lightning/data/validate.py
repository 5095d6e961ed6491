"""Reading raw rows with their location, and checking every row before any model work.

``datasets``' JSON loader stops at the first malformed line (and at a column whose type changes
between rows) without naming it, so JSON / JSON Lines files are read here, line by line: every
fault is tied to its 1-based line number. The other readers (csv, parquet, folders, hub data
sets, ``save_to_disk``) are in :mod:`dpo_lightning.data.sources`; all of them give
:class:`Record` s, checked here by the row format (:func:`normalize_records`) and, for every
source, for text that cannot be encoded (a lone UTF-16 surrogate such as JSON's ``"\\ud800"``
would crash the tokenizer and Arrow).
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from dpo_lightning.data.formats import InvalidRow
from dpo_lightning.data.loading import read_bytes
from dpo_lightning.data.report import DataReport, InvalidDataError

JSON_SUFFIXES = (".json", ".jsonl")


@dataclass
class Record:
    """One raw row: ``location`` (1-based line / row number), the row or why it is unreadable.

    ``typed`` is false for sources whose cells are all text (csv): the format's number columns
    are parsed from text before the row is checked (:func:`parse_numbers`).
    """

    location: int
    row: dict[str, Any] | None = None
    fault: str | None = None
    typed: bool = True


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
    if data.lstrip()[:1] == b"[" and _first_line_fault(data) is not None:
        # An array that does not parse (a JSON Lines file whose first row is an array does).
        try:
            json.loads(data.decode("utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            where = f"line {err.lineno}" if isinstance(err, json.JSONDecodeError) else "bytes"
            raise InvalidDataError(f"{path}: not valid JSON ({where}): {err}; fix the file") from None
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if raw.strip():
            parsed = parse_json_line(raw)
            yield (Record(lineno, parsed) if isinstance(parsed, dict) else Record(lineno, fault=parsed))


def _first_line_fault(data: bytes) -> str | None:
    first = next(line for line in data.split(b"\n") if line.strip())
    parsed = parse_json_line(first)
    return None if isinstance(parsed, dict) or parsed == "not_a_json_object" else parsed


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


def parse_number(text: str) -> Any:
    """``text`` as an int or a float when it reads as one (``"3"``, ``"2.5"``, ``"nan"``), else as is."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_numbers(row: dict[str, Any], columns: Sequence[str]) -> dict[str, Any]:
    """``row`` with the text of ``columns`` parsed as numbers, cell by cell: a cell that is no
    number stays text and faults its own row (``wrong_type_...``), not the whole column."""
    return {k: parse_number(v) if k in columns and isinstance(v, str) else v for k, v in row.items()}


def unencodable(value: Any) -> bool:
    """Whether any string inside ``value`` (nested lists / dicts) cannot be encoded as UTF-8."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(unencodable(v) for v in value.values())
    return isinstance(value, list | tuple) and any(unencodable(v) for v in value)


def normalize_records(
    records: Iterator[Record], fmt: Callable[[dict], dict], report: DataReport, first_id: int = 0
) -> list[dict[str, Any]]:
    """Apply ``fmt`` to every record; faults go to ``report``, good rows are returned.

    Each returned row is ``{row_id, prompt, completions, pairs}``; ``row_id`` = ``first_id`` +
    location - 1 (a stable id per source row, carried through the batch as ``pair_row_ids``).
    A row whose text cannot be encoded is the fault ``unencodable_text``.
    """
    out = []
    numbers = number_columns(fmt)
    for rec in records:
        report.rows_in += 1
        if rec.fault is not None:
            report.drop(rec.fault, rec.location)
            continue
        try:
            ex = fmt(rec.row if rec.typed else parse_numbers(rec.row, numbers))
        except InvalidRow as err:
            report.drop(str(err), rec.location)
            continue
        if unencodable(ex["prompt"]) or unencodable(ex["completions"]):
            report.drop("unencodable_text", rec.location)
            continue
        for kind, n in (ex.pop("notes", None) or {}).items():
            report.note(kind, n)
        out.append({"row_id": first_id + rec.location - 1, **ex})
    return out


def number_columns(fmt: Any) -> tuple[str, ...]:
    """The columns ``fmt`` reads as numbers (a format without the method reads none)."""
    method = getattr(fmt, "number_columns", None)
    return tuple(method()) if method is not None else ()


@dataclass
class Ledger:
    """Where each row id of a split came from: its part's report and its location there.

    A split read from several files numbers rows on across them (file 2's ids start after file
    1's last line), so ids stay unique in the split and every fault found later (tokenisation,
    de-duplication) is reported against the right file and line.
    """

    starts: list[int] = field(default_factory=list)
    reports: list[DataReport] = field(default_factory=list)
    next_id: int = 0

    def read(self, records: Iterator[Record], fmt: Callable[[dict], dict], report: DataReport) -> list[dict]:
        """Normalise one part's records, numbered from the next free id."""
        self.starts.append(self.next_id)
        self.reports.append(report)
        last = [0]

        def tracked() -> Iterator[Record]:
            for rec in records:
                last[0] = max(last[0], rec.location)
                yield rec

        rows = normalize_records(tracked(), fmt, report, first_id=self.next_id)
        self.next_id += last[0]
        return rows

    def locate(self, row_id: int) -> tuple[DataReport, int]:
        """The report and 1-based location of ``row_id``."""
        at = bisect.bisect_right(self.starts, row_id) - 1
        return self.reports[at], row_id - self.starts[at] + 1


@dataclass
class SplitRows:
    """Validated rows of one split and the ledger that locates them."""

    rows: list[dict[str, Any]]
    ledger: Ledger


@dataclass
class Part:
    """One file (or in-memory data set) of a split: its name in the report, what its locations
    count (``line`` / ``row``) and how to read its records (called once per pass)."""

    label: str
    unit: str
    records: Callable[[], Iterator[Record]]


def read_split(parts: list[Part], fmt: Callable[[dict], dict], reports: dict[str, DataReport]) -> SplitRows:
    """Every part of a split validated by ``fmt``, each counted in its own report."""
    ledger, rows = Ledger(), []
    for part in parts:
        report = reports.setdefault(part.label, DataReport(source=part.label, unit=part.unit))
        rows += ledger.read(part.records(), fmt, report)
    return SplitRows(rows, ledger)


def raise_if_invalid(reports: list[DataReport], on_invalid: str) -> None:
    """Under ``on_invalid=error``: one line per fault kind of every source, then stop."""
    lines = [line for r in reports for line in r.error_lines()]
    if lines and on_invalid == "error":
        raise InvalidDataError(
            "invalid preference rows (fix them, or data.on_invalid=skip trains on the rest):\n"
            + "\n".join(lines)
        )
