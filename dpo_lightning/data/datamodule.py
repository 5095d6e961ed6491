"""The preference ``LightningDataModule``: read → validate → split → tokenize (cached) → collate.

Every row is validated (all faults of all splits counted with their file and line / row number)
and tokenised in :meth:`PreferenceDataModule.setup`, which ``train.py`` calls before building the
model: bad data stops a run before any model work, with one line per fault kind. The batch layout
is given at construction (``layout``: the forward engine that reads the batches), so the collator
is built once, for the engine that will read it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import lightning as L
import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from dpo_lightning.data.auto import AutoFormat, resolve_format
from dpo_lightning.data.cache import (
    default_cache_dir,
    rows_fingerprint,
    tokenize_fingerprint,
    tokenizer_fingerprint,
)
from dpo_lightning.data.collate import BatchLayout, PreferenceCollator
from dpo_lightning.data.loading import load_raw
from dpo_lightning.data.report import DataReport
from dpo_lightning.data.resumable import ResumableDataLoader
from dpo_lightning.data.sampler import ResumableSampler, data_parallel_position
from dpo_lightning.data.tokenize import ACCOUNTING_COLUMNS, Limits, count_tokenized
from dpo_lightning.data.validate import (
    JSON_SUFFIXES,
    Record,
    dataset_records,
    normalize_records,
    raise_if_invalid,
    read_json_records,
)

# Columns the collator reads (``row_id`` flows into the batch as ``pair_row_ids``).
BATCH_COLUMNS = ["prompt_ids", "completion_ids", "pairs", "row_id"]


@dataclass
class Source:
    """One raw split: where it comes from and how to read its records."""

    label: str
    unit: str
    records: Callable[[], Iterator[Record]]


class PreferenceDataModule(L.LightningDataModule):
    """Preference pairs (or K-wise rankings) for DPO.

    Args:
        tokenizer: the policy's tokenizer.
        path: hub id, local json/jsonl/parquet/csv file, or ``save_to_disk`` folder. A lone local
            file is the ``train_split`` whatever that is called (validation carved from it).
        generator: instead of ``path``, a callable returning a ``datasets.Dataset`` (built-in data).
        name: hub configuration name.
        train_split, val_split: split names; a missing ``val_split`` is carved from train.
        val_fraction: share of train held out when the data has no validation split.
        format: a row format object, or a name (``auto``, ``standard``, ``implicit_prompt``,
            ``conversational``, ``ranked``); default :class:`StandardFormat`.
        columns: column mapping merged into the format's (``data.columns.prompt=question``);
            null values leave the format's mapping alone.
        system_prompt: system prompt for every row (overrides the format's).
        batch_size: examples (prompts) per device step; eval_batch_size defaults to it.
        max_length, max_prompt_length, truncation_mode: see :mod:`dpo_lightning.data.tokenize`.
        on_invalid: ``error`` (stop before any model work) or ``skip`` (drop and count).
        padding_side: ``right`` or ``left``.
        pad_to_multiple_of: round the padded length up.
        layout: who reads the batches (a forward engine, :class:`BatchLayout`): its collator is
            built here with ``padding_side`` / ``pad_to_multiple_of``; None = padded rows.
        num_workers: DataLoader workers.
        seed: split seed (and the bucketing shuffle's).
        group_by_length: length-grouped batches for training (less padding).
        group_mega_batch_mult: mega-batch size, in batches, for grouping.
        num_proc: processes for tokenisation (``datasets.map``); null = this process.
        cache_dir: tokenisation cache folder (default ``$HF_DATASETS_CACHE/dpo_lightning``).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        path: str | None = None,
        generator: Callable[[], datasets.Dataset] | None = None,
        name: str | None = None,
        train_split: str = "train",
        val_split: str | None = "validation",
        val_fraction: float = 0.05,
        format: Callable[[dict], dict] | str | None = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        max_length: int = 512,
        max_prompt_length: int | None = None,
        truncation_mode: str = "keep_end",
        on_invalid: str = "error",
        padding_side: str = "right",
        pad_to_multiple_of: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        columns: dict[str, str | None] | None = None,
        system_prompt: str | None = None,
        group_by_length: bool = False,
        group_mega_batch_mult: int = 50,
        num_proc: int | None = None,
        cache_dir: str | None = None,
        layout: BatchLayout | None = None,
    ) -> None:
        super().__init__()
        if (path is None) == (generator is None):
            raise ValueError("give exactly one of data.path or data.generator")
        if on_invalid not in ("error", "skip"):
            raise ValueError(f"data.on_invalid must be 'error' or 'skip', got {on_invalid!r}")
        if truncation_mode not in ("keep_start", "keep_end"):
            raise ValueError(f"data.truncation_mode must be keep_start or keep_end, got {truncation_mode!r}")
        self.tokenizer = tokenizer
        self.path, self.generator, self.name = path, generator, name
        self.train_split, self.val_split, self.val_fraction = train_split, val_split, val_fraction
        self.format = resolve_format(format)
        mapped = {k: v for k, v in (columns or {}).items() if v is not None}  # null: keep
        if mapped or system_prompt is not None:
            self.format = self.format.configured(mapped, system_prompt)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.limits = Limits(max_length, max_prompt_length, truncation_mode)
        self.on_invalid = on_invalid
        self.num_workers, self.seed = num_workers, seed
        self.group_by_length, self.group_mega_batch_mult = group_by_length, group_mega_batch_mult
        self.num_proc = num_proc
        self.cache_dir = Path(cache_dir) if cache_dir else None
        make_collator = layout.collator if layout is not None else PreferenceCollator
        self.collator = make_collator(tokenizer.pad_token_id, padding_side, pad_to_multiple_of)
        self.reports: dict[str, DataReport] = {}
        self.train_set: datasets.Dataset | None = None
        self.val_set: datasets.Dataset | None = None

    # -- building the splits ----------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        sources = self._sources()
        if isinstance(self.format, AutoFormat):
            train = sources[self.train_split]
            sample = [r.row for _, r in zip(range(200), train.records(), strict=False) if r.row is not None]
            self.format = self.format.detect(sample, train.label)
        rows = {}
        for split, src in sources.items():
            report = self.reports.setdefault(src.label, DataReport(source=src.label, unit=src.unit))
            rows[split] = (normalize_records(src.records(), self.format, report), report)

        train_rows, train_report = rows[self.train_split]
        if self.val_split in rows:
            val_rows, val_report = rows[self.val_split]
        else:
            train_rows, val_rows = self._carve(train_rows)
            val_report = train_report
        self.train_set = self._tokenize(train_rows, train_report)
        self.val_set = self._tokenize(val_rows, val_report)
        # One stop with every fault kind, length faults included (tokenising the valid rows is
        # cheap next to a second round trip, and cached for the next run).
        raise_if_invalid(list(self.reports.values()), self.on_invalid)
        for report in self.reports.values():
            print(f"[dpo_lightning] data {report.summary_line()}")
        for split, ds in (("train", self.train_set), ("validation", self.val_set)):
            if len(ds) == 0:
                raise ValueError(f"data: no usable rows left for {split}; see the counts above")

    def _sources(self) -> dict[str, Source]:
        if self.generator is not None:
            ds = self.generator()
            label = f"{getattr(self.generator, '__name__', 'generator')}[{self.train_split}]"
            return {self.train_split: Source(label, "row", lambda: dataset_records(ds))}
        local = Path(self.path).expanduser()
        if local.is_file() and local.suffix.lower() in JSON_SUFFIXES:
            return {self.train_split: Source(str(local), "line", lambda: read_json_records(local))}
        dd = load_raw(self.path, self.name)
        if local.is_file():  # a lone csv / parquet file
            return {self.train_split: Source(str(local), "row", lambda: dataset_records(dd["train"]))}
        if self.train_split not in dd:
            raise ValueError(f"data {self.path!r} has no split {self.train_split!r}; it has {list(dd)}")
        splits = [s for s in (self.train_split, self.val_split) if s and s in dd]
        return {s: Source(f"{self.path}[{s}]", "row", _records_of(dd[s])) for s in splits}

    def _carve(self, rows: list[dict]) -> tuple[list[dict], list[dict]]:
        """Hold out ``val_fraction`` of the train rows (at least one), with ``seed``."""
        order = list(range(len(rows)))
        random.Random(self.seed).shuffle(order)
        n_val = min(max(1, math.ceil(self.val_fraction * len(rows))), max(len(rows) - 1, 0))
        held = set(order[:n_val])
        return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]

    def _tokenize(self, rows: list[dict], report: DataReport) -> datasets.Dataset:
        """Tokenise valid rows through a cache keyed by content; count drops and truncations."""
        if not rows:
            return datasets.Dataset.from_dict({c: [] for c in [*BATCH_COLUMNS, "length"]})
        fn = self.format.tokenize_batch
        fp = tokenize_fingerprint(
            rows_fingerprint(rows), tokenizer_fingerprint(self.tokenizer), fn, self.limits
        )
        cache_dir = self.cache_dir or default_cache_dir()
        cache_dir.mkdir(parents=True, exist_ok=True)
        cache_file = cache_dir / f"tokenized-{fp}.arrow"
        hit = any(cache_dir.glob(f"tokenized-{fp}*.arrow"))  # num_proc writes one file per shard
        report.tokenize_cache = "hit" if hit and report.tokenize_cache != "miss" else "miss"
        raw = datasets.Dataset.from_list(rows)
        tokenized = raw.map(
            fn,
            batched=True,
            batch_size=256,
            fn_kwargs={"tokenizer": self.tokenizer, "limits": self.limits},
            remove_columns=raw.column_names,
            cache_file_name=str(cache_file),
            new_fingerprint=fp,
            num_proc=self.num_proc if self.num_proc and len(rows) > 1000 else None,
            desc="tokenize",
        )
        keep = count_tokenized(tokenized.select_columns(ACCOUNTING_COLUMNS).to_dict(), report)
        return tokenized.select(keep) if len(keep) < len(tokenized) else tokenized

    # -- loaders ----------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        # Seeded per epoch, sharded like DistributedSampler, optionally length-grouped, and
        # stateful, so a run resumed mid-epoch sees exactly the remaining batches.
        rank, replicas = data_parallel_position(self.trainer)  # TP ranks share a batch
        sampler = ResumableSampler(
            self.train_set,
            self.batch_size,
            seed=self.seed,
            num_replicas=replicas,
            rank=rank,
            lengths=self.train_set["length"] if self.group_by_length else None,
            mega_batch_mult=self.group_mega_batch_mult,
        )
        return ResumableDataLoader(
            self.train_set.select_columns(BATCH_COLUMNS),
            sampler,
            collate_fn=self.collator,
            num_workers=self.num_workers,
            # A private generator: creating the iterator must not draw from the global RNG
            # (a resumed run restores that RNG and must see the same draws).
            generator=torch.Generator().manual_seed(self.seed),
        )

    def full_dataloaders(self) -> list[DataLoader]:
        """Every train and validation row once, in order and unsharded (for one-off passes such
        as precomputing reference log-probs, whatever rank runs them)."""
        train = self.train_set.select_columns(BATCH_COLUMNS)
        return [self._loader(train, self.eval_batch_size, False), self.val_dataloader()]

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set.select_columns(BATCH_COLUMNS), self.eval_batch_size, False)

    def _loader(self, ds: datasets.Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(
            ds,
            batch_size=batch_size,
            shuffle=shuffle,
            collate_fn=self.collator,
            num_workers=self.num_workers,
            drop_last=False,
        )

    def report(self) -> dict[str, Any]:
        """Dropped / truncated / noted counts of every source, for ``summary.json``."""
        return {src: r.as_dict() for src, r in self.reports.items()}


def _records_of(ds: datasets.Dataset) -> Callable[[], Iterator[Record]]:
    return lambda: dataset_records(ds)
