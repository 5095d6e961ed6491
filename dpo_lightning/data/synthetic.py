"""A preference data set the package generates itself, for offline runs and tests.

Rule the model must learn: the preferred completion carries positive sentiment, the dispreferred
one the same sentence shape with negative words. Prompts, subjects and templates are shared, so
only the sentiment separates chosen from rejected; a held-out split tests generalisation to unseen
(title, subject, adjective) combinations.
"""

from __future__ import annotations

import random

import datasets

TITLES = [
    "Midnight Harbor",
    "The Glass Orchard",
    "Paper Lanterns",
    "Iron Valley",
    "Quiet Storm",
    "The Last Ferry",
    "Crimson Tide Pool",
    "Northern Lights",
    "The Clockmaker",
    "Salt and Smoke",
    "Hollow Crown",
    "Blue Meridian",
    "The Long Winter",
    "Echo Park",
    "Silver Lining",
    "Desert Bloom",
    "The River Road",
    "Stone Garden",
    "Velvet Hours",
    "Open Water",
]
SUBJECTS = [
    "The story",
    "The acting",
    "The music",
    "The ending",
    "The cast",
    "The script",
    "The camera work",
    "The pacing",
    "The dialogue",
    "The lead actor",
]
POSITIVE = [
    "wonderful",
    "brilliant",
    "delightful",
    "moving",
    "superb",
    "charming",
    "excellent",
    "gripping",
    "beautiful",
    "hilarious",
    "fantastic",
    "lovely",
    "great",
    "inspiring",
]
NEGATIVE = [
    "terrible",
    "boring",
    "awful",
    "dull",
    "clumsy",
    "painful",
    "weak",
    "tedious",
    "lifeless",
    "dreadful",
    "horrible",
    "bland",
    "bad",
    "annoying",
]
VERDICT = {
    "pos": ["I loved it.", "I would watch it again.", "Highly recommended."],
    "neg": ["I hated it.", "I want my money back.", "Avoid it."],
}
PROMPTS = ["Review of {title}:", "What did you think of {title}?\n", "My thoughts on {title}:"]


def _sentence(rng: random.Random, words: list[str], verdict: list[str], shape: int) -> str:
    subject = SUBJECTS[shape % len(SUBJECTS)]
    a, b = rng.sample(words, 2)
    return f" {subject} was {a} and {b}. {rng.choice(verdict)}"


def sentiment_rows(n: int = 2000, seed: int = 0) -> list[dict[str, str]]:
    """``n`` rows of ``{prompt, chosen, rejected}``, deterministic in ``seed``."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = rng.choice(PROMPTS).format(title=rng.choice(TITLES))
        shape = rng.randrange(len(SUBJECTS))
        chosen = _sentence(rng, POSITIVE, VERDICT["pos"], shape)
        rejected = _sentence(rng, NEGATIVE, VERDICT["neg"], shape)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def sentiment_pairs(n: int = 2000, seed: int = 0) -> datasets.Dataset:
    """The rows of :func:`sentiment_rows` as a ``datasets.Dataset``."""
    return datasets.Dataset.from_list(sentiment_rows(n, seed))


def sentiment_corpus(n: int = 2000, seed: int = 0) -> list[str]:
    """All texts of the data set, to train the offline tokenizer on."""
    return [r[k] for r in sentiment_rows(n, seed) for k in ("prompt", "chosen", "rejected")]
