"""Turn K scored completions per prompt into preference pairs (a ``datasets`` dataset).

Pairing is chosen by config (``label.pairing._target_``): :class:`AllPairs` (the paper: 4
completions → 6 pairs per prefix) or :class:`BestVsWorst` (one pair per prefix). Tied scores give
no preference and no pair. Rows are the standard ``{prompt, chosen, rejected}`` format plus
``chosen_score``, ``rejected_score`` and ``prompt_id``, so the DataModule reads the saved folder
with ``data=file data.path=<folder>``.
"""

from __future__ import annotations

import random
from itertools import combinations

import datasets

from dpo_lightning.data.formats import squash_whitespace


class AllPairs:
    """Every pair (i, j) of the K completions with different scores, winner first."""

    def __call__(self, scores: list[float]) -> list[tuple[int, int]]:
        return [
            (i, j) if scores[i] > scores[j] else (j, i)
            for i, j in combinations(range(len(scores)), 2)
            if scores[i] != scores[j]
        ]


class BestVsWorst:
    """One pair: the highest-scored completion against the lowest (none when all tie)."""

    def __call__(self, scores: list[float]) -> list[tuple[int, int]]:
        best = max(range(len(scores)), key=scores.__getitem__)
        worst = min(range(len(scores)), key=scores.__getitem__)
        return [(best, worst)] if scores[best] != scores[worst] else []


def preference_rows(
    prompts: list[str], completions: list[list[str]], scores: list[list[float]], pairing
) -> list[dict]:
    """Pairs of every prompt as rows; pairs whose texts are equal (up to whitespace) or blank are
    skipped (no preference can be learnt from them and the data format rejects them)."""
    rows = []
    for pid, (prompt, texts, row_scores) in enumerate(zip(prompts, completions, scores, strict=True)):
        for w, lose in pairing(row_scores):
            a, b = squash_whitespace(texts[w]), squash_whitespace(texts[lose])
            if a == b or not a or not b:
                continue
            rows.append(
                {
                    "prompt": prompt,
                    "chosen": texts[w],
                    "rejected": texts[lose],
                    "chosen_score": float(row_scores[w]),
                    "rejected_score": float(row_scores[lose]),
                    "prompt_id": pid,
                }
            )
    return rows


def preference_dataset(rows: list[dict], val_fraction: float = 0.05, seed: int = 0) -> datasets.DatasetDict:
    """``{train, validation}`` split **by prompt**, so no validation prompt is trained on."""
    if not rows:
        raise ValueError(
            "labelling produced no preference pairs: every prompt's completions tied "
            "or were blank; sample more completions (sample.k) or longer ones"
        )
    ids = sorted({r["prompt_id"] for r in rows})
    random.Random(seed).shuffle(ids)
    n_val = max(1, round(val_fraction * len(ids))) if len(ids) > 1 else 0
    val_ids = set(ids[:n_val])
    train = [r for r in rows if r["prompt_id"] not in val_ids]
    val = [r for r in rows if r["prompt_id"] in val_ids] or train[:1]
    return datasets.DatasetDict(
        train=datasets.Dataset.from_list(train), validation=datasets.Dataset.from_list(val)
    )
