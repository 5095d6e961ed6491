"""Load preference data with ``datasets``: a hub id, a local file or a ``save_to_disk`` folder."""

from __future__ import annotations

from pathlib import Path

import datasets

# File suffix -> the ``datasets`` builder that reads it.
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def load_raw(path: str, name: str | None = None, split: str | None = None) -> datasets.DatasetDict:
    """Load every split of ``path`` as a ``DatasetDict``.

    ``path`` is, in this order of checks: a local data file (json/jsonl/parquet/csv), a folder
    written by ``save_to_disk``, any other local folder ``datasets`` understands, or a hub id.
    ``split`` restricts to one split (``"train"`` for a lone file).
    """
    local = Path(path).expanduser()
    if local.is_file():
        builder = FILE_BUILDERS.get(local.suffix.lower())
        if builder is None:
            raise ValueError(
                f"data.path {path!r}: unsupported file type {local.suffix!r}; "
                f"use one of {sorted(FILE_BUILDERS)} or a save_to_disk folder"
            )
        dd = datasets.load_dataset(builder, data_files={"train": str(local)})
    elif local.is_dir() and is_saved_dataset(local):
        loaded = datasets.load_from_disk(str(local))
        dd = loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict(train=loaded)
    elif local.exists() or looks_local(path):
        if not local.exists():
            raise FileNotFoundError(f"data.path {path!r} does not exist")
        dd = datasets.load_dataset(str(local), name)
    else:
        dd = datasets.load_dataset(path, name)
    if split is not None:
        if split not in dd:
            raise ValueError(f"data.path {path!r} has no split {split!r}; it has {list(dd)}")
        dd = datasets.DatasetDict({split: dd[split]})
    return dd


def looks_local(path: str) -> bool:
    """Whether a missing ``path`` was meant as a local path (not sent to the hub)."""
    return path.startswith((".", "/", "~"))


def is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").exists() or (folder / "state.json").exists()
