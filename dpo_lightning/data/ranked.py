"""Ranked / K-wise rows: one prompt, K ≥ 2 scored completions, turned into preference pairs.

Every completion becomes one row of the batch and is forwarded once per step, however many pairs
it is in: pairs are indices into the K completions (the index API of
:func:`dpo_lightning.losses.dpo_loss`, ``yw_idxs`` / ``yl_idxs``). Completions in no pair are not
kept. Pairs with equal scores carry no preference: they are never formed, and counted
(note ``tied_pairs``); so do pairs of identical completions (note ``identical_pairs``) or of
completions that differ only by whitespace (note ``whitespace_only_pairs``). A score that is
null, not a number, NaN or infinite makes the whole row invalid (``null_score``,
``wrong_type_score``, ``nonfinite_score``): dropping only that completion would silently change
the ranking, and a NaN compares false with everything, so its completion would vanish from every
pair.

Pair modes (``data.format.mode``), each a small function in :data:`PAIR_MODES`:
``all_pairs`` (every ordered pair with a strict preference), ``best_vs_worst``,
``best_vs_random`` (the best against one strictly worse completion, drawn with a per-prompt seed).
"""

from __future__ import annotations

import itertools
import math
import random
import zlib
from collections.abc import Callable
from numbers import Real
from typing import Any

from dpo_lightning.data.chat import ROLES, as_turns, tokenize_chat_batch
from dpo_lightning.data.formats import (
    InvalidRow,
    RowFormat,
    check_text,
    render_template,
    require_text,
    require_value,
    squash_whitespace,
)
from dpo_lightning.data.tokenize import tokenize_text_batch
from dpo_lightning.run.errors import check_choice

Pairs = list[tuple[int, int]]


def all_pairs(scores: list[float], rng: random.Random) -> Pairs:
    """Every ``(i, j)`` with ``scores[i] > scores[j]``: K(K-1)/2 pairs when there are no ties."""
    return [(i, j) for i, j in itertools.permutations(range(len(scores)), 2) if scores[i] > scores[j]]


def best_vs_worst(scores: list[float], rng: random.Random) -> Pairs:
    """The first best against the first worst completion."""
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    worst = min(range(len(scores)), key=lambda i: (scores[i], i))
    return [(best, worst)]


def best_vs_random(scores: list[float], rng: random.Random) -> Pairs:
    """The first best against a random strictly worse completion."""
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    return [(best, rng.choice([j for j, s in enumerate(scores) if s < scores[best]]))]


PAIR_MODES: dict[str, Callable[[list[float], random.Random], Pairs]] = {
    "all_pairs": all_pairs,
    "best_vs_worst": best_vs_worst,
    "best_vs_random": best_vs_random,
}


def finite_score(value: Any) -> float:
    """A score as a finite float, else :class:`InvalidRow` ``null_/wrong_type_/nonfinite_score``."""
    if value is None:
        raise InvalidRow("null_score")
    if not isinstance(value, Real) or isinstance(value, bool):
        raise InvalidRow("wrong_type_score")
    try:
        out = float(value)
    except OverflowError:  # an int beyond float range (a 400-digit JSON number)
        raise InvalidRow("nonfinite_score") from None
    if not math.isfinite(out):
        raise InvalidRow("nonfinite_score")
    return out


def count_ties(scores: list[float]) -> int:
    """Unordered pairs with equal scores (no preference between them)."""
    return sum(a == b for a, b in itertools.combinations(scores, 2))


class RankedFormat(RowFormat):
    """One prompt with K scored completions (UltraFeedback ``completions``, SHP score pairs, TL;DR).

    Completions and scores come from one of:

    * ``columns.completions``: a list of strings, or of dicts read with ``text_key`` (and
      ``score_key`` for the score); else scores from the list in ``columns.scores``
      (parallel to the completions) or from ``choice_column`` (index of the preferred one);
    * ``completion_columns`` + ``score_columns``: one column per completion (SHP's
      ``human_ref_A/B`` and ``score_A/B``).

    Args:
        mode: ``all_pairs`` | ``best_vs_worst`` | ``best_vs_random``.
        higher_is_better: false for ranks (1 = best).
        seed: for ``best_vs_random`` (combined with the prompt, so a row always draws the same).
        chat: render with the chat template: the prompt is a message list (or a string: one user
            turn) and each completion an assistant message list (or a string: one turn).
    """

    fields = ("prompt", "completions", "scores")

    def __init__(
        self,
        mode: str = "all_pairs",
        text_key: str | None = None,
        score_key: str | None = None,
        choice_column: str | None = None,
        completion_columns: list[str] | None = None,
        score_columns: list[str] | None = None,
        higher_is_better: bool = True,
        seed: int = 0,
        chat: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.chat = chat
        check_choice("mode", mode, sorted(PAIR_MODES))
        self.mode, self.text_key, self.score_key = mode, text_key, score_key
        self.choice_column = choice_column
        self.completion_columns, self.score_columns = completion_columns, score_columns
        self.higher_is_better, self.seed = higher_is_better, seed

    @property
    def tokenize_batch(self) -> Callable[..., dict[str, list]]:
        """Chat rows through the chat template, text rows as plain text."""
        return tokenize_chat_batch if self.chat else tokenize_text_batch

    def number_columns(self) -> tuple[str, ...]:
        """Score columns (one per completion) and the choice column: numbers in csv files."""
        return (*(self.score_columns or ()), *([self.choice_column] if self.choice_column else []))

    def texts_and_scores(self, row: dict[str, Any]) -> tuple[list[str], list[Any]]:
        if self.completion_columns:
            texts = [require_text(row, c) for c in self.completion_columns]
            return texts, [require_value(row, c) for c in self.score_columns or ()]
        col = self.col("completions")
        items = require_value(row, col)
        if not isinstance(items, list):
            raise InvalidRow(f"wrong_type_{col}")
        if self.text_key is not None:
            if not all(isinstance(it, dict) for it in items):
                raise InvalidRow(f"wrong_type_{col}")
            texts = [check_text(it.get(self.text_key), f"{col}.{self.text_key}") for it in items]
        elif self.chat:
            texts = [as_turns(it, col, "assistant", ROLES) for it in items]
        else:
            texts = [check_text(it, col) for it in items]
        if self.score_key is not None:
            return texts, [it.get(self.score_key) for it in items]
        if self.choice_column is not None:
            choice = require_value(row, self.choice_column)
            if not isinstance(choice, int) or isinstance(choice, bool) or not 0 <= choice < len(texts):
                raise InvalidRow(f"wrong_type_{self.choice_column}")
            return texts, [float(i == choice) for i in range(len(texts))]
        scores = require_value(row, self.col("scores"))
        if not isinstance(scores, list):
            raise InvalidRow(f"wrong_type_{self.col('scores')}")
        return texts, scores

    def chat_prompt(self, row: dict[str, Any]) -> list[dict[str, str]]:
        """The prompt as messages (a string or template result is one user turn)."""
        if self.prompt_template is not None:
            prompt = as_turns(render_template(self.prompt_template, row), "prompt", "user", ROLES)
        else:
            col = self.col("prompt")
            prompt = as_turns(require_value(row, col), col, "user", ROLES)
        return self.with_system_message(prompt, row)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        prompt = self.chat_prompt(row) if self.chat else self.text_prompt(row)
        texts, scores = self.texts_and_scores(row)
        if len(texts) < 2:
            raise InvalidRow("fewer_than_two_completions")
        if len(scores) != len(texts):
            raise InvalidRow("scores_do_not_match_completions")
        scores = [finite_score(s) if self.higher_is_better else -finite_score(s) for s in scores]
        if len(set(scores)) < 2:
            raise InvalidRow("fewer_than_two_distinct_scores")
        if self.chat and any(t[0]["role"] != "assistant" for t in texts):
            raise InvalidRow("completion_not_assistant")
        rng = random.Random(zlib.crc32(repr(prompt).encode()) ^ self.seed)
        candidates = PAIR_MODES[self.mode](scores, rng)
        squashed = [squash_whitespace(t) for t in texts]
        identical = sum(texts[w] == texts[lose] for w, lose in candidates)
        pairs = [(w, lose) for w, lose in candidates if squashed[w] != squashed[lose]]
        if not pairs:
            raise InvalidRow("chosen_equals_rejected" if identical else "differ_only_by_whitespace")
        used = sorted({i for p in pairs for i in p})  # keep only completions some pair uses
        index = {old: new for new, old in enumerate(used)}
        notes = {
            "tied_pairs": count_ties(scores),
            "identical_pairs": identical,
            "whitespace_only_pairs": len(candidates) - len(pairs) - identical,
        }
        return {
            "prompt": prompt,
            "completions": [texts[i] for i in used],
            "pairs": [[index[w], index[lose]] for w, lose in pairs],
            "notes": {k: v for k, v in notes.items() if v},
        }
