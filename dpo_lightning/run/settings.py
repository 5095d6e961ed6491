"""Every setting checked before any tokenizing or model work: :func:`check_settings`, :func:`build`.

Where a setting is checked depends on who declares it, and nothing is checked twice:

* our own classes and functions check their arguments themselves (constructors raising
  :class:`~dpo_lightning.run.errors.SettingError` with the allowed range): losses (β > 0, ...),
  reference strategies, the DataModule and its length limits, engines, the model loader, LoRA;
* :func:`check_settings` builds the cheap ones of those early from the config — the loss and the
  reference strategy (with their pairing and the policy they need) — and calls the data's, the
  model's and the adapter's argument checks, so their refusals come before the tokenizer is even
  built;
* settings read by third-party classes (Lightning's ``Trainer``, the torch optimizer, the
  transformers scheduler) and the top-level keys are checked by :data:`RULES`; the optimizer and
  scheduler are also built once on a dummy parameter, so torch and transformers refuse their
  own arguments now rather than after the model is loaded;
* :func:`build` instantiates a config node (``train.py``: engine, data, trainer) and gives any
  :class:`SettingError` of the constructor its full config key (``batch_size`` →
  ``data.batch_size``), unwrapped from Hydra's ``InstantiationException``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from dpo_lightning.data.checks import check_data_args
from dpo_lightning.data.loading import check_data_path
from dpo_lightning.models.loading import check_model_args
from dpo_lightning.models.lora import check_lora, lora_args
from dpo_lightning.reference import CopyReference
from dpo_lightning.run.errors import ConfigError, SettingError, UserError, check_number
from dpo_lightning.run.preemption import check_preemption

_MISSING = object()


# -- settings of third-party classes and top-level keys --------------------------------------------
def _max_steps(value: Any, cfg: DictConfig) -> None:
    epochs = OmegaConf.select(cfg, "trainer.max_epochs")
    if value == -1 and isinstance(epochs, int) and epochs >= 1:
        return  # documented: train trainer.max_epochs epochs
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SettingError(
            "trainer.max_steps",
            value,
            "an integer ≥ 1, or -1 with trainer.max_epochs ≥ 1 (train that many epochs)",
            "0 would export the untrained model" if value == 0 else "",
        )


def _max_epochs(value: Any, cfg: DictConfig) -> None:
    if value not in (-1, None):
        check_number("trainer.max_epochs", value, minimum=1, integer=True, hint="-1: bounded by max_steps")


def _accelerator(value: Any, cfg: DictConfig) -> None:
    available = {
        "gpu": torch.cuda.is_available(),
        "cuda": torch.cuda.is_available(),
        "mps": torch.backends.mps.is_available(),
    }
    if available.get(str(value), True):
        return
    raise SettingError(
        "trainer.accelerator",
        value,
        f"'cpu' or 'auto' here: no {value} device is visible (torch {torch.__version__})",
        "use trainer=cpu (or trainer.accelerator=cpu), or run on a machine with that device",
    )


def _devices(value: Any, cfg: DictConfig) -> None:
    if isinstance(value, int) and value != -1:
        check_number("trainer.devices", value, minimum=1, integer=True, hint="-1: every visible device")


def _interval(key: str, minimum: int) -> Callable[[Any, DictConfig], None]:
    """A count (an int ≥ ``minimum``) or a fraction (a float, at most 1; Lightning's convention)."""

    def check(value: Any, cfg: DictConfig) -> None:
        if isinstance(value, float):
            bounds = {"minimum": 0.0} if minimum == 0 else {"above": 0.0}
            check_number(key, value, maximum=1.0, **bounds, hint=f"or a count, an integer ≥ {minimum}")
        elif value is not None:
            check_number(key, value, minimum=minimum, integer=True, hint="or a fraction ≤ 1.0")

    return check


def _number(key: str, **bounds: Any) -> Callable[[Any, DictConfig], None]:
    return lambda value, cfg: check_number(key, value, **bounds)


#: config key -> check of its value (given the whole config); keys absent from a config are skipped.
RULES: dict[str, Callable[[Any, DictConfig], None]] = {
    "seed": _number("seed", minimum=0, maximum=2**32 - 1, integer=True),
    "trainer.max_steps": _max_steps,
    "trainer.max_epochs": _max_epochs,
    "trainer.accelerator": _accelerator,
    "trainer.devices": _devices,
    "trainer.num_nodes": _number("trainer.num_nodes", minimum=1, integer=True),
    "trainer.accumulate_grad_batches": _number("trainer.accumulate_grad_batches", minimum=1, integer=True),
    "trainer.gradient_clip_val": _number("trainer.gradient_clip_val", minimum=0, optional=True),
    "trainer.log_every_n_steps": _number("trainer.log_every_n_steps", minimum=1, integer=True),
    "trainer.val_check_interval": _interval("trainer.val_check_interval", 1),
    "trainer.limit_val_batches": _interval("trainer.limit_val_batches", 0),
    "optim.optimizer.lr": _number("optim.optimizer.lr", minimum=0),
    "optim.scheduler.num_warmup_steps": _number("optim.scheduler.num_warmup_steps", minimum=0, integer=True),
}


def check_settings(cfg: DictConfig) -> None:
    """Refuse every out-of-range or contradictory setting in one line, before any real work."""
    for key, check in RULES.items():
        value = OmegaConf.select(cfg, key, default=_MISSING)
        if value is not _MISSING:
            check(value, cfg)
    if cfg.get("data") is not None:
        keyed("data", lambda: check_data_args(**_plain(cfg.data)))
        if cfg.data.get("path") is not None:
            check_data_path(str(cfg.data.path))  # a missing file: before the tokenizer is built
    model = cfg.get("model")
    if model is not None:
        keyed("model", lambda: check_model_args(**OmegaConf.to_container(model, resolve=True)))
        if model.get("lora"):
            keyed("model.lora", lambda: check_lora(**lora_args(OmegaConf.to_container(model.lora))))
    if cfg.get("preemption") is not None:
        check_preemption(_plain(cfg.preemption.signals), _plain(cfg.preemption.requeue_on))
    if OmegaConf.select(cfg, "data.streaming") is True:
        _check_streaming(cfg)
    _check_optim(cfg)
    _check_stage_parts(cfg)


def _check_streaming(cfg: DictConfig) -> None:
    """What a stream cannot do, refused before the tokenizer and model: it has no length."""
    steps = OmegaConf.select(cfg, "trainer.max_steps")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        allowed, why = "an integer ≥ 1 with data.streaming=true", "a stream has no epoch length"
        raise SettingError("trainer.max_steps", steps, allowed, why)


def _check_optim(cfg: DictConfig) -> None:
    """Build the optimizer and scheduler on a dummy parameter: their own argument checks."""
    optim = cfg.get("optim")
    if optim is None or optim.get("optimizer") is None:
        return
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = _third_party("optim.optimizer", lambda: instantiate(optim.optimizer)([param]))
    if optim.get("scheduler") is not None:
        _third_party(
            "optim.scheduler",
            lambda: instantiate(optim.scheduler)(optimizer=optimizer, num_training_steps=10),
        )


def _check_stage_parts(cfg: DictConfig) -> None:
    """The loss and reference strategy the stage reads (built here once, cheaply, for their
    constructor checks), their pairing, and what the strategy needs of the policy."""
    module = OmegaConf.select(cfg, "stage.module") or {}
    if "loss" not in module or cfg.get("loss") is None:
        return
    loss = build(cfg, "loss")
    if "reference" not in module:
        return
    strategy = build(cfg, "reference") if cfg.get("reference") is not None else CopyReference()
    strategy = strategy.for_loss(loss)
    strategy.check_policy((cfg.get("model") or {}).get("lora"))
    if OmegaConf.select(cfg, "data.streaming") is True and not strategy.live:
        raise ConfigError(
            f"reference={type(strategy).__name__} reads the whole data set before training: not with "
            "data.streaming=true (a stream is read once, as it trains); use reference=copy"
        )


# -- building with full keys ---------------------------------------------------------------------------
def build(cfg: DictConfig, key: str, **kwargs: Any) -> Any:
    """``instantiate(cfg.<key>, **kwargs)``, a constructor's :class:`SettingError` re-keyed to the
    full config key and unwrapped from Hydra's ``InstantiationException``."""
    node = OmegaConf.select(cfg, key)
    try:
        return instantiate(node, **kwargs)
    except Exception as err:
        setting = _cause(err, SettingError)
        if setting is not None:
            raise setting.at(full_key(node, key, setting)) from err
        unknown = _unknown_argument(_cause(err, TypeError))
        if unknown is not None and unknown in node:  # +<key>.<name>=... that the class does not take
            known = ", ".join(sorted(str(k) for k in node if not str(k).startswith("_") and k != unknown))
            message = f"{key}.{unknown}: not a setting of {key}; remove it (its settings: {known})"
            raise ConfigError(message) from err
        raise


def _unknown_argument(err: TypeError | None) -> str | None:
    """The keyword a constructor refused (``... got an unexpected keyword argument 'x'``), or None."""
    found = re.search(r"unexpected keyword argument '(\w+)'", str(err)) if err is not None else None
    return found.group(1) if found else None


def keyed(prefix: str, fn: Callable[[], Any]) -> Any:
    """``fn()``, a :class:`SettingError` it raises re-keyed under ``prefix``."""
    try:
        return fn()
    except SettingError as err:
        raise err.at(f"{prefix}.{err.key}") from err
    except TypeError as err:  # an argument check given a key its function does not take
        unknown = _unknown_argument(err)
        if unknown is None:
            raise
        raise ConfigError(f"{prefix}.{unknown}: not a setting of {prefix}; remove it") from err


def build_trainer(cfg: DictConfig, **kwargs: Any) -> Any:
    """The Lightning ``Trainer``; what Lightning refuses in ``trainer.*`` (precision, strategy,
    devices, a missing optional package) becomes one line naming the group."""
    return _third_party("trainer", lambda: build(cfg, "trainer", **kwargs))


def _third_party(key: str, fn: Callable[[], Any]) -> Any:
    """``fn()`` building a third-party object from ``key``'s settings only: whatever it refuses
    (ValueError, TypeError, Lightning's MisconfigurationException, a missing package) is about
    those settings, so it becomes a :class:`ConfigError` naming ``key``."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        return fn()
    except UserError:
        raise
    except Exception as err:
        cause = _cause(err, (ValueError, TypeError, MisconfigurationException, ImportError))
        if cause is None:
            raise
        words = " ".join(str(cause).split())
        raise ConfigError(f"{key}: {words[:400]} (check the {key}.* settings)") from err


def _cause(err: BaseException | None, kind: type | tuple[type, ...]) -> Any:
    """The first exception of type ``kind`` in ``err``'s cause chain (``err`` itself included)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, kind):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def full_key(node: Any, prefix: str, err: SettingError) -> str:
    """Where in ``node`` (config key ``prefix``) the rejected value sits: the leaf whose path ends
    with the error's key (``components.0.weight``) or is named like it, holding that value."""
    if err.key == prefix or err.key.startswith(f"{prefix}."):
        return err.key
    leaves = list(_leaves(_plain(node), prefix))
    for match in (
        lambda path: path.endswith(f".{err.key}"),
        lambda path: path.rpartition(".")[2] == err.name,
    ):
        hits = [path for path, value in leaves if match(path) and _same(value, err.value)]
        if hits:
            return hits[0]
    return f"{prefix}.{err.key}"


def _plain(node: Any) -> Any:
    if not OmegaConf.is_config(node):
        return node
    try:
        return OmegaConf.to_container(node, resolve=True)
    except Exception:  # an interpolation that only resolves inside a run: use the raw values
        return OmegaConf.to_container(node, resolve=False)


def _leaves(value: Any, path: str):
    if not isinstance(value, (dict, list)):
        yield path, value
        return
    for k, v in value.items() if isinstance(value, dict) else enumerate(value):
        yield from _leaves(v, f"{path}.{k}")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b
