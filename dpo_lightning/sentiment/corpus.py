"""Review text and review-prefix prompts.

The offline corpus is generated from templates over a sentiment lexicon: every review opens with
a neutral sentence ("I watched Iron Valley last night."), then a few sentences whose adjectives
are drawn positive or negative with a per-review bias, so a 2–8-token prefix rarely decides the
sentiment and an LM fine-tuned on it samples both kinds of continuation — the room DPO needs.
Paper scale reads IMDb (``stanfordnlp/imdb``) instead (:func:`hub_reviews`).
"""

from __future__ import annotations

import random

import datasets
from transformers import PreTrainedTokenizerBase

from dpo_lightning.data.synthetic import NEGATIVE, POSITIVE, SUBJECTS, TITLES

OPENINGS = [
    "I watched {title} last night.",
    "I saw {title} with my family.",
    "We went to see {title}.",
    "{title} came out this week.",
    "I finally watched {title}.",
    "My friend picked {title}.",
]
SENTENCES = [
    "{subject} was {a}.",
    "{subject} was {a} and {b}.",
    "{subject} felt {a}.",
    "I thought {subject_l} was {a}.",
    "Honestly, {subject_l} was {a} and {b}.",
]
VERDICTS = {
    "pos": ["I loved it.", "I would watch it again.", "Highly recommended.", "A great film."],
    "neg": ["I hated it.", "I want my money back.", "Avoid it.", "A bad film."],
}
LEXICON = {"pos": POSITIVE, "neg": NEGATIVE}


def _review(rng: random.Random) -> str:
    bias = rng.random()  # this review's share of positive sentences
    parts = [rng.choice(OPENINGS).format(title=rng.choice(TITLES))]
    for _ in range(rng.randint(1, 3)):
        pol = "pos" if rng.random() < bias else "neg"
        subject = rng.choice(SUBJECTS)
        a, b = rng.sample(LEXICON[pol], 2)
        parts.append(rng.choice(SENTENCES).format(subject=subject, subject_l=subject.lower(), a=a, b=b))
    parts.append(rng.choice(VERDICTS["pos" if rng.random() < bias else "neg"]))
    return " ".join(parts)


def review_texts(n: int = 4000, seed: int = 0) -> list[str]:
    """``n`` generated reviews, deterministic in ``seed``."""
    rng = random.Random(seed)
    return [_review(rng) for _ in range(n)]


def generated_reviews(n: int = 4000, seed: int = 0) -> datasets.Dataset:
    """The offline corpus as a ``datasets.Dataset`` with one ``text`` column."""
    return datasets.Dataset.from_dict({"text": review_texts(n, seed)})


def hub_reviews(
    path: str = "stanfordnlp/imdb",
    split: str = "train",
    column: str = "text",
    limit: int | None = None,
) -> datasets.Dataset:
    """Reviews from the hub (paper: IMDb train split), HTML line breaks removed, as ``text``."""
    ds = datasets.load_dataset(path, split=split)
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return ds.map(lambda r: {"text": r[column].replace("<br />", " ")}, remove_columns=ds.column_names)


def review_prefixes(
    texts: list[str],
    tokenizer: PreTrainedTokenizerBase,
    min_tokens: int = 2,
    max_tokens: int = 8,
    seed: int = 0,
) -> list[str]:
    """One prompt per text: its first n tokens (n uniform in [min_tokens, max_tokens]) decoded,
    as the paper's "prefixes from the IMDB dataset of length 2-8 tokens"."""
    rng = random.Random(seed)
    prompts = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        n = min(rng.randint(min_tokens, max_tokens), len(ids))
        prompts.append(tokenizer.decode(ids[:n]))
    return prompts
