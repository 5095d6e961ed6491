"""Building the models and tokenizers: HF loading (hub id, folder, config), LoRA/QLoRA, FSDP2
sharding and the full-weights gather for export, the offline BPE tokenizer.

Imports no stage, reference, run or reporting module (the offline tokenizer reads the built-in
corpus from ``data.synthetic``).
"""
