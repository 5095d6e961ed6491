"""Building the policy: from a hub id / local folder, or from a config dict (offline, tests)."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel

from dpo_lightning.run.errors import ConfigError, check_choice

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


#: ``model.*`` keys read before loading (``train.build_policy``: the tokenizer and the adapter).
POLICY_KEYS = {"tokenizer", "config_tokenizer", "lora"}


def check_model_args(dtype: str = "float32", quantization: dict[str, Any] | None = None, **rest: Any) -> None:
    """What loading the model would refuse, checked before anything is loaded (``train.py``'s
    preflight; :func:`load_causal_lm` checks the dtype itself, quantization is left to
    bitsandbytes there). A key nothing reads is refused as ``TypeError`` (Python's own wording, which
    the preflight turns into one line naming it)."""
    known = set(inspect.signature(load_causal_lm).parameters) | POLICY_KEYS
    for key in rest:
        if key not in known:
            raise TypeError(f"check_model_args() got an unexpected keyword argument '{key}'")
    check_choice("dtype", dtype, DTYPES)
    if quantization and not torch.cuda.is_available():
        raise ConfigError(
            "model.quantization (QLoRA, experiment=qlora) loads bitsandbytes 4/8-bit weights, which "
            "need a CUDA GPU and none is visible: drop model.quantization (e.g. experiment=lora) or "
            "run on a GPU"
        )


def load_causal_lm(
    name_or_path: str | None = None,
    config: dict[str, Any] | None = None,
    vocab_size: int | None = None,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    attn_implementation: str | None = "sdpa",
    gguf_file: str | None = None,
    disable_dropout: bool = True,
    seed: int = 0,
    quantization: dict[str, Any] | None = None,
) -> PreTrainedModel:
    """A causal LM from ``name_or_path`` (hub id or local dir), or built from ``config``.

    Args:
        name_or_path: hub id or ``save_pretrained`` folder; ``None`` builds from ``config``.
        config: ``{model_type: ..., **kwargs}`` for ``AutoConfig.for_model`` (random init).
        vocab_size: the tokenizer's size, used when building from ``config``.
        dtype: parameter dtype name (``float32`` / ``bfloat16`` / ``float16``).
        trust_remote_code: run code shipped with the checkpoint (off unless asked for).
        attn_implementation: ``sdpa`` / ``eager`` / ``flash_attention_2`` / ``flex_attention``.
        gguf_file: a GGUF file inside ``name_or_path`` (transformers de-quantises it).
        disable_dropout: set every dropout probability to 0 (DPO compares log-probs of policy
            and reference; dropout noise in either biases the log-ratio).
        seed: initialisation seed when building from ``config``.
        quantization: ``BitsAndBytesConfig`` arguments (e.g. ``{load_in_4bit: true}``) to load the
            weights quantized — QLoRA with ``model.lora`` (needs CUDA and bitsandbytes).
    """
    torch_dtype = DTYPES[check_choice("dtype", dtype, DTYPES)]
    if name_or_path is None:
        if config is None:
            raise ValueError("set model.name_or_path (hub id or local folder) or model.config")
        kwargs = dict(config)
        model_type = kwargs.pop("model_type")
        if vocab_size is not None:
            kwargs["vocab_size"] = vocab_size
        hf_config = AutoConfig.for_model(model_type, **kwargs)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(
            hf_config, dtype=torch_dtype, attn_implementation=attn_implementation
        )
    else:
        extra = {"gguf_file": gguf_file} if gguf_file else {}
        if quantization:
            extra["quantization_config"] = bnb_config(quantization)
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path,
            dtype=torch_dtype,
            trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation,
            use_safetensors=None if gguf_file else True,
            **extra,
        )
    if disable_dropout:
        set_dropout(model, 0.0)
    return model


def bnb_config(quantization: dict[str, Any]) -> BitsAndBytesConfig:
    """``BitsAndBytesConfig`` from config values; dtype names (``bfloat16``) become dtypes."""
    kwargs = {k: DTYPES.get(v, v) if k.endswith("_dtype") else v for k, v in quantization.items()}
    return BitsAndBytesConfig(**kwargs)


def set_dropout(model: torch.nn.Module, p: float) -> None:
    """Set the probability of every ``nn.Dropout`` in ``model`` (and the matching config keys)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p
    cfg = getattr(model, "config", None)
    for key in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout"):
        if cfg is not None and isinstance(getattr(cfg, key, None), float):
            setattr(cfg, key, p)
