"""Streaming preference data (``data.streaming=true``): rows read, validated and tokenised on the
fly, for data larger than memory or disk.

    dpo-train data=file data.path=/data/pairs/ data.streaming=true trainer.max_steps=20000
    dpo-train data=ultrafeedback_binarized data.streaming=true     # a hub data set, streamed

**Sources.** A local folder of ``*.jsonl`` shards (or one ``.jsonl`` file) is read line by line
with :func:`~dpo_lightning.data.validate.parse_json_line` (a fault is tied to its file and
line; a resumed reader seeks to its byte offset). Anything else (a hub id, a folder of parquet)
goes through ``datasets.load_dataset(..., streaming=True)``, one shard per ``n_shards`` (a resumed
reader skips the rows it had read).

**Order and sharding.** Each data-parallel rank runs ``max(1, num_workers)`` loader workers, each
one *stream*: S = ranks × workers streams in all. Epoch e permutes the shards with ``seed + e``;
with at least S shards stream s reads shards ``s, s+S, ...`` of that order, with fewer each stream
reads them all and keeps the rows whose position in the epoch is ``s`` modulo S. Either way every
row goes to exactly one stream per epoch, and rows keep their file order inside a shard (shuffle
the shards' contents beforehand). A stream runs epoch after epoch, so the ranks never run dry at
different steps; the run is bounded by ``trainer.max_steps`` (required).

**Validation split.** The first ``data.streaming_val_rows`` rows of the first shard (by name),
read, validated and tokenised like in-memory data; the training streams skip them.

**Row accounting.** Every row goes through :func:`~dpo_lightning.data.validate.normalize_records`
and the format's tokenisation, and :func:`~dpo_lightning.data.tokenize.count_tokenized`, into one
:class:`~dpo_lightning.data.report.DataReport` per shard, as in memory; ``summary.json`` gets the
counts of the rows the run read (all ranks, all workers). Under ``data.on_invalid=error`` the first
bad row stops the run with its file and line (earlier checkpoints stay resumable); the first
``streaming_val_rows`` + 256 rows are checked before any model work.

**Resume.** Each batch carries its stream's position after its last row (epoch, shard, offset)
and the stream's counts; :class:`StreamingLoader` keeps the latest per stream and is stateful to
Lightning (its state gathered from every rank), so a checkpoint holds every stream's position
and a resumed run continues each stream after exactly the rows already trained on (Lightning
does not prefetch from a loader with a length).

Not with streaming: ``reference=precomputed`` (a pass over the whole data before training),
``data.group_by_length``.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dpo_lightning.data.datamodule import PreferenceDataModule
from dpo_lightning.data.report import DataReport, InvalidDataError
from dpo_lightning.data.sampler import data_parallel_position
from dpo_lightning.data.tokenize import count_tokenized
from dpo_lightning.data.validate import (
    Ledger,
    Record,
    SplitRows,
    normalize_records,
    parse_json_line,
    raise_if_invalid,
)
from dpo_lightning.run.errors import SettingError, UserError, check_number

STATE_KEY = "stream_state"  # batch key carrying the stream's position (removed before training)
PROBE_ROWS = 256  # training rows checked before any model work


# -- shards ------------------------------------------------------------------------------------
@dataclass
class JsonlShard:
    """One JSON Lines file; positions are ``(byte offset, lines read)``."""

    path: Path
    unit: str = "line"

    @property
    def label(self) -> str:
        return str(self.path)

    def records(self, position: tuple[int, int] = (0, 0)) -> Iterator[tuple[Record, tuple[int, int]]]:
        offset, line = position
        with open(self.path, "rb") as f:
            f.seek(offset)
            for raw in iter(f.readline, b""):
                offset, line = offset + len(raw), line + 1
                if raw.strip():
                    parsed = parse_json_line(raw)
                    rec = Record(line, parsed) if isinstance(parsed, dict) else Record(line, fault=parsed)
                    yield rec, (offset, line)


@dataclass
class DatasetShard:
    """Shard ``index`` of a streamed ``datasets.IterableDataset``; positions are ``(rows read, 0)``."""

    dataset: Any
    index: int
    name: str
    unit: str = "row"

    @property
    def label(self) -> str:
        return f"{self.name} shard {self.index}"

    def records(self, position: tuple[int, int] = (0, 0)) -> Iterator[tuple[Record, tuple[int, int]]]:
        part = self.dataset.shard(num_shards=self.dataset.n_shards, index=self.index)
        for n, row in enumerate(itertools.islice(part, position[0], None), start=position[0] + 1):
            yield Record(n, dict(row)), (n, 0)


def list_shards(path: str, name: str | None, split: str) -> list[JsonlShard | DatasetShard]:
    """The shards of ``path``: local ``.jsonl`` files (sorted), else a streamed ``datasets`` split."""
    local = Path(path).expanduser()
    if local.is_file() and local.suffix == ".jsonl":
        return [JsonlShard(local)]
    if local.is_dir() and any(local.rglob("*.jsonl")):
        return [JsonlShard(p) for p in sorted(local.rglob("*.jsonl"))]
    if local.is_file():
        raise UserError(f"data.streaming=true reads .jsonl files or folders, not {local.name}: convert it")
    import datasets

    try:
        ds = datasets.load_dataset(path, name, split=split, streaming=True)
    except (datasets.data_files.EmptyDatasetError, datasets.exceptions.DataFilesNotFoundError) as err:
        raise UserError(f"data.path={path}: {' '.join(str(err).split())}; give .jsonl shards") from err
    return [DatasetShard(ds, i, f"{path}[{split}]") for i in range(ds.n_shards)]


# -- row accounting state (cumulative counts of one stream, per shard) -------------------------
def report_state(report: DataReport) -> dict[str, Any]:
    state: dict[str, Any] = {f: dict(getattr(report, f)) for f in ("dropped", "truncated", "notes")}
    state["examples"] = {k: list(v) for k, v in report.examples.items()}
    return {**state, "rows_in": report.rows_in, "rows_kept": report.rows_kept}


def add_report_state(report: DataReport, state: dict[str, Any]) -> None:
    report.dropped.update(state["dropped"])
    report.truncated.update(state["truncated"])
    report.notes.update(state["notes"])
    report.rows_in += state["rows_in"]
    report.rows_kept += state["rows_kept"]
    for reason, rows in state["examples"].items():
        report.examples[reason] = sorted({*report.examples[reason], *rows})[:5]


# -- the iterable data set ---------------------------------------------------------------------
class StreamingPreferences(IterableDataset):
    """Collated training batches of one rank: one stream per loader worker (module docstring).

    Args:
        shards: every shard of the training source, in name order (the first one's first
            ``holdout`` rows are the validation split).
        module: the DataModule (its format, tokenizer, limits, collator, batch size, seed).
        rank, replicas, workers: this data-parallel rank, their number, loader workers per rank.
        holdout: position in shard 0 after the validation rows.
        start: ``{stream id: state}`` to resume from.
    """

    def __init__(self, shards, module, rank, replicas, workers, holdout, start=None) -> None:
        self.shards, self.rank, self.replicas, self.workers = shards, rank, replicas, workers
        self.format, self.tokenizer, self.limits = module.format, module.tokenizer, module.limits
        self.collator, self.batch_size, self.seed = module.collator, module.batch_size, module.seed
        self.on_invalid, self.holdout, self.start = module.on_invalid, holdout, dict(start or {})

    @property
    def streams(self) -> int:
        return self.replicas * self.workers

    @property
    def own_streams(self) -> range:
        """The stream ids this rank's workers run (worker ``w`` runs ``rank * workers + w``)."""
        return range(self.rank * self.workers, (self.rank + 1) * self.workers)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        stream = self.rank * self.workers + (info.id if info is not None else 0)
        state = self.start.get(stream) or {
            "epoch": 0,
            "slot": 0,
            "position": None,
            "ordinal": 0,
            "counts": {},
        }
        reports = {s.label: DataReport(source=s.label, unit=s.unit) for s in self.shards}
        for label, counts in state["counts"].items():
            add_report_state(reports[label], counts)
        buffer: list[dict[str, Any]] = []
        for row, where in self._rows(stream, state, reports):
            if isinstance(row, str):  # a fault under on_invalid=error: the main process raises
                yield {STATE_KEY: {"stream": stream, "error": row}}
                return
            buffer.append(row)
            if len(buffer) == self.batch_size:
                batch = self.collator(buffer)
                counts = {k: report_state(r) for k, r in reports.items() if r.rows_in}
                batch[STATE_KEY] = {"stream": stream, **where, "counts": counts}
                buffer = []
                yield batch

    def _rows(self, stream: int, state: dict[str, Any], reports: dict[str, DataReport]):
        """``(tokenised row or error line, position after it)`` forever, from ``state``."""
        epoch, slot, position, ordinal = state["epoch"], state["slot"], state["position"], state["ordinal"]
        whole_shards = len(self.shards) >= self.streams
        while True:
            order = list(range(len(self.shards)))
            random.Random(self.seed + epoch).shuffle(order)
            mine = order[stream :: self.streams] if whole_shards else order
            for j in range(slot, len(mine)):
                index = mine[j]
                shard, report = self.shards[index], reports[self.shards[index].label]
                start = position or (self.holdout if index == 0 else (0, 0))
                for rec, after in shard.records(tuple(start)):
                    ordinal += 1
                    if not whole_shards and (ordinal - 1) % self.streams != stream:
                        continue
                    where = {"epoch": epoch, "slot": j, "position": after, "ordinal": ordinal}
                    row = self._prepare(rec, index, report)
                    if row is not None:
                        yield row, where
                position = None
            epoch, slot, ordinal = epoch + 1, 0, 0

    def _prepare(self, rec: Record, shard_index: int, report: DataReport) -> dict[str, Any] | str | None:
        """One record validated, tokenised and counted: the row, ``None`` (dropped) or, under
        ``on_invalid=error``, the error line."""
        dropped = sum(report.dropped.values())
        rows = normalize_records(iter([rec]), self.format, report)
        if rows:
            row = {**rows[0], "row_id": (shard_index << 32) | rows[0]["row_id"]}
            cols = self.format.tokenize_batch(
                {k: [row.get(k)] for k in row}, tokenizer=self.tokenizer, limits=self.limits
            )
            kept = count_tokenized(cols, lambda rid: (report, (rid & 0xFFFFFFFF) + 1))  # shard above bit 32
            rows = [{k: v[0] for k, v in cols.items()}] if kept else []
        if sum(report.dropped.values()) > dropped and self.on_invalid == "error":
            return report.error_lines()[0]
        return rows[0] if rows else None


def all_streams(states: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """The stream states of every rank (collective when distributed; the ranks of a
    tensor-parallel group hold the same stream ids)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return dict(states)
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, dict(states))
    return {k: v for part in gathered for k, v in part.items()}


class StreamingLoader(DataLoader):
    """Batches of :class:`StreamingPreferences`, with every stream's latest position as state.

    ``length``: the batches the run will take (``max_steps`` × accumulation), so Lightning treats
    the stream as one epoch of known size (and does not prefetch ahead of the checkpoint).
    """

    def __init__(self, dataset: StreamingPreferences, length: int, **kwargs: Any) -> None:
        super().__init__(dataset, batch_size=None, **kwargs)
        self.length = length
        self.states: dict[int, dict[str, Any]] = self._own(dataset.start)

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in super().__iter__():
            state = batch.pop(STATE_KEY)
            if "error" in state:
                raise InvalidDataError(
                    f"invalid preference row while streaming: {state['error']} "
                    "(fix the data, or data.on_invalid=skip drops and counts such rows)"
                )
            self.states[state["stream"]] = state
            yield batch

    # Every rank's streams: Lightning calls this on every rank, rank 0 writes the checkpoint.
    def state_dict(self) -> dict[str, Any]:
        return {"streams": self.dataset.streams, "states": all_streams(self.states)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict["streams"] != self.dataset.streams:
            raise UserError(
                f"the checkpoint's data position is for {state_dict['streams']} streams (ranks × "
                f"workers), this run has {self.dataset.streams}: resume with the same devices and "
                "data.num_workers"
            )
        # Only this rank's streams: a copy of another rank's, frozen at the checkpoint, would
        # override that rank's newer state in the next gather (later ranks win the merge), so a
        # later checkpoint and summary.json would get the older position and counts.
        self.states = self._own({int(k): v for k, v in state_dict["states"].items()})
        self.dataset.start = dict(self.states)  # read by the workers the next iterator starts

    def _own(self, states: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        return {k: v for k, v in states.items() if k in self.dataset.own_streams}


# -- the DataModule ----------------------------------------------------------------------------
class StreamingPreferenceDataModule(PreferenceDataModule):
    """:class:`PreferenceDataModule` with a streamed training split (module docstring).

    Args:
        val_rows: rows at the start of the first shard held out for validation.
        **kwargs: :class:`PreferenceDataModule` arguments (``path`` required).
    """

    def __init__(self, val_rows: int = 64, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if self.path is None:
            raise UserError(
                "data.streaming=true needs data.path (a folder of .jsonl shards, a .jsonl file or a hub id)"
            )
        if self.group_by_length:
            raise UserError("data.group_by_length needs the whole data set: not with data.streaming=true")
        check_number("streaming_val_rows", val_rows, minimum=1, integer=True)
        self.val_rows = val_rows
        self.shards: list[JsonlShard | DatasetShard] = []
        self.holdout: tuple[int, int] = (0, 0)
        self.loader: StreamingLoader | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.shards:
            return
        self.shards = list_shards(self.path, self.name, self.train_split)
        first = self.shards[0]
        head = list(itertools.islice(first.records(), self.val_rows + PROBE_ROWS))
        if len(head) <= self.val_rows:
            raise UserError(
                f"data: {first.label} has {len(head)} rows, not more than "
                f"data.streaming_val_rows={self.val_rows}: lower it"
            )
        self.holdout = head[self.val_rows - 1][1]
        if hasattr(self.format, "detect"):  # format=auto: detected from the first rows
            self.format = self.format.detect([r.row for r, _ in head if r.row is not None], first.label)
        val_report = DataReport(
            source=f"{first.label} (first {self.val_rows} rows: validation)", unit=first.unit
        )
        self.reports = {val_report.source: val_report}
        self.val_set = self._tokenize(self._read((r for r, _ in head[: self.val_rows]), val_report))
        # Fail before any model work on what the first training rows show (format, columns).
        probe = DataReport(source=first.label, unit=first.unit)
        self._tokenize(self._read((r for r, _ in head[self.val_rows :]), probe))
        raise_if_invalid([val_report, probe], self.on_invalid)
        streamed = f"training rows streamed from {len(self.shards)} shard(s)"
        print(f"[dpo_lightning] data {val_report.summary_line()}; {streamed}")
        if len(self.val_set) == 0:
            raise ValueError("data: no usable rows left for validation; see the counts above")

    def _read(self, records: Iterator[Record], report: DataReport) -> SplitRows:
        """``records`` validated into ``report``, with the ledger that locates their rows in it."""
        ledger = Ledger()
        return SplitRows(ledger.read(records, self.format, report), ledger)

    def train_dataloader(self) -> StreamingLoader:
        trainer = self.trainer
        max_steps = trainer.max_steps if trainer is not None else -1
        if max_steps is None or max_steps < 0:
            raise UserError("data.streaming=true has no epoch length: set trainer.max_steps")
        rank, replicas = data_parallel_position(trainer)  # TP ranks share a stream
        workers = max(1, self.num_workers)
        dataset = StreamingPreferences(self.shards, self, rank, replicas, workers, self.holdout)
        self.loader = StreamingLoader(
            dataset, length=max_steps * trainer.accumulate_grad_batches, num_workers=self.num_workers
        )
        return self.loader

    def full_dataloaders(self) -> list[DataLoader]:
        raise UserError(
            "reference=precomputed reads the whole data set before training: not with "
            "data.streaming=true (use reference=copy)"
        )

    def report(self) -> dict[str, Any]:
        """The validation rows' counts and every stream's (all ranks; collective under DDP)."""
        states = all_streams(self.loader.states if self.loader is not None else {})
        shards = {s.label: DataReport(source=s.label, unit=s.unit) for s in self.shards}
        for state in states.values():
            for label, counts in state.get("counts", {}).items():
                add_report_state(shards[label], counts)
        streamed = {k: r.as_dict() for k, r in shards.items() if r.rows_in}
        return {**{k: r.as_dict() for k, r in self.reports.items()}, **streamed}


def datamodule(streaming: bool = False, streaming_val_rows: int = 64, **kwargs: Any) -> PreferenceDataModule:
    """``data._target_``: the in-memory DataModule, or the streaming one with ``streaming``."""
    if not isinstance(streaming, bool):
        raise SettingError("streaming", streaming, "true or false")
    check_number("streaming_val_rows", streaming_val_rows, minimum=1, integer=True)
    if streaming:
        return StreamingPreferenceDataModule(val_rows=streaming_val_rows, **kwargs)
    return PreferenceDataModule(**kwargs)
