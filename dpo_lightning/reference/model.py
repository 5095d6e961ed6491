"""A separate frozen reference checkpoint (``reference=model reference.name_or_path=...``).

    dpo-train model=hf model.name_or_path=<policy> reference=model reference.name_or_path=<SFT>
    dpo-train reference=model reference.name_or_path=<SFT> reference.device=cpu  # CPU reference
    dpo-train reference=model reference.name_or_path=<SFT> reference.offload=true trainer=fsdp

The paper's πref is the SFT model; when the policy starts from another checkpoint (a merged or
further-tuned model) the reference is loaded on its own, with the policy's loading code
(:func:`~dpo_lightning.models.loading.load_causal_lm`: hub ids and local folders alike, safetensors
only). It must share the policy's tokenizer — compared by vocabulary before its weights are
loaded — is frozen and in eval mode, is left out of checkpoints (rebuilt from its source at every
start), and under FSDP2 is sharded with the policy in ``configure_model``.

Where the reference lives:

* default: with the policy (moved to its device by Lightning, sharded with it under FSDP2);
* ``offload=true`` (FSDP2 only): its shards stay in CPU memory (``fully_shard``'s
  ``CPUOffloadPolicy``); each layer is copied to the accelerator for its forward and freed after;
* ``device=cpu`` (one device): it stays on the CPU and runs its forward there; the batch goes to the
  CPU and the log-probs come back to the policy's device. For a reference that does not fit next
  to the policy, at the price of a CPU forward per step.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from dpo_lightning.engine import CompletionStats, EngineBatch, ForwardEngine
from dpo_lightning.models.loading import DTYPES, load_causal_lm
from dpo_lightning.models.tokenizers import load_tokenizer, tokenizer_differences
from dpo_lightning.reference.base import ReferenceStrategy
from dpo_lightning.run.errors import UserError, check_choice


class ModelReference(ReferenceStrategy):
    """A frozen reference model loaded from its own checkpoint.

    Args:
        name_or_path: hub id or ``save_pretrained`` folder of the reference (e.g. the SFT model).
        tokenizer: where its tokenizer is, when not saved with it (compared with the policy's).
        dtype: its parameter dtype (``float32`` / ``bfloat16`` / ``float16``), independent of the
            policy's: a bf16 reference next to an fp32 policy halves its memory.
        attn_implementation: its attention (``sdpa`` / ``eager`` / ``flash_attention_2`` / ...).
        trust_remote_code: run code shipped with its checkpoint (off unless asked for).
        gguf_file: a ``.gguf`` file inside ``name_or_path`` (de-quantised on load).
        device: ``null`` (with the policy) or ``cpu`` (single device only: kept and run on the CPU).
        offload: under FSDP2, keep its shards in CPU memory (``CPUOffloadPolicy``).
    """

    rebuilt_on_start = True

    def __init__(
        self,
        name_or_path: str,
        tokenizer: str | None = None,
        dtype: str = "float32",
        attn_implementation: str | None = "sdpa",
        trust_remote_code: bool = False,
        gguf_file: str | None = None,
        device: str | None = None,
        offload: bool = False,
    ) -> None:
        super().__init__()
        check_choice("dtype", dtype, tuple(DTYPES))
        check_choice("device", device, (None, "cpu"), hint="null: the reference lives with the policy")
        if device == "cpu" and offload:
            raise UserError(
                "reference.device=cpu and reference.offload=true: pick one (offload is for FSDP2, "
                "device=cpu for a single device)"
            )
        self.name_or_path, self.tokenizer_source = str(name_or_path), tokenizer
        self.load_kwargs = {
            "dtype": dtype,
            "attn_implementation": attn_implementation,
            "trust_remote_code": trust_remote_code,
            "gguf_file": gguf_file,
        }
        self.device, self.offload = device, offload
        self.vocab_size: int | None = None  # the policy tokenizer's, once checked

    @property
    def source(self) -> str:
        return f"reference.name_or_path={self.name_or_path!r}"

    def check_tokenizer(self, tokenizer: Any) -> None:
        source = self.tokenizer_source or self.name_or_path
        try:
            theirs = load_tokenizer(source, self.load_kwargs["trust_remote_code"])
        except (OSError, ValueError, UserError) as err:
            raise UserError(
                f"{self.source}: no tokenizer to compare with the policy's at {source!r} "
                f"({str(err).splitlines()[0]}); save it there or set reference.tokenizer=<folder or hub id>"
            ) from None
        problems = tokenizer_differences(tokenizer, theirs)
        if problems:
            raise UserError(
                f"{self.source}: its tokenizer is not the policy's ({problems[0]}); the reference "
                "must score the policy's token ids: use a reference trained with the same tokenizer"
            )
        self.vocab_size = len(tokenizer)

    def build(self, policy: nn.Module) -> None:
        model = load_causal_lm(self.name_or_path, disable_dropout=True, **self.load_kwargs)
        rows = model.get_input_embeddings().num_embeddings
        needed = self.vocab_size or policy.get_input_embeddings().num_embeddings
        if rows < needed:
            raise UserError(
                f"{self.source}: its embedding has {rows} rows but the policy's token ids go up "
                f"to {needed - 1}: the reference must share the policy's vocabulary"
            )
        self.model = model.eval().requires_grad_(False)

    def prepare(self, trainer: L.Trainer, policy: nn.Module, engine: ForwardEngine) -> None:
        sharded = isinstance(trainer.strategy, ModelParallelStrategy)
        if self.device == "cpu" and (sharded or trainer.world_size > 1):
            raise UserError(
                "reference.device=cpu is for a single device; under FSDP2 use reference.offload=true "
                "(its shards stay in CPU memory)"
            )
        if self.offload and not sharded:
            raise UserError(
                "reference.offload=true needs trainer=fsdp (FSDP2 shards it with a CPU offload "
                "policy); on a single device use reference.device=cpu"
            )
        datamodule = getattr(trainer, "datamodule", None)
        if self.vocab_size is None and getattr(datamodule, "tokenizer", None) is not None:
            self.check_tokenizer(datamodule.tokenizer)  # built without the stage's tokenizer

    def _apply(self, fn: Any, recurse: bool = True) -> ModelReference:
        # Lightning moves (and, for *-true precision, casts) the whole stage to the policy's
        # device; a reference kept on the CPU or offloaded by FSDP2 keeps its place and dtype.
        if self.device == "cpu" or self.offload:
            return self
        return super()._apply(fn, recurse)

    @torch.no_grad()
    def completion_logps(
        self, batch: EngineBatch, policy: nn.Module, engine: ForwardEngine
    ) -> CompletionStats:
        if self.device != "cpu":
            return engine(self.model, batch)
        target = next(policy.parameters()).device
        # A batch of its own on the CPU: what the engine derives (masks) is per device.
        local = EngineBatch(move_data_to_device(batch.data, torch.device("cpu")))
        stats = engine(self.model, local)
        return CompletionStats(*(t.to(target) for t in (stats.logps, stats.lengths, stats.mean_logits)))
