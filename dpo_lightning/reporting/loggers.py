"""Logger factories that add behaviour Lightning's loggers leave to the user.

W&B online is checked in seconds when the logger is built (before any model work), instead of
``wandb.init`` retrying for minutes on the first logged value: an API key the server rejects is a
one-line error; a server that cannot be reached (or does not answer) makes the run log offline,
with a warning that says how to upload it later.
"""

from __future__ import annotations

import base64
import json
import netrc
import os
import socket
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger

from dpo_lightning.run.errors import UserError

PROBE_TIMEOUT_S = 3.0  # TCP connect to the W&B server
VERIFY_TIMEOUT_S = 8.0  # the one authenticated request (≤ 11 s in all, under the 15 s promised)
DEFAULT_BASE_URL = "https://api.wandb.ai"


def wandb_base_url() -> str:
    """``WANDB_BASE_URL``, else the W&B client's configured server."""
    if os.environ.get("WANDB_BASE_URL"):
        return os.environ["WANDB_BASE_URL"].rstrip("/")
    try:
        import wandb

        return str(wandb.Settings().base_url).rstrip("/")
    except Exception:  # an old or broken client: the public default
        return DEFAULT_BASE_URL


def wandb_api_key(base_url: str) -> str | None:
    """``WANDB_API_KEY``, else the key ``wandb login`` wrote to ``~/.netrc`` for that server."""
    if os.environ.get("WANDB_API_KEY"):
        return os.environ["WANDB_API_KEY"]
    try:
        auth = netrc.netrc().authenticators(urlparse(base_url).hostname or "")
    except (OSError, netrc.NetrcParseError):
        return None
    return auth[2] if auth else None


def verify_wandb(base_url: str, api_key: str) -> str | None:
    """Ask the server who owns ``api_key``, within :data:`PROBE_TIMEOUT_S` +
    :data:`VERIFY_TIMEOUT_S`. Returns None when it answers, or why it could not be asked.

    Raises:
        UserError: the server rejected the key (HTTP 401 / 403).
    """
    url = urlparse(base_url)
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    probe = urlparse(proxy) if proxy else url
    port = probe.port or (443 if probe.scheme == "https" else 80)
    try:
        socket.create_connection((probe.hostname, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as err:
        return f"{base_url} cannot be reached ({err.strerror or err})"
    token = base64.b64encode(f"api:{api_key}".encode()).decode()
    request = urllib.request.Request(
        f"{base_url}/graphql",
        data=json.dumps({"query": "query { viewer { id } }"}).encode(),
        headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=VERIFY_TIMEOUT_S):
            return None
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            raise UserError(
                f"logger=wandb: {base_url} rejected the W&B API key (HTTP {err.code}; from "
                "WANDB_API_KEY or ~/.netrc): run `wandb login --relogin`, or log offline with "
                "logger.wandb.offline=true (WANDB_MODE=offline)"
            ) from None
        return f"{base_url} answered HTTP {err.code}"
    except (OSError, ValueError) as err:  # timeout, reset, TLS, a malformed URL
        return f"{base_url} did not answer ({getattr(err, 'reason', None) or err})"


def wandb_logger(offline: bool | None = None, **kwargs: Any) -> WandbLogger:
    """Lightning's ``WandbLogger``, offline when no API key is configured (instead of failing),
    and online only once the server has accepted the key (see the module docstring).

    ``offline=None`` decides from ``WANDB_MODE`` and the presence of a key; ``offline=false``
    without a key is an error. An offline run is written under ``save_dir/wandb`` and can be
    uploaded later with ``wandb sync <run dir>``.
    """
    where = f"{kwargs.get('save_dir', '.')}/wandb"
    mode_offline = os.environ.get("WANDB_MODE") in ("offline", "dryrun", "disabled")
    base_url = wandb_base_url()
    key = None if mode_offline else wandb_api_key(base_url)
    if offline is False and not mode_offline and key is None:
        raise UserError(
            "logger.wandb.offline=false but no W&B API key is configured: run `wandb login` (or "
            "set WANDB_API_KEY), or leave logger.wandb.offline=null to log offline"
        )
    if offline is None:
        offline = mode_offline or key is None
    if offline:
        print(
            "[dpo_lightning] W&B: no API key (or WANDB_MODE=offline): logging offline under "
            f"{where}; upload later with `wandb sync <that run dir>`"
        )
    elif (problem := verify_wandb(base_url, key)) is not None:
        print(
            f"[dpo_lightning] warning: W&B server {problem}: logging offline under {where} "
            "instead; upload later with `wandb sync <that run dir>`"
        )
        offline = True
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
