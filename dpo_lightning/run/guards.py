"""Non-finite guards: a NaN/inf loss or gradient never reaches the optimizer, and a run whose
final validation is not finite fails instead of exporting.

Checked in ``on_before_optimizer_step`` (after backward, before clipping and the step), so one bad
batch cannot write NaN into the policy or the optimizer's moments. Policy ``train.on_nonfinite``:

- ``stop``: raise :class:`NonFiniteError` naming the step and the batch's source rows;
- ``skip``: drop the gradients (the optimizer skips parameters without one), count the step in
  ``skipped`` (reported in ``summary.json`` as ``nonfinite_steps_skipped``) and go on.

:class:`FiniteValidation` checks the validation ``train.py`` runs after ``fit``: a NaN/inf
``val/*`` metric raises :class:`NonFiniteValidationError` naming the metrics, before the model is
exported or ``summary.json`` written (the checkpoints stay).
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor

from dpo_lightning.models.tensor_parallel import total_grad_norm
from dpo_lightning.run.errors import UserError

POLICIES = ("skip", "stop")


class NonFiniteError(UserError):
    """Training produced a non-finite loss or gradient under ``train.on_nonfinite=stop``."""


class NonFiniteValidationError(UserError):
    """The final validation of a run gave a NaN/inf metric."""


def first_nonfinite(loss: Tensor | None, params: list[torch.nn.Parameter]) -> str | None:
    """What is non-finite — ``"loss (nan)"``, ``"gradient (parameter #i, ...)"`` — or None.

    One fused norm over all gradients (one device sync); the culprit is searched only when the
    norm is not finite. A finite-but-huge gradient whose norm overflows counts as non-finite.
    """
    if loss is not None and not torch.isfinite(loss.detach()).all():
        return f"loss ({loss.detach().float().mean().item()})"
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or torch.isfinite(total_grad_norm(grads)):
        return None
    for i, p in enumerate(params):
        if p.grad is not None and not torch.isfinite(p.grad).all():
            return f"gradient (parameter #{i}, shape {tuple(p.shape)})"
    return "gradient norm (overflow)"


class NonFiniteGuard(L.Callback):
    """Skips or stops on a non-finite loss / gradient (see module docstring).

    With gradient accumulation, every micro-batch's loss and source rows count towards the
    step; under data parallelism all ranks take the same decision (any rank's NaN skips).

    Args:
        on_nonfinite: ``skip`` or ``stop``.
    """

    def __init__(self, on_nonfinite: str = "stop") -> None:
        if on_nonfinite not in POLICIES:
            raise UserError(f"train.on_nonfinite must be one of {POLICIES}, got {on_nonfinite!r}")
        self.on_nonfinite = on_nonfinite
        self.skipped = 0
        self._bad_loss: Tensor | None = None  # first non-finite micro-batch loss of this step
        self._rows: list[int] = []  # source rows of this step's micro-batches
        self._batch_idx = -1

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        rows = batch.get("pair_row_ids") if isinstance(batch, dict) else None
        self._rows += [] if rows is None else torch.as_tensor(rows).tolist()
        self._batch_idx = batch_idx

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        if self._bad_loss is None and not torch.isfinite(loss.detach()).all():
            self._bad_loss = loss.detach()

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        bad = first_nonfinite(self._bad_loss, params)
        rows, self._rows, self._bad_loss = sorted(set(self._rows)), [], None
        if not trainer.strategy.reduce_boolean_decision(bad is not None, all=False):
            return
        bad = bad or "value on another rank"
        where = (
            f"non-finite {bad} at step {trainer.global_step + 1} (epoch {trainer.current_epoch}, "
            f"batch {self._batch_idx}), data rows {_short(rows)}"
        )
        if self.on_nonfinite == "stop":
            raise NonFiniteError(
                f"{where}; check those rows, lower optim.optimizer.lr, or set "
                "train.on_nonfinite=skip to skip such steps"
            )
        self.skipped += 1
        optimizer.zero_grad(set_to_none=True)  # no grad -> the optimizer leaves the parameter alone
        print(f"[dpo_lightning] skipped optimizer step: {where} (skipped so far: {self.skipped})")
        pl_module.log("train/nonfinite_skipped", float(self.skipped), on_step=True, reduce_fx="max")

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = state_dict["skipped"]


def _short(rows: list[int], limit: int = 16) -> str:
    shown = ", ".join(map(str, rows[:limit]))
    return f"[{shown}{', ...' if len(rows) > limit else ''}]"


class FiniteValidation(L.Callback):
    """Fails the run when the validation after ``fit`` (``trainer.validate``) logs a NaN/inf
    ``val/*`` metric: a model that gives NaN on held-out data must not be exported as a result.

    Validations during ``fit`` are left alone (the end of the run is what is reported). The
    logged metrics are already averaged over ranks, so every rank decides alike.
    """

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn != TrainerFn.VALIDATING:
            return
        bad = {
            k: float(v)
            for k, v in sorted(trainer.callback_metrics.items())
            if k.startswith("val/") and not math.isfinite(float(v))
        }
        if bad:
            shown = ", ".join(f"{k}={v}" for k, v in bad.items())
            raise NonFiniteValidationError(
                f"the final validation is not finite at step {trainer.global_step} ({shown}): "
                "nothing was exported (the checkpoints are kept); the policy gives NaN/inf on the "
                "validation rows: lower optim.optimizer.lr, check the data, or resume from an "
                "earlier checkpoint (ckpt_path=...)"
            )
