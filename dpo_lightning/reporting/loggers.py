"""Logger factories that add behaviour Lightning's loggers leave to the user."""

from __future__ import annotations

import os
from typing import Any

from lightning.pytorch.loggers import WandbLogger


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
