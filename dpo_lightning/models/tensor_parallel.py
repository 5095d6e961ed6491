"""Tensor parallelism for HF decoder blocks, and gradient norms across device meshes.

HF models declare a tensor-parallel plan in their config (``config.base_model_tp_plan``; Llama,
Qwen2, Mistral: ``q/k/v_proj`` and ``gate/up_proj`` column-wise, ``o_proj`` and ``down_proj``
row-wise — Megatron-LM's split, Shoeybi et al. 2019, https://arxiv.org/abs/1909.08053).
:func:`apply_tensor_parallel` applies that plan over the ``tensor_parallel`` mesh dimension with
torch's ``ColwiseParallel`` / ``RowwiseParallel``
(https://pytorch.org/docs/stable/distributed.tensor.parallel.html); FSDP2 then shards every
parameter over ``data_parallel`` (:func:`~dpo_lightning.models.parallel.parallelize`). Inside a
block the attention heads and MLP columns are split over the TP ranks (one all-reduce after
``o_proj`` and one after ``down_proj`` per block); embeddings, norms and the LM head stay whole
on each TP rank, so the logits and the loss are the same on every rank of a TP group.

Why not transformers' own ``tp_plan="auto"``: it shards while the weights load, on a device mesh
of its own made before Lightning's exists; here the plan is applied in ``configure_model`` on
Lightning's 2-D mesh, to the policy and any frozen reference alike.

A 2-D run holds DTensors on two meshes: the TP'd weights on (data_parallel, tensor_parallel)
and the rest on data_parallel alone. torch 2.13's ``get_total_norm`` / ``clip_grad_norm_`` stack
the per-tensor norms and fail there (``aten.stack.default``: "All operands ... must have the same
mesh"), so :func:`total_grad_norm` and :func:`clip_grad_norm` reduce per mesh, then combine.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from dpo_lightning.run.errors import UserError


def _styles() -> dict[str, Any]:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    # HF plan style -> torch ParallelStyle (the plain styles: local output, replicated input).
    return {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}


def tensor_parallel_plan(model: nn.Module) -> dict[str, str]:
    """The model's declared plan (``{"layers.*.self_attn.q_proj": "colwise", ...}``, relative to
    ``model.base_model``), checked: one clear line for an unsupported model or style."""
    if hasattr(model, "peft_config"):
        raise UserError("tensor parallelism needs a plain HF model: set model.lora=null (no LoRA adapter)")
    config = getattr(model, "config", None)
    plan = dict(getattr(config, "base_model_tp_plan", None) or {})
    if not plan:
        raise UserError(
            f"{type(model).__name__} declares no tensor-parallel plan (config.base_model_tp_plan): "
            "use trainer=fsdp (FSDP2 only) for this model"
        )
    unsupported = {k: v for k, v in plan.items() if v not in _styles()}
    if unsupported:
        raise UserError(
            f"{type(model).__name__}'s tensor-parallel plan uses styles not supported here: "
            f"{unsupported} (supported: {sorted(_styles())}); use trainer=fsdp for this model"
        )
    return plan


def check_divisible(model: nn.Module, size: int) -> None:
    """Heads and MLP width must split evenly over ``size`` TP ranks (one line naming the key)."""
    config = model.config
    for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value % size:
            raise UserError(
                f"model {key}={value} does not split over trainer.strategy.tensor_parallel_size={size}: "
                "choose a tensor-parallel size that divides it"
            )


def apply_tensor_parallel(model: nn.Module, tp_mesh: Any) -> int:
    """``parallelize_module`` every submodule the plan names; returns how many were split."""
    from torch.distributed.tensor.parallel import parallelize_module

    plan = tensor_parallel_plan(model)
    check_divisible(model, tp_mesh.size())
    styles = _styles()
    count = 0
    for name, module in model.base_model.named_modules():
        style = next((s for pattern, s in plan.items() if fnmatch.fnmatchcase(name, pattern)), None)
        if style is not None:
            parallelize_module(module, tp_mesh, styles[style]())
            count += 1
    if count == 0:
        raise UserError(f"{type(model).__name__}: its tensor-parallel plan {plan} matched no module")
    return count


# -- gradient norms over several meshes --------------------------------------------------------
def _by_mesh(tensors: Iterable[Tensor]) -> list[list[Tensor]]:
    groups: dict[Any, list[Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.device_mesh if isinstance(t, DTensor) else None, []).append(t)
    return list(groups.values())


def spans_meshes(tensors: Iterable[Tensor]) -> bool:
    """Whether the tensors live on more than one device mesh (plain tensors count as one)."""
    return len(_by_mesh(tensors)) > 1


def total_grad_norm(grads: Iterable[Tensor], norm_type: float = 2.0) -> Tensor:
    """``torch.nn.utils.get_total_norm`` of ``grads`` spread over any meshes: the norm of each
    mesh's norm (exact for every p-norm: ‖(‖g_A‖, ‖g_B‖)‖_p = ‖(g_A, g_B)‖_p); a plain tensor."""
    norms = []
    for group in _by_mesh(grads):
        norm = torch.nn.utils.get_total_norm(group, norm_type)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    if not norms:
        return torch.tensor(0.0)
    return torch.nn.utils.get_total_norm(norms, norm_type)


def clip_grad_norm(parameters: Iterable[nn.Parameter], max_norm: float, norm_type: float = 2.0) -> Tensor:
    """``clip_grad_norm_`` over parameters on any meshes; returns the total norm before clipping."""
    params = [p for p in parameters if p.grad is not None]
    total = total_grad_norm([p.grad for p in params], norm_type)
    for group in _by_mesh(params):
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total
