"""Running a job safely: preflight checks, user-facing errors, checkpoints (with digests) and exact
resume, the run directory's lock, the non-finite guards, sweep jobs.

``errors.py`` and ``files.py`` are leaves (stdlib and torch only) that any folder may import to
raise :class:`~dpo_lightning.run.errors.UserError` or write a file atomically; ``integrity.py``
(checkpoint digests) imports only those two. The rest of ``run/`` sits above the stages and is
used by ``train.py`` only.
"""
