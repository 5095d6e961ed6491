"""What every training stage shares: a trainable policy, its optimizer and LR schedule, the
forward engine, one sharding rule, one loss-normalisation rule, and one logging rule.

Supports / assumptions: every strategy of ``conf/trainer`` for every stage. FSDP2
(``trainer=fsdp``/``fsdp_cpu``) shards the policy and the stage's frozen models in
:meth:`PolicyModule.configure_model`. Losses are normalised over the **global** batch
(:meth:`PolicyModule.reduce_loss`), so W data-parallel ranks with batch b train the same
weights as one process with batch W·b, and ``accumulate_grad_batches=M`` the same as a batch
M times larger (exactly, except under DeepSpeed: see ``reduce_loss``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from dpo_lightning.engine import BatchReader, ForwardEngine, PaddedEngine
from dpo_lightning.models.parallel import apply_parallelism, grads_on_parameters, sum_over_data_parallel
from dpo_lightning.models.tensor_parallel import clip_grad_norm, spans_meshes, total_grad_norm


def model_flops_per_token(params: int, training: bool) -> float:
    """Model FLOPs per token: ``6N`` for a trained model (forward + backward), ``2N`` for a
    forward only (Kaplan et al. 2020, https://arxiv.org/abs/2001.08361; attention left out)."""
    return (6 if training else 2) * params


class PolicyModule(L.LightningModule):
    """Base of the stage modules (``conf/stage/``: DPO, SFT, reward model).

    Args:
        policy: the model being trained.
        optimizer: ``params -> Optimizer`` (a Hydra ``_partial_``), called on the policy's
            trainable parameters only (never a frozen reference).
        scheduler: ``(optimizer=, num_training_steps=) -> LRScheduler`` or None; stepped per step.
        engine: batch layout + forward (``conf/engine``; the same object built the DataModule's
            collator); default: padded rows. Resolved here, once, for this policy and the
            batch ``readers`` (``engine=auto`` picks packed or padded and the choice is logged).
        tokenizer: the policy's tokenizer (``train.py`` passes it to every stage; None when a
            stage is built by hand), for parts that must agree with it.
        readers: other components reading the batches (a reference strategy), asked with this
            stage whether they need padded rows (:class:`~dpo_lightning.engine.BatchReader`).

    Subclasses implement ``_shared_step(batch, stage) -> loss`` (stage ``train`` or ``val``),
    reducing their per-item losses with :meth:`reduce_loss`, and list the frozen models they hold
    in :meth:`frozen_models` (sharded with the policy).
    """

    def __init__(
        self,
        policy: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        engine: ForwardEngine | None = None,
        tokenizer: Any = None,
        readers: Sequence[BatchReader] = (),
    ) -> None:
        super().__init__()
        self.policy = policy
        self.tokenizer = tokenizer
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.engine, note = (engine or PaddedEngine()).resolve(policy, [self, *readers])
        if note:
            rank_zero_info(note)
        #: Model FLOPs of the batch being processed: Lightning's ``ThroughputMonitor`` reads it
        #: (for ``mfu``) after every batch.
        self.flops_per_batch: float | None = None
        #: Gradient accumulation window: (global item count of its first micro-batch, of all its
        #: micro-batches so far); None between optimizer steps.
        self._window: tuple[Tensor, Tensor] | None = None

    def padded_rows_reason(self) -> str | None:
        """Why this stage needs one padded row per completion (:class:`BatchReader`); None: it
        reads only the engine's per-completion statistics."""
        return None

    def forward_only_params(self) -> int:
        """Parameters read by the step's forward-only passes (a reference), per token."""
        return 0

    def flops_per_token(self, training: bool) -> float:
        """Model FLOPs per batch token: the policy trained (or evaluated) plus forward-only passes."""
        policy = sum(p.numel() for p in self.policy.parameters())
        forward_only = model_flops_per_token(self.forward_only_params(), training=False)
        return model_flops_per_token(policy, training) + forward_only

    @property
    def reference_model(self) -> nn.Module | None:
        """A frozen reference model this stage holds (for callbacks that score samples), or None."""
        return None

    def frozen_models(self) -> list[nn.Module]:
        """Frozen models this stage holds next to the policy (sharded with it under FSDP2)."""
        return []

    def offloaded_models(self) -> list[nn.Module]:
        """Frozen models sharded with the policy whose shards stay in CPU memory (FSDP2 offload)."""
        return []

    # One rule for every stage: FSDP2 (trainer=fsdp) shards the policy and the frozen models;
    # a no-op under every other strategy.
    def configure_model(self) -> None:
        apply_parallelism(self._strategy(), self.policy, self.frozen_models(), self.offloaded_models())

    def _strategy(self) -> Any:
        return self.trainer.strategy if self._trainer is not None else None

    def _shared_step(self, batch: dict[str, Any], stage: str) -> Tensor:
        raise NotImplementedError

    def global_sum(self, *values: Tensor | float) -> tuple[Tensor, int]:
        """``(Σ over data-parallel ranks of the stacked values (n,), number of those ranks)``,
        detached; one collective whatever n (every rank must call it)."""
        stacked = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=self.device) for v in values])
        return sum_over_data_parallel(stacked.detach(), self._strategy())

    def reduce_loss(self, total: Tensor, count: Tensor | float, stage: str) -> tuple[Tensor, Tensor]:
        """The loss of the global batch, ``Σ_all ranks total / Σ_all ranks count``, from this
        rank's share.

        Items are tokens (SFT) or pairs (DPO, reward model). Averaging each rank's own mean (what
        DDP's gradient average does to per-rank means) weighs a rank's items by 1/its own count, so
        2 ranks × b ≠ 1 × 2b whenever counts differ (SFT: always). Instead each rank returns
        ``W · total / N`` with N the global count: DDP/FSDP2 average the gradients over the W
        data-parallel ranks, which gives exactly ∇(Σ total / N).

        Gradient accumulation (M micro-batches per step): the step's N is known only after its
        last micro-batch, so every micro-batch is scaled by the first one's count N₀
        (``M · W · total / N₀``; Lightning divides by M) and :meth:`on_before_optimizer_step`
        rescales the summed gradients by N₀ / N_step before clipping, the same idea as
        torchtune's ``scale_grads``. Exact for one normaliser per step; under DeepSpeed (its
        engine owns the gradients) each micro-batch is normalised over its own global count
        instead (exact when micro-batches hold equal counts, e.g. full batches of pairs).

        Args:
            total: this rank's sum of per-item losses (0-d, differentiable).
            count: this rank's number of items.
            stage: ``train`` (may start/extend an accumulation window) or ``val``.

        Returns:
            ``(loss, value)``: the loss to return from ``training_step`` and the global mean,
            detached and equal on every rank (to log).
        """
        (total_all, count_all), world = self.global_sum(total.detach(), count)
        denominator = count_all.clamp(min=1.0)  # no items anywhere: total is 0 too
        value = total_all / denominator
        accumulate = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
        if stage != "train" or accumulate == 1 or not grads_on_parameters(self._strategy()):
            return total * world / denominator, value
        if self._window is None:
            self._window = (denominator, torch.zeros_like(count_all))
        first, seen = self._window
        self._window = (first, seen + count_all)
        return total * (world * accumulate) / first, value

    def log_stage(
        self, metrics: dict[str, Tensor], stage: str, batch_size: int, prog_bar: bool = False, **kwargs: Any
    ) -> None:
        """Log ``{stage}/{name}``: per step while training, per epoch (the mean over validation
        batches) otherwise, averaged over ranks (``sync_dist``)."""
        self.log_dict(
            {f"{stage}/{k}": v for k, v in metrics.items()},
            batch_size=batch_size,
            on_step=stage == "train",
            on_epoch=stage != "train",
            sync_dist=True,
            prog_bar=prog_bar,
            **kwargs,
        )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        self.flops_per_batch = self.flops_per_token(training=True) * int(batch["num_tokens"])
        return self._shared_step(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.flops_per_batch = self.flops_per_token(training=False) * int(batch["num_tokens"])
        self._shared_step(batch, "val")

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self._finish_window()
        # Before clipping: the norm the optimizer would have seen unclipped.
        grads = [p.grad for p in self.policy.parameters() if p.grad is not None]
        if grads:
            self.log("train/grad_norm", total_grad_norm(grads), on_step=True)

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        # TP + FSDP2 spreads the policy over two device meshes, where torch's clip_grad_norm_
        # fails (see models/tensor_parallel.py); everywhere else Lightning clips as usual.
        params = [p for p in self.policy.parameters() if p.grad is not None]
        if gradient_clip_val and gradient_clip_algorithm in (None, "norm") and spans_meshes(params):
            clip_grad_norm(params, float(gradient_clip_val))
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def _finish_window(self) -> None:
        """Rescale the accumulated gradients from the first micro-batch's count to the step's
        (see :meth:`reduce_loss`); runs after every callback's ``on_before_optimizer_step``."""
        if self._window is None:
            return
        first, seen = self._window
        self._window = None
        scale = float(first / seen.clamp(min=1.0))  # one host sync per optimizer step
        if scale != 1.0:
            for p in self.policy.parameters():
                if p.grad is not None:
                    p.grad.mul_(scale)

    def optimizer_step(
        self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Callable[[], Any] | None = None
    ) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # Free the gradients as soon as they are applied. Lightning zeroes them just before the
        # next backward, so they would sit through the next forward beside its activations: the
        # size of the trainable weights again at the step's memory peak. Same numbers, less memory.
        optimizer.zero_grad(set_to_none=True)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory([p for p in self.policy.parameters() if p.requires_grad])
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(
            optimizer=optimizer, num_training_steps=int(self.trainer.estimated_stepping_batches)
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "train/lr"},
        }
