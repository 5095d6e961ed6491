"""Local stand-ins for what the README's commands name: hub models and data files.

A stand-in model is a tiny Llama saved with ``save_pretrained`` next to **its own** tokenizer,
a BPE trained on other text than model=tiny's (so a run that kept the built-in tokenizer would
give it the wrong ids, and the export's tokenizer would differ from the model's).
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import REPO

FIXTURES = REPO / "tests" / "fixtures"

# Text unlike the sentiment corpus: the stand-in's merges (and ids) differ from model=tiny's BPE.
_TEXTS = [
    f"Ticket {i}: the {w} pump on deck {i % 7} reports {i * 3} bar; operator {w[::-1]} signs off."
    for i, w in enumerate(["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"] * 40)
]


def make_model_folder(folder: Path, vocab_size: int = 600, positions: int = 2048) -> Path:
    """A tiny Llama + its own tokenizer in ``folder`` (``vocab_size`` ≥ 512: model=tiny's
    tokenizer would silently fit it; < 512: it would index past the embedding)."""
    from dpo_lightning.models.loading import load_causal_lm
    from dpo_lightning.models.tokenizers import train_bpe_tokenizer

    if (folder / "config.json").exists():
        return folder
    from dpo_lightning.data.synthetic import sentiment_corpus

    tok = train_bpe_tokenizer(_TEXTS + sentiment_corpus(200, seed=7), vocab_size)
    model = load_causal_lm(
        config=dict(
            model_type="llama",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=positions,
            tie_word_embeddings=True,
        ),
        vocab_size=len(tok),
        seed=1,
    )
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_pairs(path: Path, n: int = 48, columns: dict[str, str] | None = None, seed: int = 3) -> Path:
    """Standard {prompt, chosen, rejected} rows (renamed by ``columns``) as JSON Lines."""
    from dpo_lightning.data.synthetic import sentiment_pairs

    names = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", **(columns or {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in sentiment_pairs(n=n, seed=seed):
            f.write(json.dumps({names[k]: v for k, v in row.items()}) + "\n")
    return path


def write_texts(path: Path, n: int = 48) -> Path:
    """Plain-text rows {text} (stage=sft data=text) as JSON Lines."""
    from dpo_lightning.data.synthetic import sentiment_corpus

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in sentiment_corpus(n, seed=5)))
    return path


def same_tokenizer(a: str | Path, b: str | Path) -> bool:
    """Whether two saved tokenizers map text to the same ids (vocabulary and special tokens)."""
    from transformers import AutoTokenizer

    ta, tb = AutoTokenizer.from_pretrained(a), AutoTokenizer.from_pretrained(b)
    return ta.get_vocab() == tb.get_vocab() and ta.all_special_tokens == tb.all_special_tokens


def make_tiny_default_folder(folder: Path) -> Path:
    """model=tiny's architecture saved with model=tiny's own tokenizer: what ``dpo-train
    stage=sft hydra.run.dir=runs/sft`` exports, so a reference made of it shares the default
    policy's tokenizer."""
    from dpo_lightning.models.loading import load_causal_lm
    from dpo_lightning.models.tokenizers import offline_sentiment_tokenizer

    if (folder / "config.json").exists():
        return folder
    tok = offline_sentiment_tokenizer(vocab_size=512)
    config = dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    load_causal_lm(config=config, vocab_size=len(tok), seed=2).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def make_reward_model_folder(folder: Path, base: Path) -> Path:
    """A ``stage=reward_model`` export (an ``AutoModelForSequenceClassification``, one label) on
    the backbone of the causal LM in ``base``, with its tokenizer."""
    from transformers import AutoTokenizer

    from dpo_lightning.models.loading import load_causal_lm
    from dpo_lightning.stages.reward_model import reward_model_from_causal_lm

    if (folder / "config.json").exists():
        return folder
    tok = AutoTokenizer.from_pretrained(base)
    reward_model_from_causal_lm(load_causal_lm(str(base)), tok.pad_token_id).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
