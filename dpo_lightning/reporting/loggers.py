"""Logger factories that add behaviour Lightning's loggers leave to the user."""

from __future__ import annotations

import os
from typing import Any

from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger

from dpo_lightning.run.errors import UserError


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import wandb

        return bool(wandb.api.api_key)
    except Exception:  # no netrc, no settings file: treat as no key
        return False


def wandb_logger(offline: bool | None = None, **kwargs: Any) -> WandbLogger:
    """Lightning's ``WandbLogger``, offline when no API key is configured (instead of failing).

    ``offline=None`` decides from ``WANDB_MODE`` and the presence of a key. An offline run is
    written under ``save_dir/wandb`` and can be uploaded later with ``wandb sync <run dir>``.
    """
    if offline is None:
        offline = os.environ.get("WANDB_MODE") in ("offline", "dryrun") or not _has_wandb_key()
    if offline:
        print(
            "[dpo_lightning] W&B: no API key (or WANDB_MODE=offline): logging offline under "
            f"{kwargs.get('save_dir', '.')}/wandb; upload later with `wandb sync <that run dir>`"
        )
    return WandbLogger(offline=offline, **kwargs)


def _require(module: str, logger: str) -> None:
    try:
        __import__(module)
    except ImportError:
        raise UserError(
            f"logger={logger} needs the {module} package: pip install 'dpo-lightning[loggers]'"
        ) from None


def tensorboard_logger(**kwargs: Any) -> TensorBoardLogger:
    """Lightning's ``TensorBoardLogger``; a one-line error (not Lightning's traceback) when the
    ``tensorboard`` package is missing."""
    _require("tensorboard", "tensorboard")
    return TensorBoardLogger(**kwargs)


def mlflow_logger(tracking_uri: str | None = None, **kwargs: Any) -> MLFlowLogger:
    """Lightning's ``MLFlowLogger``; by default (``conf/logger/mlflow.yaml``) a local file store in
    the run dir, so it works offline and without a server.

    MLflow 3 refuses file stores unless ``MLFLOW_ALLOW_FILE_STORE=true`` (the store is in
    maintenance mode, not removed): set here for ``file:`` URIs only, so a local store keeps
    working; a server or database URI is left to MLflow's defaults.
    """
    _require("mlflow", "mlflow")
    if tracking_uri is None or tracking_uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MLFlowLogger(tracking_uri=tracking_uri, **kwargs)
