"""Preference data: loading, validation, tokenization, collation and the DataModule."""
