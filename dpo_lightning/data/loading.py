"""Load preference data with ``datasets``: a hub id, a local file or a ``save_to_disk`` folder.

What ``data.path`` means is decided here, once (:func:`check_data_path`, called when the
DataModule is built, before any model work): an existing file or folder is local; a string that
looks like a file path (a data-file suffix, a leading ``/``, ``.`` or ``~``, more than one ``/``)
and does not exist is a "no such file" error — never sent to the hub; anything else (``name`` or
``org/name``) is a hub dataset id. Compressed files (``.gz``, ``.bz2``, ``.xz``) are read by
their inner suffix (``pairs.jsonl.gz`` is JSON Lines).
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets

from dpo_lightning.run.errors import UserError

# File suffix -> the ``datasets`` builder that reads it.
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".tsv": "csv"}
# Compression suffix -> how the stdlib opens it (``datasets`` decompresses csv/json by itself).
COMPRESSION: dict[str, Callable[..., Any]] = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


class DataFileError(UserError, ValueError):
    """A data path that cannot be used: missing, empty, of an unsupported type, unreachable."""


def data_suffix(path: str | Path) -> str:
    """The data suffix under any compression suffix: ``pairs.jsonl.gz`` -> ``.jsonl``."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] in COMPRESSION:
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def read_bytes(path: str | Path) -> bytes:
    """The file's bytes, decompressed when its suffix says so."""
    opener = COMPRESSION.get(Path(path).suffix.lower())
    if opener is None:
        return Path(path).read_bytes()
    with opener(path, "rb") as f:
        return f.read()


def looks_like_file(path: str) -> bool:
    """Whether ``path`` is meant as a local path (hub ids are ``name`` or ``org/name``)."""
    return (
        data_suffix(path) in FILE_BUILDERS
        or Path(path).suffix.lower() in COMPRESSION
        or path.startswith(("/", ".", "~"))
        or "\\" in path
        or path.count("/") > 1
    )


def check_data_path(path: str) -> None:
    """Refuse a missing, empty or unsupported local ``data.path`` in one line (see module doc)."""
    local = Path(path).expanduser()
    if local.is_file():
        if data_suffix(local) not in FILE_BUILDERS:
            raise DataFileError(
                f"data.path={path!r}: unsupported file type {''.join(local.suffixes) or '(none)'}; use "
                f"one of {sorted(FILE_BUILDERS)} (optionally .gz/.bz2/.xz) or a save_to_disk folder"
            )
        if local.stat().st_size == 0 or (data_suffix(local) in (".csv", ".tsv") and _csv_lines(local) < 2):
            raise DataFileError(
                f"data.path={path!r} has no rows (an empty file, or a csv header alone): give a "
                "file with preference rows"
            )
    elif not local.exists() and looks_like_file(path):
        raise DataFileError(
            f"data.path={path!r}: no such file or folder (looked for {local.absolute()}): check the "
            "path; a hub dataset id is 'name' or 'org/name'"
        )


def _csv_lines(path: Path) -> int:
    """Non-blank lines of a csv, counting up to 2 (a header and one row are enough)."""
    opener = COMPRESSION.get(path.suffix.lower(), open)
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        return sum(1 for _, line in zip(range(2), (ln for ln in f if ln.strip()), strict=False))


def json_splits(path: str | Path) -> dict[str, list[Any]] | None:
    """A JSON document ``{split: [row, ...], ...}`` (every value a list of objects) as its splits,
    else None (JSON Lines, an array of rows, a ``{column: [values]}`` table)."""
    data = read_bytes(path)
    if data.lstrip()[:1] != b"{":
        return None
    try:
        doc = json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None  # JSON Lines (or broken: read line by line, each fault with its line)
    if not isinstance(doc, dict) or not doc:
        return None
    rows_lists = all(isinstance(v, list) and v and all(isinstance(r, dict) for r in v) for v in doc.values())
    return doc if rows_lists else None


def load_raw(path: str, name: str | None = None, split: str | None = None) -> datasets.DatasetDict:
    """Load every split of ``path`` as a ``DatasetDict``.

    ``path`` is, in this order of checks: a local data file (json/jsonl/parquet/csv, optionally
    compressed), a folder written by ``save_to_disk``, any other local folder ``datasets``
    understands, or a hub id. ``split`` restricts to one split (``"train"`` for a lone file).
    """
    check_data_path(path)
    local = Path(path).expanduser()
    if local.is_file():
        builder = FILE_BUILDERS[data_suffix(local)]
        dd = datasets.load_dataset(builder, data_files={"train": str(local)})
    elif local.is_dir() and is_saved_dataset(local):
        loaded = datasets.load_from_disk(str(local))
        dd = loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict(train=loaded)
    elif local.exists():
        dd = datasets.load_dataset(str(local), name)
    else:
        dd = _load_hub(path, name)
    if split is not None:
        if split not in dd:
            raise DataFileError(f"data.path {path!r} has no split {split!r}; it has {list(dd)}")
        dd = datasets.DatasetDict({split: dd[split]})
    return dd


def _load_hub(path: str, name: str | None) -> datasets.DatasetDict:
    try:
        return datasets.load_dataset(path, name)
    except HUB_ERRORS as err:
        raise hub_error(path, err) from err


#: What ``datasets`` raises for a hub id it cannot load: offline, unreachable, no such dataset.
HUB_ERRORS = (ConnectionError, FileNotFoundError)


def hub_error(path: str, err: BaseException) -> DataFileError:
    """The one line for a hub dataset id that cannot be loaded (``err``: one of :data:`HUB_ERRORS`)."""
    first = " ".join(str(err).split())[:200]
    return DataFileError(
        f"data.path={path!r} is a hub dataset id that cannot be loaded ({first}): check the id, "
        "go online (unset HF_DATASETS_OFFLINE), or give a local copy (data.path=<file or folder>)"
    )


def is_saved_dataset(folder: Path) -> bool:
    """A folder written by ``save_to_disk`` (a ``Dataset`` or a ``DatasetDict``)."""
    return (folder / "dataset_dict.json").exists() or (folder / "state.json").exists()
