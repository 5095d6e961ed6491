"""What a run shows: throughput, loggers (W&B offline fallback), the global-batch line, the
per-rank data audit, ``summary.json`` and the printed table. Reads stages' metrics; nothing
below imports it.
"""
