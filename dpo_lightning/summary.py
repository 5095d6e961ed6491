"""End-of-run artefacts: ``summary.json`` and the printed summary table."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

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


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    path.write_text(json.dumps(summary, indent=2, sort_keys=False) + "\n")


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
