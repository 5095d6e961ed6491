"""User-facing failures: one readable line on stderr and a non-zero exit, never a traceback.

Code that detects a mistake the user can fix raises :class:`UserError` (or a subclass) with a
message that names the key, file or step and says what to do. :func:`report_errors` wraps the
CLI and turns those, plus a few well-known exceptions (GPU out-of-memory, invalid data rows),
into ``dpo-train: error: ...``. ``DPO_LIGHTNING_TRACEBACK=1`` re-raises instead (for debugging).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

EXIT_CODE = 2  # like argparse: the command was given something it cannot use

# Config knobs that lower training memory, suggested when a GPU runs out of it.
MEMORY_KNOBS = (
    "data.batch_size (pairs per step; keep the global batch with trainer.accumulate_grad_batches)",
    "data.max_length / data.max_prompt_length (tokens per row)",
    "trainer.precision=bf16-mixed",
    "model.dtype=bfloat16",
    "trainer=ddp or an FSDP strategy (shard over more GPUs)",
)


class UserError(Exception):
    """A problem with the config, inputs or environment that the user can fix."""


def oom_message(err: BaseException) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else "CUDA out of memory"
    return f"out of GPU memory ({first[:160]}); lower memory with: " + "; ".join(MEMORY_KNOBS)


def _invalid_data_error() -> type[Exception]:
    from dpo_lightning.data.report import InvalidDataError

    return InvalidDataError


# Exception type -> message builder, for errors raised by libraries rather than by us.
def _known() -> dict[type[BaseException], Callable[[BaseException], str]]:
    return {
        UserError: str,
        torch.OutOfMemoryError: oom_message,
        _invalid_data_error(): str,
    }


def one_line(err: BaseException) -> str | None:
    """The user-facing message for ``err``, or ``None`` when it is a bug (keep the traceback)."""
    for kind, message in _known().items():
        if isinstance(err, kind):
            return " | ".join(line.strip() for line in message(err).splitlines() if line.strip())
    cause = err.__cause__ or err.__context__
    return one_line(cause) if cause is not None and cause is not err else None


@contextmanager
def report_errors(prog: str = "dpo-train") -> Iterator[None]:
    """Print known failures as ``<prog>: error: <message>`` and exit with :data:`EXIT_CODE`."""
    try:
        yield
    except Exception as err:
        message = one_line(err)
        if message is None or os.environ.get("DPO_LIGHTNING_TRACEBACK") == "1":
            raise
        sys.stdout.flush()
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
        sys.exit(EXIT_CODE)
