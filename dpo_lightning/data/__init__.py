"""Preference data: loading, row formats, validation, tokenization, collation, sampling, the
DataModule.

file → rows (``validate``: every fault counted with its line) → tokens (``tokenize``, cached) →
batches (``collate``, or the collator of the engine that reads them). Imports no engine, stage,
reference or run module (but the leaf ``run/errors.py``, to refuse settings and files in one
line; ``checks`` holds the DataModule's argument checks): the batch conventions
(``IGNORE_INDEX``, pair indices) live here and the compute layer reads them.
"""
