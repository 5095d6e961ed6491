"""LoRA adapters via ``peft`` (``model.lora``), and exporting a LoRA policy.

    dpo-train experiment=lora                              # LoRA policy, reference = adapter off
    dpo-train reference=adapter model.lora='{r: 16, alpha: 32, merge_on_export: true}'

The base weights are frozen and only the adapter trains; with ``reference=adapter`` the reference
is the same model with the adapter disabled, so the base model is in memory once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from dpo_lightning.run.errors import check_choice, check_number

BIAS = ("none", "all", "lora_only")


def check_lora(r: int = 8, alpha: float = 16, dropout: float = 0.0, bias: str = "none", **_: Any) -> None:
    """The adapter's numbers in range (:class:`~dpo_lightning.run.errors.SettingError`), before
    peft or any model is loaded."""
    check_number("r", r, minimum=1, integer=True)
    check_number("alpha", alpha, above=0)
    check_number("dropout", dropout, minimum=0, below=1)
    check_choice("bias", bias, BIAS)


def lora_args(lora: dict[str, Any]) -> dict[str, Any]:
    """``model.lora`` without the export keys: the arguments of :func:`apply_lora`."""
    return {k: v for k, v in lora.items() if k not in EXPORT_KEYS}


def apply_lora(
    model: nn.Module,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.0,
    target_modules: str | list[str] = "all-linear",
    bias: str = "none",
    use_rslora: bool = False,
    modules_to_save: list[str] | None = None,
) -> nn.Module:
    """Wrap a causal LM in a LoRA ``PeftModel`` (Hu et al. 2021, https://arxiv.org/abs/2106.09685).

    Args:
        model: a HF causal LM.
        r: adapter rank.
        alpha: LoRA α (the update is scaled by α / r, or α / √r with ``use_rslora``).
        dropout: dropout on the adapter's input (0 keeps policy log-probs deterministic).
        target_modules: module names to adapt, or ``"all-linear"``.
        bias: ``none`` | ``all`` | ``lora_only``: which biases train.
        use_rslora: rank-stabilised scaling.
        modules_to_save: extra modules trained in full and saved with the adapter (e.g. a head).

    The adapter's B matrix starts at zero, so the wrapped model computes exactly ``model``.
    """
    check_lora(r, alpha, dropout, bias)
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:  # optional dependency
        raise ImportError("model.lora needs peft: pip install 'dpo-lightning[peft]'") from err
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules) if not isinstance(target_modules, str) else target_modules,
        bias=bias,
        use_rslora=use_rslora,
        modules_to_save=list(modules_to_save) if modules_to_save else None,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


#: ``model.lora`` keys about the export, not the adapter (read by ``train.py``'s export).
EXPORT_KEYS = ("merge_on_export",)


def build_lora(model: nn.Module, lora: dict[str, Any] | None) -> nn.Module:
    """``model`` wrapped by :func:`apply_lora` when ``model.lora`` is set, else ``model`` itself
    (``model.lora.merge_on_export`` is an export setting, see :func:`save_policy`)."""
    if not lora:
        return model
    lora = lora_args(lora)
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        # QLoRA: fp32 norms/head inputs and input grads through the frozen quantized base.
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return apply_lora(model, **lora)


def save_policy(
    policy: nn.Module, path: str | Path, merge_adapter: bool = False, state_dict: dict | None = None
) -> None:
    """``save_pretrained`` the policy: a full model, or for a LoRA policy the PEFT adapter
    (``adapter_config.json`` + weights), or with ``merge_adapter`` the base model with the adapter
    merged in (a plain HF model; this merges in place, so call it last). ``state_dict``: the full
    weights gathered from shards (FSDP2), or None to use the model's own."""
    if merge_adapter and hasattr(policy, "merge_and_unload"):
        policy = policy.merge_and_unload()
    policy.save_pretrained(path, safe_serialization=True, state_dict=state_dict)
