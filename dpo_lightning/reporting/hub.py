"""``export.push_to_hub=true export.repo_id=<org/name>``: upload ``hf_model/`` with ``huggingface_hub``.

Runs after the local export, ``summary.json`` and the model card are written, so a failed push
loses nothing: it fails in one line (no traceback, exit 2) naming the folder to upload later.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dpo_lightning.run.errors import UserError


class PushError(UserError):
    """The upload failed; the local export is complete."""


def _network_errors() -> tuple[type[BaseException], ...]:
    """huggingface_hub's own errors are OSError / ValueError subclasses (offline mode, HTTP status,
    missing token, invalid repo id); the transport errors of its HTTP client are not, and the
    client changed across versions (requests, httpx, httpx2): take whichever are installed."""
    errors: list[type[BaseException]] = [OSError, ValueError]
    for module in ("httpx2", "httpx", "requests"):
        try:
            lib = __import__(module)
        except ImportError:
            continue
        errors.append(getattr(lib, "HTTPError", None) or lib.RequestException)
    return tuple(errors)


def push_export(
    export_dir: Path,
    repo_id: str,
    private: bool = True,
    revision: str | None = None,
    commit_message: str = "dpo_lightning export",
) -> str:
    """Create ``repo_id`` if needed (``private``) and upload ``export_dir``; returns the commit URL.

    Raises:
        PushError: one line with the reason and the command that uploads the folder later.
    """
    from huggingface_hub import HfApi, constants

    from dpo_lightning.run.preflight import hub_reachable

    api = HfApi()
    try:
        if not constants.HF_HUB_OFFLINE and not hub_reachable(constants.ENDPOINT):
            # One ~3 s probe instead of the client's retry loop on a machine with no network.
            raise ConnectionError(f"{constants.ENDPOINT} cannot be reached")
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(export_dir),
            revision=revision,
            commit_message=commit_message,
            repo_type="model",
        )
    except _network_errors() as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise PushError(
            f"export.push_to_hub: could not push {export_dir} to {repo_id!r} ({type(err).__name__}: "
            f"{reason}); the local export is complete: upload it later with "
            f"`hf upload {repo_id} {export_dir}`"
        ) from None
    return str(getattr(info, "commit_url", info))


def push_if_asked(export: Any, export_dir: Path) -> str | None:
    """``push_export`` when ``export.push_to_hub`` is set (``export``: the config's node)."""
    if not export or not export.get("push_to_hub"):
        return None
    url = push_export(export_dir, export.repo_id, export.get("private", True), export.get("revision"))
    print(f"[dpo_lightning] pushed {export_dir} to {url}")
    return url
