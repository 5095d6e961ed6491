"""The preference ``LightningDataModule``: load → validate → split → tokenize → collate."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import datasets
import lightning as L
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from dpo_lightning.data.collate import PreferenceCollator
from dpo_lightning.data.formats import InvalidRow, StandardFormat
from dpo_lightning.data.loading import load_raw
from dpo_lightning.data.report import DataReport, InvalidDataError
from dpo_lightning.data.sampler import EpochSeededSampler
from dpo_lightning.data.tokenize import tokenize_example


class PreferenceDataModule(L.LightningDataModule):
    """Preference pairs (or K-wise rankings) for DPO.

    Args:
        tokenizer: the policy's tokenizer.
        path: hub id, local json/jsonl/parquet/csv file, or ``save_to_disk`` folder.
        generator: instead of ``path``, a callable returning a ``datasets.Dataset`` (built-in data).
        name: hub configuration name.
        train_split, val_split: split names; a missing ``val_split`` is carved from train.
        val_fraction: share of train held out when the data has no validation split.
        format: row format (default :class:`StandardFormat`).
        batch_size: pairs (examples) per device step; eval_batch_size defaults to it.
        max_length, max_prompt_length, truncation_mode: see :mod:`dpo_lightning.data.tokenize`.
        on_invalid: ``error`` (stop before any model work) or ``skip`` (drop and count).
        padding_side: ``right`` or ``left``.
        num_workers: DataLoader workers.
        seed: split seed.
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
        format: Callable[[dict], dict] | None = None,
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
    ) -> None:
        super().__init__()
        if (path is None) == (generator is None):
            raise ValueError("give exactly one of data.path or data.generator")
        if on_invalid not in ("error", "skip"):
            raise ValueError(f"data.on_invalid must be 'error' or 'skip', got {on_invalid!r}")
        self.tokenizer = tokenizer
        self.path, self.generator, self.name = path, generator, name
        self.train_split, self.val_split, self.val_fraction = train_split, val_split, val_fraction
        self.format = format or StandardFormat()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.max_length, self.max_prompt_length = max_length, max_prompt_length
        self.truncation_mode, self.on_invalid = truncation_mode, on_invalid
        self.num_workers, self.seed = num_workers, seed
        self.collator = PreferenceCollator(tokenizer.pad_token_id, padding_side, pad_to_multiple_of)
        self.reports: dict[str, DataReport] = {}
        self.train_set: datasets.Dataset | None = None
        self.val_set: datasets.Dataset | None = None

    # -- building the splits ----------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train, val = self._raw_splits()
        source = self.path or getattr(self.generator, "__name__", "generator")
        self.train_set = self._prepare(train, DataReport(source=f"{source}[{self.train_split}]"))
        self.val_set = self._prepare(val, DataReport(source=f"{source}[validation]"))
        for report in self.reports.values():
            print(f"[dpo_lightning] data {report.summary_line()}")

    def _raw_splits(self) -> tuple[datasets.Dataset, datasets.Dataset]:
        if self.generator is not None:
            dd = datasets.DatasetDict(train=self.generator())
        else:
            dd = load_raw(self.path, self.name)
        if self.train_split not in dd:
            raise ValueError(f"data {self.path!r} has no split {self.train_split!r}; it has {list(dd)}")
        train = dd[self.train_split].map(lambda _, i: {"row_id": i}, with_indices=True)
        if self.val_split and self.val_split in dd:
            val = dd[self.val_split].map(lambda _, i: {"row_id": i}, with_indices=True)
            return train, val
        parts = train.train_test_split(test_size=self.val_fraction, seed=self.seed)
        return parts["train"], parts["test"]

    def _prepare(self, raw: datasets.Dataset, report: DataReport) -> datasets.Dataset:
        """Validate every row (counting faults), then tokenize; returns trainable rows only."""
        self.reports[report.source] = report
        report.rows_in = len(raw)
        checked = raw.map(_normalize, fn_kwargs={"fmt": self.format}, desc="validate")
        for reason, row in zip(checked["invalid"], checked["row_id"]):
            if reason:
                report.drop(reason, row)
        if report.dropped and self.on_invalid == "error":
            raise InvalidDataError(
                "invalid preference rows (fix them or set data.on_invalid=skip):\n"
                + "\n".join(report.error_lines())
            )
        valid = checked.filter(lambda r: r["invalid"] is None)
        tokenized = valid.map(
            _tokenize,
            fn_kwargs={
                "tokenizer": self.tokenizer,
                "max_length": self.max_length,
                "max_prompt_length": self.max_prompt_length,
                "truncation_mode": self.truncation_mode,
            },
            remove_columns=valid.column_names,
            desc="tokenize",
        )
        for reason, row, tp, tc in zip(
            tokenized["drop_reason"], tokenized["row_id"],
            tokenized["truncated_prompt"], tokenized["truncated_completion"],
        ):
            if reason:
                report.drop(reason, row)
            report.truncate("prompt", int(tp))
            report.truncate("completion", int(tc))
        report.truncated = +report.truncated  # drop zero counts
        return tokenized.filter(lambda r: r["drop_reason"] is None)

    # -- loaders ----------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.eval_batch_size, shuffle=False)

    def _loader(self, ds: datasets.Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        cols = ["prompt_ids", "completion_ids", "pairs", "row_id"]
        # Same order as Lightning's DistributedSampler: results do not depend on the device count.
        sampler = EpochSeededSampler(ds, self.seed) if shuffle else None
        return DataLoader(
            ds.select_columns(cols),
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=self.collator,
            num_workers=self.num_workers,
            drop_last=False,
        )

    def report(self) -> dict[str, Any]:
        """Dropped / truncated counts of every split, for ``summary.json``."""
        return {src: r.as_dict() for src, r in self.reports.items()}


def _normalize(row: dict[str, Any], fmt: Callable[[dict], dict]) -> dict[str, Any]:
    try:
        return {**fmt(row), "invalid": None}
    except InvalidRow as err:
        return {"prompt": None, "completions": None, "pairs": None, "invalid": str(err)}


def _tokenize(row: dict[str, Any], tokenizer, max_length, max_prompt_length, truncation_mode) -> dict:
    ex = tokenize_example(
        tokenizer, row["prompt"], row["completions"], max_length, max_prompt_length, truncation_mode
    )
    return {
        "row_id": row["row_id"],
        "prompt_ids": ex.prompt_ids,
        "completion_ids": ex.completion_ids,
        "pairs": row["pairs"],
        "truncated_prompt": ex.truncated_prompt,
        "truncated_completion": ex.truncated_completion,
        "drop_reason": ex.drop_reason,
    }
