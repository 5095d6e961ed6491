"""Every option of every config group, every setting in it: bad values are refused in one line
naming the key, before any model work; the shipped values pass (issue 12 §2).

For each option, the composed config must pass what ``train.py`` runs before the model is built
(:func:`check_settings`, the engine and DataModule constructors, the Trainer for ``trainer.*``).
Then every leaf is looked up by its key's last parts in :data:`BAD` (values it must refuse) or
:data:`UNCHECKED` (why it has no check here): a setting added to a yaml file without either
fails :func:`test_every_setting_is_checked_or_says_why`, so the class of bug "a value nobody
checks trains nonsense or crashes after the model loaded" cannot come back unnoticed.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf, open_dict

from dpo_lightning.run.errors import UserError, one_line
from dpo_lightning.run.settings import build, build_trainer, check_settings
from tests.conftest import CONF_DIR, compose

NAN, INF = math.nan, math.inf
# Options that need hardware absent here: their baseline is refused for that alone; the walk
# adds the override that removes the need (the settings are the same ones).
CPU = ["trainer.accelerator=cpu", "trainer.devices=2"]
HARDWARE = {
    "trainer=gpu": ["trainer.accelerator=cpu"],
    "trainer=ddp": CPU,
    "trainer=fsdp": [*CPU, "+trainer.strategy.process_group_backend=gloo"],
    "trainer=tp_fsdp": [*CPU, "+trainer.strategy.process_group_backend=gloo"],
    "trainer=deepspeed_zero2": CPU,
    "trainer=deepspeed_zero3": CPU,
    "experiment=qlora": ["model.quantization=null"],
}
NO_TRAINER_BUILD = {"trainer=deepspeed_zero2", "trainer=deepspeed_zero3"}  # deepspeed is not installed
# What an option needs to compose at all.
NEEDS = {
    "data=file": ["data.path={pairs}"],
    "data=text": ["data.path={pairs}"],
    "model=hf": ["model.name_or_path=org/model"],
    "reference=adapter": ["model.lora={{r: 8, alpha: 16}}"],  # the adapter reference needs LoRA
    "reference=none": ["loss=simpo"],  # no reference: a reference-free loss
    "reference=model": ["reference.name_or_path=org/sft-model"],  # its checkpoint
    "data=prompts": ["data.path={pairs}"],
    "loss=kto": ["data.unpair=true"],  # unpaired losses train on labelled rows
    "loss=bco": ["data.unpair=true"],
}

#: key suffix -> values that must be refused.
BAD: dict[str, list[Any]] = {
    "loss.beta": [0, -0.5, NAN, INF, "abc"],
    "label_smoothing": [-0.1, 1.0],
    "loss.tau": [0, -1],
    "loss.alpha": [-1],
    "loss.gamma": [-1],
    "weight": [-1, NAN],
    "reference.alpha": [0, 1.5],
    "reference.sync_steps": [0],
    "data.batch_size": [0, -1, 2.5, "abc"],
    "data.eval_batch_size": [0, -2],
    "data.val_fraction": [0, 1, -0.1],
    "data.max_length": [1, 0, -5],
    "data.max_prompt_length": [0, "max_length"],
    "data.truncation_mode": ["keep_middle"],
    "data.on_invalid": ["skp"],
    "data.padding_side": ["lefty"],
    "data.pad_to_multiple_of": [0],
    "data.num_workers": [-1],
    "data.group_mega_batch_mult": [0],
    "data.num_proc": [0],
    "data.format": ["standrd"],  # a format name (string-valued presets only)
    "data.cross_split_duplicates": ["keep_in_trian"],
    "loss.divergence": ["kl"],
    "loss.desirable_weight": [0, -1],
    "loss.undesirable_weight": [0, NAN],
    "reference.dtype": ["float33"],
    "reference.device": ["gpu0"],
    "format.mode": ["best_vs_randm"],
    "model.dtype": ["float33"],
    "lora.r": [0],
    "lora.alpha": [0],
    "lora.dropout": [1.0, -0.1],
    "lora.bias": ["some"],
    "optimizer.lr": [-1e-3, NAN],
    "optimizer.weight_decay": [-0.1],
    "optimizer.betas.0": [1.5],
    "scheduler.name": ["cosin"],
    "scheduler.num_warmup_steps": [-1],
    "engine.chunk_size": [0],
    "engine.compile": ["yes"],
    "engine.prefix_sharing": ["maybe"],
    "engine.attn_implementation": ["flash"],
    "trainer.max_steps": [0, -2, -1],  # -1 only with trainer.max_epochs ≥ 1
    "trainer.max_epochs": [0],
    "trainer.devices": [0],
    "trainer.num_nodes": [0],
    "trainer.accumulate_grad_batches": [0],
    "trainer.gradient_clip_val": [-1],
    "trainer.val_check_interval": [0, 1.5],
    "trainer.limit_val_batches": [-1, 1.5],
    "trainer.log_every_n_steps": [0],
    "trainer.precision": ["17"],
    "data.streaming": ["yes"],
    "data.streaming_val_rows": [0, 2.5],
    "preemption.signals": [["SIGFOO"], ["SIGUSR1"]],  # the second: requeue_on lists signals not in it
    "preemption.requeue_on": [["SIGBAR"], ["SIGINT"]],
}

BOOL = "a bool (Hydra reads true/false)"
COLUMN = "a column name or template: a missing column is a counted row fault (test_data_formats)"
#: key suffix -> why no bad value is tried here.
UNCHECKED: dict[str, str] = {
    "_target_": "Hydra's target: a typo fails composition/instantiation naming it",
    "_partial_": "Hydra instantiation flag",
    "_convert_": "Hydra instantiation flag",
    "name_or_path": "preflight: a missing folder / unreachable hub id (test_errors.py)",
    "model.tokenizer": "loading it fails in one line (test_user_errors)",
    "model.config": "model=tiny's architecture: transformers checks it when the model is built",
    "model.config_tokenizer": "a tokenizer node for a model built from model.config (any BPE size)",
    "model.lora": "null, or the adapter's settings (walked with experiment=lora)",
    "data.generator": "null, or the built-in generator (its n / seed below)",
    "model.trust_remote_code": BOOL,
    "model.attn_implementation": "transformers checks it at load (hub kernel ids are valid too)",
    "model.gguf_file": "preflight: must be a file in model.name_or_path (test_errors.py)",
    "model.disable_dropout": BOOL,
    "lora.target_modules": "module names: peft refuses unknown ones when it wraps the model",
    "lora.use_rslora": BOOL,
    "lora.modules_to_save": "module names: peft refuses unknown ones when it wraps the model",
    "lora.merge_on_export": BOOL,
    "model.quantization": "BitsAndBytesConfig's own checks (CUDA only; refused here without one)",
    "data.path": "check_data_path: missing / empty / unsupported files (test_user_errors)",
    "generator.n": "rows generated: 0 or 1 row is refused when the data is read (test_user_errors)",
    "seed": "any seed Python's random takes (the top-level seed: test_top_level_settings)",
    "data.name": "a hub configuration name: the hub refuses unknown ones in one line",
    "data.train_split": "a missing split is refused naming the splits there are (test_user_errors)",
    "data.val_split": "absent: carved from train (data.val_fraction)",
    "data.columns": COLUMN,
    "format.columns": COLUMN,
    "format.marker": COLUMN,
    "format.prompt_template": COLUMN,
    "format.text_key": COLUMN,
    "format.score_key": COLUMN,
    "format.choice_column": COLUMN,
    "format.completion_columns": COLUMN,
    "format.score_columns": COLUMN,
    "format.chat": BOOL,
    "data.system_prompt": "any text",
    "data.group_by_length": BOOL,
    "data.cache_dir": "any folder (created on use)",
    "data.seed": "an interpolation of seed",
    "reference.cache_dir": "any folder (created on use)",
    "scheduler.num_training_steps": "passed by the stage",
    "optimizer.betas.1": "as betas.0 (torch checks both when the optimizer is built here)",
    "optimizer.eps": "torch checks it when the optimizer is built here",
    "trainer.accelerator": "a missing device is refused (test_user_errors); names by Lightning",
    "trainer.strategy": "a name or a _target_ node: Lightning refuses unknown ones at build",
    "strategy.param_dtype": "FSDP2 mixed-precision dtype name (GPU trainer presets)",
    "strategy.reduce_dtype": "FSDP2 mixed-precision dtype name (GPU trainer presets)",
    "strategy.reshard_after_forward": BOOL,
    "strategy.activation_checkpointing": BOOL,
    "strategy.save_distributed_checkpoint": BOOL,
    "strategy.process_group_backend": "torch.distributed backend name (gloo on CPU)",
    "strategy.stage": "DeepSpeed's ZeRO stage: deepspeed checks it (CUDA only)",
    "strategy.offload_optimizer": BOOL,
    "strategy.offload_parameters": BOOL,
    "strategy.allgather_bucket_size": "DeepSpeed tuning: deepspeed checks it (CUDA only)",
    "strategy.reduce_bucket_size": "DeepSpeed tuning: deepspeed checks it (CUDA only)",
    "trainer.check_val_every_n_epoch": "null or an epoch count: Lightning checks it at build",
    "trainer.num_sanity_val_steps": "Lightning checks it at build",
    "trainer.enable_model_summary": BOOL,
    "trainer.deterministic": BOOL,
    "trainer.default_root_dir": "the run dir (paths.output_dir)",
    "stage.module": "the stage's own arguments: its constructor checks them when the model is built",
    "data.unpair": BOOL,
    "format.tool_call_tags": "the tag pair around a JSON tool call: a malformed call is a counted row fault",
    "overwrite": BOOL + "; refused together with resume (test_run_safety)",
    "resume_on_changed_data": BOOL,
    "export.push_to_hub": BOOL,
    "export.repo_id": "check_export: a missing / invalid repo id when pushing (test_model_card)",
    "export.private": BOOL,
    "export.revision": "a branch name: the hub refuses an invalid one at the push (one line)",
    "reference.tokenizer": "loading it fails in one line; compared with the policy's (test_reference_model)",
    "reference.attn_implementation": "transformers checks it when the reference loads",
    "reference.trust_remote_code": BOOL,
    "reference.gguf_file": "must be a file in reference.name_or_path: loading refuses it in one line",
    "reference.offload": BOOL + "; refused without FSDP2 or with reference.device=cpu (test_reference_model)",
}


def _options() -> list[str]:
    groups = ["model", "data", "loss", "reference", "optim", "engine", "trainer", "stage", "experiment"]
    return [f"{g}={p.stem}" for g in groups for p in sorted((CONF_DIR / g).glob("*.yaml"))]


def _match(table: dict[str, Any], key: str, subtree: bool = False) -> str | None:
    """The longest entry of ``table`` that ``key`` ends with (on a dot boundary); with
    ``subtree``, also one that ``key`` lies under (``model.config`` for ``model.config.x``)."""
    hits = [
        k
        for k in table
        if key == k or key.endswith(f".{k}") or (subtree and (key.startswith(f"{k}.") or f".{k}." in key))
    ]
    return max(hits, key=len) if hits else None


def _leaves(option: str, cfg) -> list[str]:
    """The keys this option sets (its group's subtree; an experiment: the top level), without
    Hydra's node and interpolations (the key they point to is walked instead)."""
    group = option.split("=")[0]
    root = OmegaConf.to_container(cfg, resolve=False)
    root.pop("hydra", None)
    start = root if group == "experiment" else {group: root.get(group)}
    skip = {"callbacks", "logger", "paths", "optimized_metric", "ckpt_path", "resume", "train"}
    out: list[str] = []

    def walk(value: Any, path: str) -> None:
        if isinstance(value, dict) and value and path not in ("data.columns", "format.columns"):
            for k, v in value.items():
                if not path and k in skip:
                    continue
                walk(v, f"{path}.{k}" if path else str(k))
        elif isinstance(value, list) and value and not any(isinstance(v, str) for v in value):
            for i, v in enumerate(value):
                walk(v, f"{path}.{i}")
        elif not (isinstance(value, str) and value.startswith("${")):
            out.append(path)

    walk(start, "")
    return out


def _compose(option: str, tmp_path: Path, extra: list[str] = ()):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n' * 4)
    needs = [n.format(pairs=pairs) for n in NEEDS.get(option, [])]
    cfg = compose([option, *needs, *extra], tmp_path)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    return cfg


def _refusal(cfg, tokenizer, trainer: bool) -> str | None:
    """The one line of what the pre-model checks refuse in ``cfg``, or None."""
    try:
        check_settings(cfg)
        engine = build(cfg, "engine")
        build(cfg, "data", tokenizer=tokenizer, layout=engine)
        if trainer:
            build_trainer(cfg, callbacks=[], logger=False, enable_progress_bar=False)
    except UserError as err:
        return one_line(err)
    return None


@pytest.mark.parametrize("option", _options())
def test_shipped_values_pass_and_bad_values_are_refused(option, tokenizer, tmp_path):
    cfg = _compose(option, tmp_path)
    build_trainer_too = option not in NO_TRAINER_BUILD
    if option in HARDWARE and not torch.cuda.is_available():
        line = _refusal(cfg, tokenizer, build_trainer_too)
        assert line is not None and any(w in line for w in ("accelerator", "quantization")), line
        cfg = _compose(option, tmp_path, HARDWARE[option])
    assert _refusal(cfg, tokenizer, build_trainer_too) is None
    tried = 0
    for key in _leaves(option, cfg):
        entry = _match(BAD, key)
        for bad in BAD.get(entry, []) if entry else []:
            value = OmegaConf.select(cfg, "data.max_length") if bad == "max_length" else bad
            current = OmegaConf.select(cfg, key)
            if entry == "data.format" and not isinstance(current, str):
                continue  # a format node: its own keys are walked
            if entry == "trainer.precision" and not build_trainer_too:
                continue  # Lightning checks it when it builds the strategy (deepspeed: not here)
            mutated = copy.deepcopy(cfg)
            OmegaConf.update(mutated, key, value, merge=False)
            line = _refusal(mutated, tokenizer, key.startswith("trainer.") and build_trainer_too)
            assert line is not None, f"{option}: {key}={value!r} was accepted"
            assert "\n" not in line
            named = key in line or (key.split(".")[0] in line and str(value) in line)
            assert named, f"{option}: {key}={value!r}: the line does not name the key: {line}"
            tried += 1
    assert tried or option.startswith(("stage=", "reference=", "engine=padded", "loss=sft")), option


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("seed=abc", "seed"),
        ("seed=-1", "seed"),
        ("seed=1.5", "seed"),
        ("train.on_nonfinite=stp", "on_nonfinite"),
    ],
)
def test_top_level_settings(override, key, tmp_path):
    from dpo_lightning.train import build_callbacks

    cfg = _compose(override, tmp_path)
    with pytest.raises(UserError, match=key):
        check_settings(cfg)
        build_callbacks(cfg, has_loggers=False)


@pytest.mark.parametrize("option", _options())
def test_every_setting_is_checked_or_says_why(option, tmp_path):
    cfg = _compose(option, tmp_path)
    unknown = [k for k in _leaves(option, cfg) if not _match(BAD, k) and not _match(UNCHECKED, k, True)]
    assert not unknown, f"{option}: give these settings a check (BAD) or a reason (UNCHECKED): {unknown}"
