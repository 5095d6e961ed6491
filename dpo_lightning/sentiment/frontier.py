"""``frontier.csv`` and ``frontier.png``: mean reward against KL(π‖π_ref), one point per run."""

from __future__ import annotations

import csv
from pathlib import Path

COLUMNS = ["label", "beta", "reward", "kl", "reward_std", "n_samples", "n"]


def write_frontier_csv(rows: list[dict], path: Path) -> None:
    """Rows with at least ``label, beta, reward, kl`` (beta empty for the reference points)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") if row.get(c) is not None else "" for c in COLUMNS})


def read_frontier_csv(path: Path) -> list[dict]:
    """The rows of :func:`write_frontier_csv`, numbers as floats (beta None when empty)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key in COLUMNS[1:]:
            row[key] = float(row[key]) if row.get(key) not in (None, "") else None
    return rows


def plot_frontier(
    rows: list[dict], path: Path, reward_name: str = "reward", title: str | None = None
) -> None:
    """Scatter reward vs KL: DPO runs as a line ordered by KL (annotated with β), SFT and
    best-of-N as reference markers. Uses the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    dpo = sorted((r for r in rows if r["label"] not in ("sft", "best_of_n")), key=lambda r: r["kl"])
    if dpo:
        ax.plot([r["kl"] for r in dpo], [r["reward"] for r in dpo], "o-", color="tab:blue", label="DPO")
        for r in dpo:
            ax.annotate(
                f"β={r['beta']:g}",
                (r["kl"], r["reward"]),
                textcoords="offset points",
                xytext=(5, -10),
                fontsize=8,
            )
    markers = {"sft": ("*", "tab:green", "SFT (π_ref)"), "best_of_n": ("X", "tab:red", "best-of-N")}
    for r in rows:
        if r["label"] in markers:
            marker, color, name = markers[r["label"]]
            name = name.replace("N", f"{r['n']:g}") if r.get("n") else name
            ax.scatter([r["kl"]], [r["reward"]], marker=marker, s=160, color=color, label=name, zorder=3)
    ax.set_xlabel("KL(π‖π_ref) per completion (nats)")
    ax.set_ylabel(f"mean {reward_name}")
    ax.set_title(title or "Reward vs KL frontier (held-out prefixes)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
