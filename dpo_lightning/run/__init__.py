"""Running a job safely: preflight checks, user-facing errors, checkpoints and exact resume, the
non-finite guard, sweep jobs.

``errors.py`` and ``files.py`` are leaves (stdlib and torch only) that any folder may import to
raise :class:`~dpo_lightning.run.errors.UserError` or write a file atomically; the rest of
``run/`` sits above the stages and is used by ``train.py`` only.
"""
