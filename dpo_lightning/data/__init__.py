"""Preference data: loading, row formats, validation, tokenization, collation, sampling, the
DataModule; and prompt-only data for online training (``prompts``: the completions are sampled).

file → records (``sources``: a reader per file type, folders and hub data sets resolved to their
files) → rows (``validate``: every fault counted with its file and line) → tokens (``tokenize``,
cached; pairs left without signal dropped) → splits (``splits``: carved validation, rows in both
splits counted) → batches (``collate``, or the collator of the engine that reads them).

Imports no engine, stage, reference or run module (but the leaf ``run/errors.py``, to refuse
settings and files in one line; ``checks`` holds the DataModule's argument checks): the batch
conventions (``IGNORE_INDEX``, pair indices) live here and the compute layer reads them.
"""
