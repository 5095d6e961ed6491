"""Stable fingerprints for the tokenisation cache.

``datasets`` fingerprints a ``map`` by pickling its function and arguments; a tokenizer's pickle
is not stable (its Rust state and caches change after use), and an in-memory data set gets a
random fingerprint. The cache key here is computed from what determines the result instead —
the validated rows, the tokenizer's serialised vocabulary / template / special tokens, the length
limits and the tokenisation function — so the same data and tokenizer hit the same cache file
from any process.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import datasets
from datasets.fingerprint import Hasher
from transformers import PreTrainedTokenizerBase

# Bump when tokenisation output changes for the same inputs (invalidates old cache files).
CACHE_VERSION = "2"  # 2: pairs without signal after truncation are removed


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Hash of everything about ``tokenizer`` that changes token ids or templates."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else Hasher.hash(tokenizer).encode())
    meta = (
        type(tokenizer).__name__,
        tokenizer.chat_template,
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        sorted(tokenizer.get_added_vocab().items()),
    )
    h.update(repr(meta).encode())
    return h.hexdigest()


def rows_fingerprint(rows: Iterable[dict[str, Any]]) -> str:
    """Hash of validated rows (JSON-serialisable dicts), in order."""
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def tokenize_fingerprint(rows_fp: str, tokenizer_fp: str, fn: Callable, limits: Any) -> str:
    """The cache key of one tokenised split (hex, usable as a ``datasets`` fingerprint)."""
    key = (CACHE_VERSION, rows_fp, tokenizer_fp, f"{fn.__module__}.{fn.__qualname__}", repr(limits))
    return hashlib.sha256(repr(key).encode()).hexdigest()[:32]


def default_cache_dir() -> Path:
    """``$HF_DATASETS_CACHE/dpo_lightning`` (read now, not at import, so tests can redirect it)."""
    root = os.environ.get("HF_DATASETS_CACHE") or datasets.config.HF_DATASETS_CACHE
    return Path(root) / "dpo_lightning"
