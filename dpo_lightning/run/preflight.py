"""Checks that run before any tokenizing or model work, each failing with one clear line.

:func:`preflight` checks, in order: every setting (:func:`~dpo_lightning.run.settings.check_settings`:
ranges, choices, pairings, the devices asked for); the output directory is writable; ``model.name_or_path``
is a readable local model folder, or a hub id that can be reached (or is cached when
``HF_HUB_OFFLINE=1``) — probed in ~3 s instead of the hub client's retry loop; ``data.max_length``
fits the model's context; the checkpoint to resume from exists, is ours and matches the config.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from omegaconf import DictConfig

from dpo_lightning.run.errors import UserError
from dpo_lightning.run.resume import check_checkpoint, resolve_ckpt_path
from dpo_lightning.run.settings import check_settings

# config.json keys that hold a model's context length, by model family.
CONTEXT_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_sequence_length",
    "seq_length",
    "n_ctx",
)
PROBE_TIMEOUT_S = 3.0


def preflight(cfg: DictConfig) -> dict[str, Any] | None:
    """Run every check; returns the metadata of the checkpoint to resume from (or None)."""
    check_settings(cfg)
    check_output_dir(Path(cfg.paths.output_dir))
    model_config = check_model_source(cfg.model)
    check_context_length(cfg, model_config)
    ckpt_path = resolve_ckpt_path(cfg)
    return None if ckpt_path is None else {**check_checkpoint(ckpt_path, cfg), "path": ckpt_path}


def check_output_dir(run_dir: Path) -> None:
    probe = run_dir / f".write-test-{uuid.uuid4().hex}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise UserError(
            f"output directory {run_dir} is not writable ({err.strerror or err}): "
            "choose another with hydra.run.dir=<dir> (or hydra.sweep.dir for --multirun)"
        ) from err


def _is_local_path(name: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else is meant as a path.
    return Path(name).expanduser().exists() or name.startswith(("/", ".", "~")) or name.count("/") > 1


def check_model_source(model_cfg: DictConfig) -> dict[str, Any] | None:
    """Fail fast on a missing/unreadable folder or an unreachable hub id; returns config.json."""
    name = model_cfg.get("name_or_path")
    if name is None:
        if model_cfg.get("config") is None:
            raise UserError("set model.name_or_path (hub id or local folder) or model.config")
        return dict(model_cfg.config)
    name = str(name)
    if _is_local_path(name):
        return _local_model_config(Path(name).expanduser(), model_cfg.get("gguf_file"))
    return _hub_model_config(name)


def _local_model_config(folder: Path, gguf_file: str | None) -> dict[str, Any] | None:
    key = f"model.name_or_path={str(folder)!r}"
    if not folder.exists():
        raise UserError(f"{key} does not exist: give a save_pretrained folder or a hub id (org/name)")
    if not folder.is_dir():
        raise UserError(f"{key} is a file, not a model folder: give the folder that holds config.json")
    if gguf_file:
        if not (folder / gguf_file).is_file():
            raise UserError(f"model.gguf_file={gguf_file!r} is not in {folder}")
        return None
    config = folder / "config.json"
    if not config.is_file():
        raise UserError(f"{key} is not a model folder (no config.json): give a save_pretrained folder")
    try:
        model_config = json.loads(config.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{key}: cannot read {config} ({getattr(err, 'strerror', None) or err})") from err
    if not any(folder.glob("*.safetensors")):
        raise UserError(
            f"{key} has no .safetensors weights: only safetensors are loaded (pickled .bin files "
            "can run code); re-save it with save_pretrained(..., safe_serialization=True)"
        )
    return model_config


def _hub_model_config(repo_id: str) -> dict[str, Any] | None:
    from huggingface_hub import constants, try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "config.json")
    cached = cached if isinstance(cached, str) else None
    if constants.HF_HUB_OFFLINE:
        if cached is None:
            raise UserError(
                f"model.name_or_path={repo_id!r} is a hub id, the hub is offline "
                "(HF_HUB_OFFLINE=1) and it is not in the local cache: set model.name_or_path to "
                "a local folder, or go online (unset HF_HUB_OFFLINE) to download it"
            )
    elif not hub_reachable(constants.ENDPOINT):
        hint = (
            "set HF_HUB_OFFLINE=1 to use the cached copy"
            if cached
            else "set model.name_or_path to a local folder"
        )
        raise UserError(
            f"model.name_or_path={repo_id!r} is a hub id but {constants.ENDPOINT} cannot be "
            f"reached: {hint}, or go online"
        )
    return json.loads(Path(cached).read_text()) if cached else None


def hub_reachable(endpoint: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """One TCP connect to the hub (honours ``HTTPS_PROXY``), instead of retrying for ~50 s."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urlparse(proxy or endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def model_context_length(config: dict[str, Any] | None) -> int | None:
    if not config:
        return None
    for key in CONTEXT_KEYS:
        if isinstance(config.get(key), int):
            return config[key]
    return model_context_length(config.get("text_config"))


def check_context_length(cfg: DictConfig, model_config: dict[str, Any] | None) -> None:
    context = model_context_length(model_config)
    max_length = cfg.data.get("max_length")
    if context is not None and max_length is not None and max_length > context:
        raise UserError(
            f"data.max_length={max_length} is longer than the model's context ({context} "
            f"positions): set data.max_length<={context}"
        )
