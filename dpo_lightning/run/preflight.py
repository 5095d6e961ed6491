"""Checks that run before any tokenizing or model work, each failing with one clear line.

:func:`preflight` checks, in order: every setting (:func:`~dpo_lightning.run.settings.check_settings`:
ranges, choices, pairings, the devices asked for); the output directory is writable; ``model.name_or_path``
is a readable local model folder, or a hub id that can be reached (or is cached when
``HF_HUB_OFFLINE=1``) — probed in ~3 s instead of the hub client's retry loop — and so is a
separate reference's ``reference.name_or_path``; ``data.max_length`` fits the model's (and that
reference's) context; ``export.push_to_hub`` has a valid ``export.repo_id``; no other run uses
the run directory and it holds no earlier run unless this one continues or overwrites it
(:mod:`dpo_lightning.run.rundir`); the checkpoint to resume from exists, is intact, is ours and
matches the config.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from omegaconf import DictConfig, OmegaConf

from dpo_lightning.run.errors import UserError
from dpo_lightning.run.resume import check_checkpoint, resolve_ckpt_path
from dpo_lightning.run.rundir import claim_run_dir
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
    reference = cfg.get("reference") or {}
    # A reference with a checkpoint of its own (reference=model). `in` on the config itself
    # treats a missing value (???) as absent, its keys() do not. First: the settings check
    # builds the reference strategy.
    own_checkpoint = "name_or_path" in reference.keys()  # noqa: SIM118
    if own_checkpoint and OmegaConf.is_missing(reference, "name_or_path"):
        raise UserError(
            "reference=model needs reference.name_or_path=<folder or hub id> (the reference checkpoint)"
        )
    check_settings(cfg)
    check_output_dir(Path(cfg.paths.output_dir))
    model_config = check_model_source(cfg.model)
    check_context_length(cfg, model_config)
    if own_checkpoint:
        check_context_length(cfg, check_model_source(reference, key="reference"), key="reference")
    check_export(cfg.get("export") or {})
    with claim_run_dir(cfg):  # the run dir's lock; an earlier run there needs resume=true or overwrite=true
        ckpt_path = resolve_ckpt_path(cfg)
        return None if ckpt_path is None else {**check_checkpoint(ckpt_path, cfg), "path": ckpt_path}


def check_export(export: Any) -> None:
    """``export.push_to_hub`` needs a valid ``export.repo_id`` (checked now, not after training)."""
    if not export.get("push_to_hub"):
        return
    repo_id = export.get("repo_id")
    if not repo_id:
        raise UserError("export.push_to_hub=true needs export.repo_id=<user or org>/<name>")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(str(repo_id))
    except HFValidationError as err:
        raise UserError(f"export.repo_id={repo_id!r} is not a hub repo id ({err})") from None


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


def check_model_source(model_cfg: DictConfig, key: str = "model") -> dict[str, Any] | None:
    """Fail fast on a missing/unreadable folder or an unreachable hub id; returns config.json.

    ``key``: the config group named in errors (``model``, or ``reference`` for reference=model).
    """
    name = model_cfg.get("name_or_path")
    if name is None:
        if model_cfg.get("config") is None:
            raise UserError(f"set {key}.name_or_path (hub id or local folder) or {key}.config")
        return dict(model_cfg.config)
    name = str(name)
    if _is_local_path(name):
        return _local_model_config(Path(name).expanduser(), model_cfg.get("gguf_file"), key)
    return _hub_model_config(name, key)


def _local_model_config(folder: Path, gguf_file: str | None, group: str = "model") -> dict[str, Any] | None:
    key = f"{group}.name_or_path={str(folder)!r}"
    if not folder.exists():
        raise UserError(f"{key} does not exist: give a save_pretrained folder or a hub id (org/name)")
    if not folder.is_dir():
        raise UserError(f"{key} is a file, not a model folder: give the folder that holds config.json")
    if gguf_file:
        if not (folder / gguf_file).is_file():
            raise UserError(f"{group}.gguf_file={gguf_file!r} is not in {folder}")
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


def _hub_model_config(repo_id: str, group: str = "model") -> dict[str, Any] | None:
    from huggingface_hub import constants, try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "config.json")
    cached = cached if isinstance(cached, str) else None
    if constants.HF_HUB_OFFLINE:
        if cached is None:
            raise UserError(
                f"{group}.name_or_path={repo_id!r} is a hub id, the hub is offline "
                f"(HF_HUB_OFFLINE=1) and it is not in the local cache: set {group}.name_or_path to "
                "a local folder, or go online (unset HF_HUB_OFFLINE) to download it"
            )
    elif not hub_reachable(constants.ENDPOINT):
        hint = (
            "set HF_HUB_OFFLINE=1 to use the cached copy"
            if cached
            else f"set {group}.name_or_path to a local folder"
        )
        raise UserError(
            f"{group}.name_or_path={repo_id!r} is a hub id but {constants.ENDPOINT} cannot be "
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


def check_context_length(cfg: DictConfig, model_config: dict[str, Any] | None, key: str = "model") -> None:
    context = model_context_length(model_config)
    max_length = cfg.data.get("max_length")
    if context is not None and max_length is not None and max_length > context:
        whose = "the model's" if key == "model" else f"the {key}'s"
        raise UserError(
            f"data.max_length={max_length} is longer than {whose} context ({context} "
            f"positions): set data.max_length<={context}"
        )
