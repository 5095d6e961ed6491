"""The preference ``LightningDataModule``: read → validate → split → tokenize (cached) → collate.

Every row is validated (all faults of all splits counted with their file and line / row number)
and tokenised in :meth:`PreferenceDataModule.setup`, which ``train.py`` calls before building the
model: bad data stops a run before any model work, with one line per fault kind. The batch layout
is given at construction (``layout``: the forward engine that reads the batches), so the collator
is built once, for the engine that will read it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
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
from dpo_lightning.data.checks import check_column_case, check_data_args, expected_columns
from dpo_lightning.data.collate import BatchLayout, PreferenceCollator
from dpo_lightning.data.loading import DataFileError
from dpo_lightning.data.report import DataReport
from dpo_lightning.data.resumable import ResumableDataLoader
from dpo_lightning.data.sampler import ResumableSampler, data_parallel_position
from dpo_lightning.data.sources import dataset_part, split_parts
from dpo_lightning.data.splits import (
    Tokenized,
    carve,
    cross_split_duplicates,
    duplicates_line,
    split_fingerprint,
)
from dpo_lightning.data.tokenize import ACCOUNTING_COLUMNS, count_tokenized
from dpo_lightning.data.unpaired import LabelledCollator, unpair_example
from dpo_lightning.data.validate import Part, SplitRows, raise_if_invalid, read_split

# Columns the collator reads (``row_id`` flows into the batch as ``pair_row_ids``), and the one
# unpaired data adds (a bool per completion).
BATCH_COLUMNS = ["prompt_ids", "completion_ids", "pairs", "row_id"]
LABELS = "labels"


class PreferenceDataModule(L.LightningDataModule):
    """Preference pairs (or K-wise rankings) for DPO.

    Args:
        tokenizer: the policy's tokenizer.
        path: hub id, local json/jsonl/parquet/csv/tsv file, folder of such files, or
            ``save_to_disk`` folder (read by :mod:`dpo_lightning.data.sources`, every fault with
            its file and line). A lone local file is the ``train_split`` whatever that is called
            (validation carved from it).
        generator: used when ``path`` is None: a callable returning a ``datasets.Dataset``
            (the built-in data); a set ``path`` means that data. A missing path that looks like a
            file is an error, never a hub id.
        name: hub configuration name.
        train_split, val_split: split names; a missing ``val_split`` is carved from train.
        val_fraction: share of train held out when the data has no validation split.
        format: a row format object, or a name (``auto``, ``standard``, ``implicit_prompt``,
            ``conversational``, ``ranked``, ``unpaired``, ``unpaired_conversational``); default
            :class:`StandardFormat`.
        unpair: turn every pair into two labelled completions (chosen desirable, rejected
            undesirable) for unpaired losses (KTO, BCO); unpaired rows are left as they are.
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
        cross_split_duplicates: rows whose content is in both train and validation are counted;
            ``report`` keeps them, ``keep_in_train`` / ``keep_in_validation`` drops the other
            side's copies (:mod:`dpo_lightning.data.splits`).
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
        cross_split_duplicates: str = "report",
        unpair: bool = False,
    ) -> None:
        super().__init__()
        self.limits = check_data_args(
            path=path,
            generator=generator,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            val_fraction=val_fraction,
            on_invalid=on_invalid,
            padding_side=padding_side,
            pad_to_multiple_of=pad_to_multiple_of,
            num_workers=num_workers,
            group_mega_batch_mult=group_mega_batch_mult,
            num_proc=num_proc,
            max_length=max_length,
            max_prompt_length=max_prompt_length,
            truncation_mode=truncation_mode,
            cross_split_duplicates=cross_split_duplicates,
        )
        generator = None if path is not None else generator  # a set data.path means that data
        self.tokenizer = tokenizer
        self.path, self.generator, self.name = path, generator, name
        self.train_split, self.val_split, self.val_fraction = train_split, val_split, val_fraction
        self.format = resolve_format(format)
        mapped = {k: v for k, v in (columns or {}).items() if v is not None}  # null: keep
        if mapped or system_prompt is not None:
            self.format = self.format.configured(mapped, system_prompt)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.on_invalid = on_invalid
        self.num_workers, self.seed = num_workers, seed
        self.group_by_length, self.group_mega_batch_mult = group_by_length, group_mega_batch_mult
        self.num_proc = num_proc
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.cross_split_duplicates = cross_split_duplicates
        make_collator = layout.collator if layout is not None else PreferenceCollator
        self.collator = make_collator(tokenizer.pad_token_id, padding_side, pad_to_multiple_of)
        self.unpair = unpair
        # What the loaders call: labelled (unpaired) examples also get their mismatched rows.
        self.collate_fn = LabelledCollator(
            self.collator, self.limits, getattr(tokenizer, "bos_token_id", None)
        )
        self.reports: dict[str, DataReport] = {}
        self.train_set: datasets.Dataset | None = None
        self.val_set: datasets.Dataset | None = None

    # -- building the splits ----------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        parts = self._parts()
        train = parts[self.train_split]
        first = list(itertools.islice(itertools.chain.from_iterable(p.records() for p in train), 200))
        if not first:
            raise DataFileError(
                f"data {train[0].label} has no rows (an empty file, blank lines only, or a header "
                "without rows): give data with preference rows"
            )
        sample = [r.row for r in first if r.row is not None]
        check_column_case(sample, expected_columns(self.format), train[0].label)
        if isinstance(self.format, AutoFormat):
            try:
                self.format = self.format.detect(sample, train[0].label)
            except ValueError as err:
                raise DataFileError(str(err)) from err
        fmt = self.format
        if self.unpair:
            fmt = lambda row: unpair_example(self.format(row))  # noqa: E731
        read = {split: read_split(ps, fmt, self.reports) for split, ps in parts.items()}
        train = Tokenized.of(self._tokenize(read[self.train_split]), read[self.train_split])
        if self.val_split in read:
            val = Tokenized.of(self._tokenize(read[self.val_split]), read[self.val_split])
        else:
            train, val = carve(train, self.val_fraction, self.seed)
        train, val = cross_split_duplicates(train, val, self.cross_split_duplicates)
        self.train_set, self.val_set = train.ds, val.ds
        salt = f"{tokenizer_fingerprint(self.tokenizer)}|{self.limits!r}|{self.unpair}"
        #: {split: digest of its rows' content, in order}: what a checkpoint's data check compares.
        splits = {"train": train, "validation": val}
        self.fingerprints = {name: split_fingerprint(split, salt) for name, split in splits.items()}
        # One stop with every fault kind, length faults included (tokenising the valid rows is
        # cheap next to a second round trip, and cached for the next run).
        raise_if_invalid(list(self.reports.values()), self.on_invalid)
        for report in self.reports.values():
            print(f"[dpo_lightning] data {report.summary_line()}")
        line = duplicates_line(train, val, self.cross_split_duplicates)
        if line:
            print(f"[dpo_lightning] data: {line}")
        self._check_not_empty(read[self.train_split], read.get(self.val_split, read[self.train_split]))

    def _check_not_empty(self, train: SplitRows, val: SplitRows) -> None:
        """No split may end empty: name the source, its counts and what to do."""
        for split, ds, rows in (("train", self.train_set, train), ("validation", self.val_set, val)):
            if len(ds) > 0:
                continue
            reports = rows.ledger.reports
            source = ", ".join(r.source for r in reports)
            kept, read_in = sum(r.rows_kept for r in reports), sum(r.rows_in for r in reports)
            dropped: dict[str, int] = {}
            for r in reports:
                for reason, n in r.dropped.items():
                    dropped[reason] = dropped.get(reason, 0) + n
            if kept <= 1 and not dropped:
                raise DataFileError(
                    f"data {source}: {kept} usable row(s): a validation split is carved from "
                    "train (data.val_fraction), so at least 2 are needed; add rows or give a "
                    "validation split (data.val_split)"
                )
            raise DataFileError(
                f"data {source}: no usable rows left for {split} ({read_in} read, "
                f"{sum(dropped.values())} dropped: {dropped}); fix the rows "
                "(data.on_invalid=error lists each fault with its lines)"
            )

    def _parts(self) -> dict[str, list[Part]]:
        """The files (or data sets) of each split, by split name."""
        if self.generator is not None:
            label = f"{getattr(self.generator, '__name__', 'generator')}[{self.train_split}]"
            return {self.train_split: [dataset_part(label, self.generator())]}
        return split_parts(self.path, self.name, self.train_split, self.val_split)

    def _tokenize(self, split: SplitRows) -> datasets.Dataset:
        """Tokenise valid rows through a cache keyed by content; count drops and truncations,
        each in the report of the file the row came from."""
        rows = split.rows
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
        for report in split.ledger.reports:
            report.tokenize_cache = "hit" if hit and report.tokenize_cache != "miss" else "miss"
        raw = datasets.Dataset.from_list(rows)
        tokenized = raw.map(
            fn,
            batched=True,
            batch_size=256,
            fn_kwargs={"tokenizer": self.tokenizer, "limits": self.limits},
            remove_columns=[c for c in raw.column_names if c != LABELS],  # labels pass through
            cache_file_name=str(cache_file),
            new_fingerprint=fp,
            num_proc=self.num_proc if self.num_proc and len(rows) > 1000 else None,
            desc="tokenize",
        )
        keep = count_tokenized(tokenized.select_columns(ACCOUNTING_COLUMNS).to_dict(), split.ledger.locate)
        return tokenized.select(keep) if len(keep) < len(tokenized) else tokenized

    @property
    def unpaired(self) -> bool:
        """Whether the rows are labelled completions (KTO/BCO) rather than pairs (after setup)."""
        return self.train_set is not None and LABELS in self.train_set.column_names

    def label_counts(self) -> tuple[int, int] | None:
        """(desirable, undesirable) completions of the training split; None for paired data."""
        if not self.unpaired:
            return None
        labels = [x for row in self.train_set[LABELS] for x in row]
        return sum(labels), len(labels) - sum(labels)

    def _columns(self, ds: datasets.Dataset) -> datasets.Dataset:
        return ds.select_columns([*BATCH_COLUMNS, *([LABELS] if LABELS in ds.column_names else [])])

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
            self._columns(self.train_set),
            sampler,
            collate_fn=self.collate_fn,
            num_workers=self.num_workers,
            # A private generator: creating the iterator must not draw from the global RNG
            # (a resumed run restores that RNG and must see the same draws).
            generator=torch.Generator().manual_seed(self.seed),
        )

    def full_dataloaders(self) -> list[DataLoader]:
        """Every train and validation row once, in order and unsharded (for one-off passes such
        as precomputing reference log-probs, whatever rank runs them)."""
        train = self._columns(self.train_set)
        return [self._loader(train, self.eval_batch_size, False), self.val_dataloader()]

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._columns(self.val_set), self.eval_batch_size, False)

    def _loader(self, ds: datasets.Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(
            ds,
            batch_size=batch_size,
            shuffle=shuffle,
            collate_fn=self.collate_fn,
            num_workers=self.num_workers,
            drop_last=False,
        )

    def report(self) -> dict[str, Any]:
        """Dropped / truncated / noted counts of every source, for ``summary.json``."""
        return {src: r.as_dict() for src, r in self.reports.items()}


def sample_rows(parts: list[Part], n: int) -> list[dict[str, Any]]:
    """The first ``n`` readable rows of a split, across its parts (for format detection)."""
    out: list[dict[str, Any]] = []
    for part in parts:
        for rec in part.records():
            if len(out) == n:
                return out
            if rec.row is not None:
                out.append(rec.row)
    return out
