"""Scores of K completions per prompt → preference pairs, for all prompts at once.

``pairing(scores, same) -> PromptPairs``: ``scores`` (N, K), ``same`` (N, K) ids of each
completion's token sequence (equal ids: the same completion sampled twice). A pair needs a strict
score difference between two different completions; every other candidate pair is a *tie*: no
pair, counted. Indices are local to each prompt (0..K-1), winner first, in the order
``itertools.combinations`` gives — the order of the offline labelling
(:mod:`dpo_lightning.sentiment.label`), so the same scores give the same pairs online and offline.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class PromptPairs:
    """Pairs of a batch: ``prompt``, ``chosen``, ``rejected`` (P,) and ``ties`` (candidate pairs
    not formed: equal scores, or the same completion twice)."""

    prompt: Tensor
    chosen: Tensor
    rejected: Tensor
    ties: int

    def per_prompt(self, n: int) -> list[list[list[int]]]:
        """``[N]`` lists of ``[winner, loser]``: the ``pairs`` of each example for the collator."""
        out: list[list[list[int]]] = [[] for _ in range(n)]
        triples = zip(self.prompt.tolist(), self.chosen.tolist(), self.rejected.tolist(), strict=True)
        for i, w, lose in triples:
            out[i].append([w, lose])
        return out


class Pairing:
    """Interface: ``(scores (N, K), same (N, K)) -> PromptPairs``."""

    def __call__(self, scores: Tensor, same: Tensor) -> PromptPairs:
        raise NotImplementedError


class AllPairs(Pairing):
    """Every pair (i < j) of a prompt's completions whose scores differ: up to K(K-1)/2 per
    prompt (DPO paper §6.1: 4 completions → 6 pairs)."""

    def __call__(self, scores: Tensor, same: Tensor) -> PromptPairs:
        k = scores.shape[1]
        i, j = torch.triu_indices(k, k, offset=1)  # (C,) combinations in lexicographic order
        si, sj = scores[:, i], scores[:, j]  # (N, C)
        formed = (si != sj) & (same[:, i] != same[:, j])
        prompt, c = formed.nonzero(as_tuple=True)  # prompt-major, then combination order
        first_wins = si[prompt, c] > sj[prompt, c]
        chosen = torch.where(first_wins, i[c], j[c])
        rejected = torch.where(first_wins, j[c], i[c])
        return PromptPairs(prompt, chosen, rejected, ties=int((~formed).sum()))


class BestVsWorst(Pairing):
    """One pair per prompt: the highest score against the lowest (first index on equal scores);
    a tie when they are equal or the same completion (one tie per such prompt)."""

    def __call__(self, scores: Tensor, same: Tensor) -> PromptPairs:
        rows = torch.arange(scores.shape[0])
        best, worst = scores.argmax(dim=1), scores.argmin(dim=1)
        formed = (scores[rows, best] != scores[rows, worst]) & (same[rows, best] != same[rows, worst])
        prompt = rows[formed]
        return PromptPairs(prompt, best[formed], worst[formed], ties=int((~formed).sum()))


def sequence_ids(completions: list[list[list[int]]]) -> Tensor:
    """(N, K) ids such that two completions of a prompt share an id iff their tokens are equal."""
    seen: dict[tuple[int, ...], int] = {}
    return torch.tensor([[seen.setdefault(tuple(c), len(seen)) for c in row] for row in completions])
