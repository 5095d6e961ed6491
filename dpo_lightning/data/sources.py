"""Every source the DataModule reads, as parts of splits whose records carry their location.

One reader per file type, so that a fault is tied to the file and line it is on whatever the
source is: JSON / JSON Lines (:func:`~dpo_lightning.data.validate.read_json_records`), csv / tsv
(:func:`read_csv_records`), parquet (:func:`read_parquet_records`, by row number).
``datasets`` reads these through pandas / pyarrow and stops the whole file at the first bad line
(a ``DatasetGenerationError`` with no line number); here a csv line with an extra or a missing
field, bad quoting or bytes that are not UTF-8 is a fault of that line.

A folder of data files and a hub data set are resolved to their files by ``datasets`` itself
(:func:`datasets.load_dataset_builder`: the split names and file patterns of ``load_dataset``,
hub files downloaded to its cache), then each file is read by its reader and reported on its own
(one malformed file faults its own lines). What no reader here handles — ``save_to_disk``
folders, arrow files, compressed parquet, the built-in generator — comes through ``datasets`` as
rows numbered from 1 (their values are typed by Arrow, so there is no line to be malformed).
Compressed JSON / csv files (``.gz``, ``.bz2``, ``.xz``) are read by their inner suffix, line by
line; one JSON document ``{split: [rows]}`` gives those splits, each row located by its item.
"""

from __future__ import annotations

import csv
import functools
from collections.abc import Callable, Iterator
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

from dpo_lightning.data.loading import (
    COMPRESSION,
    HUB_ERRORS,
    DataFileError,
    check_data_path,
    data_suffix,
    hub_error,
    is_saved_dataset,
    json_splits,
    load_raw,
    looks_like_file,
)
from dpo_lightning.data.report import InvalidDataError
from dpo_lightning.data.validate import Part, Record, dataset_records, read_json_records, unencodable

# Python's csv default (128 KiB per field) would fault long completions; fields are bounded by
# the file anyway.
CSV_FIELD_LIMIT = 2**31 - 1


def read_csv_records(path: str | Path, delimiter: str = ",") -> Iterator[Record]:
    """Rows of a csv file keyed by its header, located by the line each row starts on.

    Cells are text (``typed=False``: the format's number columns are parsed later, cell by
    cell); an empty cell is null, as in pandas. Faults: ``csv_extra_fields`` /
    ``csv_missing_fields`` (a row with more / fewer fields than the header),
    ``malformed_csv_line`` (bad quoting), ``undecodable_line`` (bytes that are not UTF-8).
    """
    csv.field_size_limit(CSV_FIELD_LIMIT)
    # surrogateescape: undecodable bytes become lone surrogates, found per row below, instead of
    # one UnicodeDecodeError for the whole file.
    opener = COMPRESSION.get(Path(path).suffix.lower(), open)  # pairs.csv.gz: its text, decompressed
    with opener(path, "rt", newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = csv.reader(f, delimiter=delimiter, strict=True)
        header: list[str] | None = None
        start = 1
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error:
                yield Record(start, fault="malformed_csv_line")
                start = reader.line_num + 1
                continue
            at, start = start, reader.line_num + 1
            if not fields:  # a blank line
                continue
            if header is None:
                header = _header(path, fields)
                continue
            if unencodable(fields):
                yield Record(at, fault="undecodable_line")
            elif len(fields) > len(header):
                yield Record(at, fault="csv_extra_fields")
            elif len(fields) < len(header):
                yield Record(at, fault="csv_missing_fields")
            else:
                cells = {k: v if v != "" else None for k, v in zip(header, fields, strict=True)}
                yield Record(at, cells, typed=False)


def _header(path: str | Path, fields: list[str]) -> list[str]:
    if unencodable(fields):
        raise InvalidDataError(f"{path}: the header line is not UTF-8; save the file as UTF-8")
    twice = sorted({f for f in fields if fields.count(f) > 1})
    if twice:
        raise InvalidDataError(f"{path}: column(s) {twice} appear twice in the header; rename them")
    return fields


def read_parquet_records(path: str | Path) -> Iterator[Record]:
    """Rows of a parquet file, numbered from 1 (an unreadable file is one error naming it)."""
    n = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                n += 1
                yield Record(n, row)
    except (pa.ArrowException, OSError) as err:
        raise InvalidDataError(
            f"{path}: not a readable parquet file after row {n} ({err}); rewrite or remove it"
        ) from None


# File suffix -> (reader, what its locations count).
READERS: dict[str, tuple[Callable[..., Iterator[Record]], str]] = {
    ".json": (read_json_records, "line"),
    ".jsonl": (read_json_records, "line"),
    ".csv": (read_csv_records, "line"),
    ".tsv": (functools.partial(read_csv_records, delimiter="\t"), "line"),
    ".parquet": (read_parquet_records, "row"),
}


def file_part(label: str, path: str | Path, delimiter: str | None = None) -> Part:
    """A data file as a part, read by the reader of its suffix (csv: ``delimiter`` if given)."""
    suffix = data_suffix(path)
    reader, unit = READERS[suffix]
    if delimiter is not None and suffix in (".csv", ".tsv"):  # a data set's own csv settings
        reader = functools.partial(read_csv_records, delimiter=delimiter)
    return Part(label, unit, lambda: reader(path))


def dataset_part(label: str, ds: datasets.Dataset) -> Part:
    """An in-memory / Arrow data set as a part, located by row number."""
    return Part(label, "row", lambda: dataset_records(ds))


def data_file_parts(path: str, name: str | None) -> dict[str, list[Part]] | None:
    """Each split of a folder of data files or a hub data set as one part per file, resolved (and
    downloaded) as ``load_dataset`` would; None when some file has no reader here."""
    builder = datasets.load_dataset_builder(path, name)
    files = {str(split): list(fs) for split, fs in (builder.config.data_files or {}).items()}
    if not files or getattr(builder.config, "field", None):  # json data under a key: datasets'
        return None
    if any(Path(f).suffix.lower() not in READERS for fs in files.values() for f in fs):
        return None
    # The default download cache, as load_dataset's: a file fetched by either is fetched once.
    config = datasets.DownloadConfig(token=builder.token, storage_options=builder.storage_options)
    manager = datasets.DownloadManager(
        dataset_name=builder.dataset_name, download_config=config, base_path=builder.base_path
    )
    local = manager.download(files)  # local files come back as they are
    sep = getattr(builder.config, "sep", None)
    return {s: [file_part(f, p, sep) for f, p in zip(files[s], local[s], strict=True)] for s in files}


def split_parts(
    path: str, name: str | None, train_split: str, val_split: str | None
) -> dict[str, list[Part]]:
    """The parts of the train split (and of the validation split, when ``path`` has one).

    ``path`` is, in this order of checks: a data file (the train split, whatever it is called),
    a ``save_to_disk`` folder, a folder of data files, a hub id; anything else goes to
    :func:`~dpo_lightning.data.loading.load_raw` (which also raises for what it cannot read).
    """
    check_data_path(path)  # missing, empty or unsupported: one line (never sent to the hub)
    local = Path(path).expanduser()
    compressed_parquet = local.suffix.lower() in COMPRESSION and data_suffix(local) == ".parquet"
    if local.is_file() and data_suffix(local) in READERS and not compressed_parquet:
        splits = json_splits(local) if data_suffix(local) in (".json", ".jsonl") else None
        if splits is not None:  # one JSON object {split: [rows]}
            parts = {s: [_items_part(f"{local}[{s}]", rows)] for s, rows in splits.items()}
            return _pick(parts, str(local), train_split, val_split)
        return {train_split: [file_part(str(local), local)]}
    parts = None
    if (local.is_dir() and not is_saved_dataset(local)) or (not local.exists() and not looks_like_file(path)):
        try:
            parts = data_file_parts(str(local) if local.exists() else path, name)
        except HUB_ERRORS as err:
            if local.exists():
                raise
            raise hub_error(path, err) from err
    if parts is None:
        dd = load_raw(path, name)
        if local.is_file():  # a lone file of another type: its one split is the train split
            dd = {train_split: dd["train"]}
        parts = {s: [dataset_part(f"{path}[{s}]", dd[s])] for s in dd}
    return _pick(parts, path, train_split, val_split)


def _pick(
    parts: dict[str, list[Part]], label: str, train_split: str, val_split: str | None
) -> dict[str, list[Part]]:
    """The train split and, when present, the validation split of a multi-split source."""
    if train_split not in parts:
        raise DataFileError(
            f"data {label!r} has no split {train_split!r}; it has {sorted(parts)}: "
            "set data.train_split (and data.val_split)"
        )
    return {s: parts[s] for s in (train_split, val_split) if s and s in parts}


def _items_part(label: str, items: list) -> Part:
    """A list of rows (one split of a JSON document) as a part, located by item number."""
    return Part(label, "item", lambda: (Record(i, row) for i, row in enumerate(items, start=1)))
