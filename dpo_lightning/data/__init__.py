"""Preference data: loading, row formats, validation, tokenization, collation, sampling, the
DataModule; and prompt-only data for online training (``prompts``: the completions are sampled).

file → rows (``validate``: every fault counted with its line) → tokens (``tokenize``, cached) →
batches (``collate``, or the collator of the engine that reads them). Imports no engine, stage,
reference or run module: the batch conventions (``IGNORE_INDEX``, pair indices) live here and
the compute layer reads them.
"""
