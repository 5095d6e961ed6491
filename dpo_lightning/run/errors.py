"""User-facing failures: one readable line on stderr and a non-zero exit, never a traceback.

Code that detects a mistake the user can fix raises :class:`UserError` (or a subclass) with a
message that names the key, file or step and says what to do. :func:`report_errors` wraps the
CLI and turns those, plus a few well-known exceptions (GPU out-of-memory, invalid data rows),
into ``dpo-train: error: ...``. ``DPO_LIGHTNING_TRACEBACK=1`` re-raises instead (for debugging).

The error types::

    UserError                  anything the user can fix (exit code 2, one line)
    ├── ConfigError            settings that cannot work together (names every key involved)
    │   └── SettingError       one setting outside its allowed values: ``key=value: must be ...``
    ├── DataFileError          (data/loading.py) a data file or path that cannot be read
    └── InvalidDataError       (data/report.py) rows that cannot be trained on, by fault kind

Settings are checked where they are declared — the constructor or function that takes them —
with :func:`check_number` / :func:`check_choice`, which state the allowed range in the message.
A constructor knows its argument's name (``beta``), not where the config put it: the caller that
built it from the config re-keys the error (:meth:`SettingError.at`, ``loss.beta``).
"""

from __future__ import annotations

import difflib
import math
import os
import sys
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from typing import Any

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


class ConfigError(UserError, ValueError):
    """Settings that cannot work, alone or together; the message names the keys and the fix."""


class SettingError(ConfigError):
    """One setting outside its allowed values: ``<key>=<value>: must be <allowed>[; <hint>]``."""

    def __init__(self, key: str, value: Any, allowed: str, hint: str = "") -> None:
        self.key, self.value, self.allowed, self.hint = key, value, allowed, hint
        super().__init__(f"{key}={value!r}: must be {allowed}" + (f"; {hint}" if hint else ""))

    @property
    def name(self) -> str:
        """The argument's own name (the last part of the key)."""
        return self.key.rpartition(".")[2]

    def at(self, key: str) -> SettingError:
        """The same error under the setting's full config key (``beta`` -> ``loss.beta``)."""
        return SettingError(key, self.value, self.allowed, self.hint)


def _num(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def _bounds_text(minimum, maximum, above, below) -> str:
    """``≥ 1``, ``> 0``, ``in [0, 0.5)``, ... for the message."""
    low = (minimum, "[", "≥") if minimum is not None else (above, "(", ">")
    high = (maximum, "]", "≤") if maximum is not None else (below, ")", "<")
    if low[0] is not None and high[0] is not None:
        return f"in {low[1]}{_num(low[0])}, {_num(high[0])}{high[1]}"
    bound = low if low[0] is not None else high
    return f"{bound[2]} {_num(bound[0])}" if bound[0] is not None else ""


def check_number(
    key: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    below: float | None = None,
    integer: bool = False,
    optional: bool = False,
    hint: str = "",
) -> Any:
    """``value`` if it is a finite number within the bounds, else :class:`SettingError`.

    ``minimum``/``maximum`` are inclusive, ``above``/``below`` exclusive; ``integer`` refuses
    floats, ``optional`` lets ``None`` through. Booleans and strings (``seed=abc``) are refused.
    """
    if value is None and optional:
        return value
    kind = "an integer" if integer else "a finite number"
    allowed = " ".join(filter(None, [kind, _bounds_text(minimum, maximum, above, below)]))
    allowed += " (or null)" if optional else ""
    numeric = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, numeric) or not math.isfinite(value):
        raise SettingError(key, value, allowed, hint)
    out_of_range = (
        (minimum is not None and value < minimum)
        or (maximum is not None and value > maximum)
        or (above is not None and value <= above)
        or (below is not None and value >= below)
    )
    if out_of_range:
        raise SettingError(key, value, allowed, hint)
    return value


def check_choice(key: str, value: Any, choices: Collection[Any], hint: str = "") -> Any:
    """``value`` if it is one of ``choices``, else :class:`SettingError` (with a "did you mean")."""
    if value in choices:
        return value
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    extra = "; ".join(filter(None, [f"did you mean {close[0]!r}?" if close else "", hint]))
    raise SettingError(key, value, "one of " + ", ".join(repr(c) for c in choices), extra)


def oom_message(err: BaseException) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else "CUDA out of memory"
    return f"out of GPU memory ({first[:160]}); lower memory with: " + "; ".join(MEMORY_KNOBS)


# Exception type -> message builder (ours, and errors raised by libraries rather than by us).
def _known() -> dict[type[BaseException], Callable[[BaseException], str]]:
    return {
        UserError: str,  # InvalidDataError (data rows) is one too
        torch.OutOfMemoryError: oom_message,
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
        _exit(prog, message)


def config_error_line(
    err: BaseException, config_dir: str, overrides: list[str], config_name: str = "train"
) -> str:
    """One line for a Hydra composition error: Hydra's own words plus the valid choices."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    words = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    if isinstance(err, MissingConfigException):
        words = words.split(" Config search path:")[0].split(" Available options")[0]
        if err.options:
            return f"{words}; valid choices: {', '.join(sorted(err.options))}"
        return words
    cause = err.__cause__
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        parent, _, _ = str(cause.full_key).rpartition(".")
        valid = _valid_keys(
            config_dir,
            parent,
            [o for o in overrides if not o.startswith(f"{cause.full_key}=")],
            config_name,
        )
        line = f"{str(err).splitlines()[0]} {str(cause).splitlines()[0]}"
        return f"{line}; valid keys under {parent or 'the top level'}: {', '.join(valid)}" if valid else line
    return words


def _valid_keys(config_dir: str, parent: str, overrides: list[str], config_name: str) -> list[str]:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    try:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            cfg = compose(config_name, overrides=[o for o in overrides if not o.startswith("hydra.")])
        node = OmegaConf.select(cfg, parent) if parent else cfg
        return sorted(str(k) for k in node) if OmegaConf.is_dict(node) else []
    except Exception:  # the valid keys are a courtesy: never mask the original error
        return []


@contextmanager
def hydra_errors(config_dir: str, prog: str = "dpo-train", config_name: str = "train") -> Iterator[None]:
    """Around Hydra's entry: config-composition errors and unusable paths (e.g. the run
    directory Hydra creates) as one line and :data:`EXIT_CODE`, not a stripped traceback."""
    from hydra.errors import ConfigCompositionException, OverrideParseException

    if os.environ.get("DPO_LIGHTNING_TRACEBACK") == "1" or "HYDRA_FULL_ERROR" in os.environ:
        yield  # the user asked for tracebacks
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let Hydra raise instead of printing
    try:
        yield
    except (ConfigCompositionException, OverrideParseException) as err:
        overrides = [a for a in sys.argv[1:] if "=" in a and not a.startswith("-")]
        _exit(prog, config_error_line(err, config_dir, overrides, config_name))
    except OSError as err:
        if err.filename is None:
            raise
        _exit(
            prog,
            f"cannot use {err.filename}: {err.strerror}; check the path and its permissions "
            "(the run directory is hydra.run.dir, or hydra.sweep.dir with --multirun)",
        )
    finally:
        del os.environ["HYDRA_FULL_ERROR"]


def _exit(prog: str, message: str) -> None:
    sys.stdout.flush()
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_CODE)
