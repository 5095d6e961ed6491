"""End-of-run artefacts: ``summary.json`` and the printed summary table."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from rich.console import Console
from rich.table import Table

from dpo_lightning.models.parallel import sum_over_data_parallel
from dpo_lightning.run.files import atomic_write_text

# Shown in the printed table, in this order (all are in summary.json anyway).
TABLE_KEYS = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")


def scalar_metrics(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    """``{name without prefix: float}`` for metrics that start with ``prefix/``."""
    out = {}
    for key, value in metrics.items():
        if key.startswith(prefix + "/"):
            v = float(value)
            out[key[len(prefix) + 1 :]] = v if math.isfinite(v) else None
    return dict(sorted(out.items()))


def sum_over_ranks(trainer: L.Trainer, *counts: int) -> list[int]:
    """Per-rank counts summed over the data-parallel ranks (collective; identity on one process):
    the ranks of a tensor-parallel group train on the same batch, counted once."""
    values = torch.tensor(counts, dtype=torch.float64, device=trainer.strategy.root_device)
    total, _ = sum_over_data_parallel(values, trainer.strategy)
    return [round(v) for v in total.cpu().tolist()]


def run_summary(
    trainer: L.Trainer,
    metrics: dict[str, dict[str, float]],
    totals: Any,
    data_report: dict[str, Any],
    extra: dict[str, Any],
) -> dict[str, Any]:
    """``summary.json``'s content (collective: sums the per-rank counts of ``totals``, a
    :class:`~dpo_lightning.reporting.throughput.RunTotals`).

    Args:
        metrics: ``{"train": ..., "val": ...}`` from :func:`scalar_metrics`.
        data_report: the DataModule's :meth:`report` (rows dropped / truncated per source).
        extra: run facts the caller knows (run_dir, export, resumed_from, wall_seconds, ...).
    """
    pairs, tokens = sum_over_ranks(trainer, totals.total_pairs, totals.total_tokens)
    seconds = max(totals.train_seconds, 1e-9)
    ckpt = trainer.checkpoint_callback
    return {
        "run_dir": extra["run_dir"],
        "steps": trainer.global_step,
        **metrics,
        "pairs_per_sec": pairs / seconds,
        "tokens_per_sec": tokens / seconds,
        "pairs_trained": pairs,
        "rows_dropped": sum(r["rows_dropped"] for r in data_report.values()),
        "data": data_report,
        "checkpoint": (ckpt.last_model_path or ckpt.best_model_path or None) if ckpt else None,
        **{k: v for k, v in extra.items() if k != "run_dir"},
    }


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(summary, indent=2, sort_keys=False) + "\n")


def print_table(summary: dict[str, Any]) -> None:
    table = Table(title=f"dpo_lightning — {summary['run_dir']}")
    table.add_column("metric")
    table.add_column("train", justify="right")
    table.add_column("val", justify="right")
    for key in TABLE_KEYS:
        tr, va = summary["train"].get(key), summary["val"].get(key)
        table.add_row(key, _fmt(tr), _fmt(va))
    table.add_row("steps", str(summary["steps"]), "")
    table.add_row("pairs/s", _fmt(summary["pairs_per_sec"]), "")
    table.add_row("wall time (s)", _fmt(summary["wall_seconds"]), "")
    table.add_row("rows dropped", str(summary["rows_dropped"]), "")
    Console().print(table)


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.4g}"
