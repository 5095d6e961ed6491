"""``python -m dpo_lightning.bench``: see :mod:`dpo_lightning.bench.cli`."""

from dpo_lightning.bench.cli import main

main()
