"""``frontier.csv`` and ``frontier.png``: mean reward against KL(π‖π_ref), one point per run;
and the online-vs-offline verdict (:func:`online_verdict`)."""

from __future__ import annotations

import bisect
import csv
from pathlib import Path

COLUMNS = ["label", "beta", "reward", "kl", "reward_std", "reward_se", "n_samples", "n", "reward_calls"]
#: Label prefixes of the two trained families (``dpo_beta_<β>``, ``online_beta_<β>``).
OFFLINE, ONLINE = "dpo_beta_", "online_beta_"
REFERENCE_POINTS = ("sft", "best_of_n")


def write_frontier_csv(rows: list[dict], path: Path) -> None:
    """Rows with at least ``label, beta, reward, kl`` (beta empty for the reference points)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") if row.get(c) is not None else "" for c in COLUMNS})


def read_frontier_csv(path: Path) -> list[dict]:
    """The rows of :func:`write_frontier_csv`, numbers as floats (None when empty)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key in COLUMNS[1:]:
            row[key] = float(row[key]) if row.get(key) not in (None, "") else None
    return rows


# -- the verdict -------------------------------------------------------------------------------
def standard_error(row: dict) -> float:
    """A point's standard error of the mean reward (``reward_se``, else ``reward_std / √n``)."""
    if row.get("reward_se") is not None:
        return row["reward_se"]
    return (row.get("reward_std") or 0.0) / max(row.get("n_samples") or 1.0, 1.0) ** 0.5


def offline_curve(rows: list[dict], family: str = OFFLINE) -> list[tuple[float, float, float]]:
    """The offline frontier as (KL, reward, standard error) points: SFT (KL 0) and every offline
    DPO run (``family``: the label prefix), sorted by KL, each kept only if its reward beats every
    point of lower KL (a point with more KL and less reward is dominated)."""
    points = sorted(
        (r["kl"], r["reward"], standard_error(r))
        for r in rows
        if r["label"] == "sft" or r["label"].startswith(family)
    )
    curve: list[tuple[float, float, float]] = []
    for point in points:
        if not curve or point[1] > curve[-1][1]:
            curve.append(point)
    return curve


def reward_on_curve(curve: list[tuple[float, ...]], kl: float) -> tuple[float, float]:
    """The curve's reward at ``kl`` and its standard error: linear between its points (errors
    combined as independent), its first point below its first KL, its best point beyond its
    last KL (it reaches no more)."""
    kls = [p[0] for p in curve]
    i = bisect.bisect_right(kls, kl)
    if i == 0 or i == len(curve):
        point = curve[0] if i == 0 else curve[-1]
        return point[1], point[2] if len(point) > 2 else 0.0
    (k0, r0, *e0), (k1, r1, *e1) = curve[i - 1], curve[i]
    t = (kl - k0) / (k1 - k0)
    se = (((1 - t) * (e0 or [0.0])[0]) ** 2 + (t * (e1 or [0.0])[0]) ** 2) ** 0.5
    return r0 + (r1 - r0) * t, se


def online_verdict(rows: list[dict], need: int = 2) -> dict:
    """Is the online curve above the offline one?

    Rule (the pass/fail): an online point (KL_on, R_on) is **above** the offline curve when
    ``R_on > R_offline(KL_on)`` (:func:`reward_on_curve` of :func:`offline_curve`): it has a
    higher reward than the offline curve reaches at the same KL; equivalently (the curve rises
    with KL) the offline curve needs more KL than KL_on to reach R_on, or never reaches it. The
    online curve is above the offline one when at least ``need`` β values give such a point.

    Reported with each point, not part of the rule: ``inside`` (KL_on within the KL range the
    offline points span, so nothing is extrapolated), ``margin_se`` (the margin over the
    combined standard error of R_on and R_offline(KL_on); KL noise is not counted) and
    ``strict`` = above, inside and ``margin_se > 2``; ``reverse``: how many offline points the
    same rule puts above the *online* curve (linear interpolation flatters whichever family
    has a point where the other has none).
    """
    curve = offline_curve(rows)
    points = []
    for r in sorted((r for r in rows if r["label"].startswith(ONLINE)), key=lambda r: r["beta"]):
        at, at_se = reward_on_curve(curve, r["kl"])
        se = (standard_error(r) ** 2 + at_se**2) ** 0.5
        margin = r["reward"] - at
        inside = curve[0][0] <= r["kl"] <= curve[-1][0]
        points.append(
            {
                "beta": r["beta"],
                "reward": r["reward"],
                "kl": r["kl"],
                "offline_reward_at_kl": at,
                "margin": margin,
                "margin_se": margin / se if se > 0 else None,
                "inside": inside,
                "above": margin > 0,
                "strict": margin > 0 and inside and se > 0 and margin / se > 2,
            }
        )
    above = sum(p["above"] for p in points)
    online_curve = offline_curve(rows, ONLINE)
    offline_points = [r for r in rows if r["label"].startswith(OFFLINE)]
    reverse = sum(r["reward"] > reward_on_curve(online_curve, r["kl"])[0] for r in offline_points)
    return {
        "passed": above >= need,
        "above": above,
        "strict": sum(p["strict"] for p in points),
        "reverse": reverse,
        "offline_points": len(offline_points),
        "need": need,
        "offline_kl_range": [curve[0][0], curve[-1][0]],
        "rule": "online point above the offline curve: R_on > R_offline(KL_on), the offline "
        "curve (SFT + offline DPO points, upper envelope, linear between points, flat past its "
        "last) evaluated at the online point's KL",
        "points": points,
    }


def verdict_lines(verdict: dict) -> list[str]:
    """The rule, one line per online point, and the verdict, for printing."""
    lo, hi = verdict["offline_kl_range"]
    lines = [f"rule: {verdict['rule']}"]
    for pt in verdict["points"]:
        se = "" if pt["margin_se"] is None else f" ({pt['margin_se']:+.1f} SE)"
        where = "" if pt["inside"] else f", outside the offline KL range [{lo:.2f}, {hi:.2f}]"
        lines.append(
            f"online β={pt['beta']:g}: reward {pt['reward']:.4f} at KL {pt['kl']:.3f}; offline curve "
            f"there {pt['offline_reward_at_kl']:.4f}; margin {pt['margin']:+.4f}{se}{where} -> "
            + ("above" if pt["above"] else "NOT above")
        )
    word = "PASSED" if verdict["passed"] else "FAILED"
    n = len(verdict["points"])
    lines.append(
        f"verdict: {word}: {verdict['above']} of {n} online points above the offline curve (need "
        f"{verdict['need']}); {verdict['strict']} of {n} also inside its KL range and > 2 SE; "
        f"reversed, {verdict['reverse']} of {verdict['offline_points']} offline points are above "
        "the online curve"
    )
    return lines


# -- the plot ----------------------------------------------------------------------------------
def plot_frontier(
    rows: list[dict], path: Path, reward_name: str = "reward", title: str | None = None
) -> None:
    """Reward vs KL: offline DPO and online DPO runs as two lines ordered by KL (annotated with
    β), SFT and best-of-N as reference markers. Uses the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    families = [
        (OFFLINE, "o-", "tab:blue", "DPO (offline pairs)"),
        (ONLINE, "s-", "tab:orange", "online DPO"),
    ]
    for prefix, style, color, name in families:
        runs = sorted((r for r in rows if r["label"].startswith(prefix)), key=lambda r: r["kl"])
        if not runs:
            continue
        ax.plot([r["kl"] for r in runs], [r["reward"] for r in runs], style, color=color, label=name)
        for r in runs:
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
