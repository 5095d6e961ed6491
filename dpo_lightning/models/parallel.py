"""FSDP2 for every stage: shard the trained model *and* any frozen one per decoder layer.

Lightning's :class:`~lightning.pytorch.strategies.ModelParallelStrategy` sets up the process
group and a device mesh, then calls ``LightningModule.configure_model``; there
:func:`apply_parallelism` (called once, by :class:`~dpo_lightning.stages.base.PolicyModule`, for
DPO, SFT and the reward model alike) calls ``torch.distributed.fsdp.fully_shard`` on every decoder
layer and then on the whole model, for the policy and every frozen model the stage holds alike
(https://pytorch.org/docs/stable/distributed.fsdp.fully_shard.html). The optimizer is built
afterwards from the policy's (now DTensor) parameters only, so a reference is never in it.

    dpo-train trainer=fsdp trainer.devices=8                 # bf16 params, fp32 gradient reduce
    dpo-train trainer=fsdp_cpu                               # 2 CPU processes (gloo), CI
    dpo-train trainer=fsdp_cpu stage=sft                     # any stage (sft, reward_model)
    dpo-train trainer=fsdp trainer.strategy.activation_checkpointing=true

Checkpoints are sharded (one file per rank, ``torch.distributed.checkpoint``) and hold the
reference too; the ``hf_model/`` export is re-assembled from the shards by
:func:`full_state_dict` (which also gathers DeepSpeed ZeRO-3 partitions).

The mesh is read by dimension name, so the 2-D mesh of ``trainer=tp_fsdp`` runs the same
stages: :func:`parallelize` applies the model's tensor-parallel plan over
``mesh["tensor_parallel"]`` (:mod:`dpo_lightning.models.tensor_parallel`) before ``fully_shard``
over ``mesh["data_parallel"]``, and :func:`data_parallel_group` is the group over which batches
differ (losses are normalised over it, see ``PolicyModule.reduce_loss``; the data sampler and
the run totals use it too): ranks of one tensor-parallel group hold the same batch and must not
be counted twice.

    dpo-train trainer=tp_fsdp trainer.devices=8 trainer.strategy.tensor_parallel_size=2   # 4 × 2
    dpo-train trainer=tp_fsdp_cpu                            # 2 CPU processes, TP=2 (gloo), CI
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DeepSpeedStrategy, ModelParallelStrategy
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from dpo_lightning.models.loading import DTYPES
from dpo_lightning.models.tensor_parallel import apply_tensor_parallel
from dpo_lightning.run.errors import UserError


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` for pure FSDP2 (data parallel over every rank) plus our knobs.

    Args:
        param_dtype: dtype of the unsharded parameters used in forward/backward (``bfloat16``);
            ``None`` keeps the stored dtype. The sharded master weights stay in their dtype.
        reduce_dtype: dtype of the gradient reduce-scatter (``float32`` keeps the sum exact-ish).
        reshard_after_forward: free the gathered parameters after forward (ZeRO-3-like memory);
            ``False`` keeps them until backward (ZeRO-2-like, faster, more memory).
        activation_checkpointing: recompute policy activations in backward (HF's non-reentrant
            gradient checkpointing), trading compute for memory.
        **kwargs: :class:`ModelParallelStrategy` arguments (``save_distributed_checkpoint``,
            ``process_group_backend``, ``timeout``, ``data_parallel_size``, ...).

    ``tensor_parallel_size`` defaults to 1 (pure FSDP2; the parent class defaults to tensor
    parallelism within a node) and ``data_parallel_size`` to the world size over it.
    """

    def __init__(
        self,
        param_dtype: str | None = "bfloat16",
        reduce_dtype: str | None = "float32",
        reshard_after_forward: bool = True,
        activation_checkpointing: bool = False,
        data_parallel_size: int | Literal["auto"] = "auto",
        tensor_parallel_size: int | Literal["auto"] = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=tensor_parallel_size,
            **kwargs,
        )
        self.param_dtype = param_dtype
        self.reduce_dtype = reduce_dtype
        self.reshard_after_forward = reshard_after_forward
        self.activation_checkpointing = activation_checkpointing

    def setup_environment(self) -> None:
        world = self.num_nodes * self.num_processes
        tp = self._tensor_parallel_size
        if isinstance(tp, int) and (tp < 1 or world % tp):
            raise UserError(
                f"trainer.strategy.tensor_parallel_size={tp} does not divide the {world} processes "
                "(trainer.devices × trainer.num_nodes)"
            )
        if self._data_parallel_size == "auto":
            self._data_parallel_size = world // tp if isinstance(tp, int) else self.num_nodes
        super().setup_environment()


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: HF names their classes in ``_no_split_modules``."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} declares no decoder-layer class (_no_split_modules); "
            "FSDP2 needs one to shard per layer"
        )
    return layers


def shard_model(model: nn.Module, mesh: Any, settings: dict[str, Any], offload: bool = False) -> None:
    """``fully_shard`` each decoder layer, then the root (embeddings, final norm, LM head).

    ``offload``: keep the shards in CPU memory (``CPUOffloadPolicy``; pinned when CUDA is there),
    copied to the accelerator layer by layer for each forward.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mp = MixedPrecisionPolicy(
        param_dtype=DTYPES.get(settings["param_dtype"]),
        reduce_dtype=DTYPES.get(settings["reduce_dtype"]),
    )
    placement = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if offload else OffloadPolicy()
    kwargs = {"mesh": mesh, "mp_policy": mp, "offload_policy": placement}
    for layer in decoder_layers(model):
        fully_shard(layer, reshard_after_forward=settings["reshard_after_forward"], **kwargs)
    # The root's parameters (embeddings, tied LM head) are needed right after the last layer's
    # forward, so it is not resharded after forward.
    fully_shard(model, reshard_after_forward=False, **kwargs)


def shard_settings(strategy: Any) -> dict[str, Any]:
    """The ``fully_shard`` knobs of an :class:`FSDP2Strategy` (defaults for a plain
    ``ModelParallelStrategy``)."""
    return {
        "param_dtype": getattr(strategy, "param_dtype", None),
        "reduce_dtype": getattr(strategy, "reduce_dtype", None),
        "reshard_after_forward": getattr(strategy, "reshard_after_forward", True),
    }


def parallelize(model: nn.Module, mesh: Any, settings: dict[str, Any], offload: bool = False) -> None:
    """Apply the strategy's parallelism to one model, by mesh dimension: the model's
    tensor-parallel plan over ``mesh["tensor_parallel"]`` when it has more than one rank, then
    FSDP2 over ``mesh["data_parallel"]`` (shards kept in CPU memory with ``offload``)."""
    if mesh["tensor_parallel"].size() > 1:
        apply_tensor_parallel(model, mesh["tensor_parallel"])
    shard_model(model, mesh["data_parallel"], settings, offload=offload)


def apply_parallelism(
    strategy: Any, policy: nn.Module, frozen: list[nn.Module], offloaded: list[nn.Module] | None = None
) -> bool:
    """``configure_model`` body: shard ``policy``, the ``frozen`` models and the ``offloaded``
    frozen models (shards kept in CPU memory) under a ``ModelParallelStrategy``; returns whether
    it sharded.

    A no-op under every other strategy (DDP, DeepSpeed, single device, ``None``) and when called
    again (Lightning calls ``configure_model`` for every ``fit``/``validate``).
    """
    if not isinstance(strategy, ModelParallelStrategy) or is_sharded(policy):
        return False
    if getattr(strategy, "activation_checkpointing", False):
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    settings = shard_settings(strategy)
    for model in (policy, *frozen):
        parallelize(model, strategy.device_mesh, settings)
    for model in offloaded or []:
        parallelize(model, strategy.device_mesh, settings, offload=True)
    return True


def data_parallel_group(strategy: Any) -> Any:
    """The process group whose ranks see different batches: the ``data_parallel`` mesh
    dimension under a ``ModelParallelStrategy``, else ``None`` (every rank: DDP, DeepSpeed)."""
    if isinstance(strategy, ModelParallelStrategy):
        return strategy.device_mesh["data_parallel"].get_group()
    return None


def sum_over_data_parallel(values: Tensor, strategy: Any) -> tuple[Tensor, int]:
    """``(Σ over data-parallel ranks of values, number of those ranks)``; ``values`` as is
    (and 1) in a single process. Collective: every rank of the group must call it."""
    if strategy is None or not dist.is_available() or not dist.is_initialized():
        return values, 1
    group = data_parallel_group(strategy)
    world = dist.get_world_size(group)
    if world == 1:
        return values, 1
    total = values.detach().clone()
    dist.all_reduce(total, group=group)
    return total, world


def grads_on_parameters(strategy: Any) -> bool:
    """Whether gradients live in ``param.grad`` between backward and the optimizer step (not
    under DeepSpeed, whose engine keeps and scales them itself)."""
    return not isinstance(strategy, DeepSpeedStrategy)


def is_sharded(model: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """``model``'s full state dict on CPU when it is sharded (else ``None``: use the model's).

    Collective: every rank must call it (each contributes its shards); only rank 0 gets the
    tensors, the others an empty dict.
    """
    if is_zero3_partitioned(model):
        state = _gather_zero3(model)
    elif is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(model, options=options)
    else:
        return None
    # The gather returns tied weights (embeddings = LM head) as separate tensors; keep the first
    # name of each parameter, as the model's own state dict / save_pretrained would.
    return {k: v for k, v in state.items() if k not in tied_duplicates(model)}


def is_zero3_partitioned(model: nn.Module) -> bool:
    """DeepSpeed ZeRO-3 replaces each parameter by a stub carrying a ``ds_id``."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def _gather_zero3(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full CPU weights on rank 0 under ZeRO-3 (collective; gathers one whole model per rank).

    Not exercised here (deepspeed needs CUDA); for models too large to gather, convert the
    checkpoint offline with DeepSpeed's ``zero_to_fp32.py`` instead.
    """
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        if torch.distributed.get_rank() != 0:
            return {}
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def tied_duplicates(model: nn.Module) -> set[str]:
    """Names of parameters that are another, earlier-named parameter (weight tying)."""
    seen: set[int] = set()
    dups = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            dups.add(name)
        seen.add(id(param))
    return dups
