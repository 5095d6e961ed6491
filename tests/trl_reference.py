"""TRL 1.16's own loss code, run on chosen per-token numbers (test helper, not a fixture).

``DPOTrainer._compute_loss`` and ``KTOTrainer._compute_loss`` read the model's per-token outputs
(``log_probs``, ``log_sum_sq_probs``, ...) from its fused LM head. Here the "model" is a stub that
returns per-token values we choose, and the trainer is an object carrying only the attributes
those methods read, so TRL's exact lines compute the loss and metrics we compare against — no
training run, no dataset, no accelerate state.

Rows are right-padded: row i has a 1-token prompt and then ``len(tokens[i])`` completion tokens;
the value at shifted position t is the log-prob of token t + 1, as TRL's models return them.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import torch
from torch import Tensor, nn
from trl.trainer.dpo_trainer import DPOTrainer
from trl.trainer.kto_trainer import KTOTrainer


def padded(rows: list[Tensor]) -> tuple[Tensor, Tensor]:
    """(R, T) completion mask (a 1-token prompt, then the row's tokens) and (R, T - 1) values."""
    width = 1 + max(len(r) for r in rows)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    values = torch.zeros(len(rows), width - 1, dtype=rows[0].dtype)
    for i, r in enumerate(rows):
        mask[i, 1 : 1 + len(r)] = 1
        values[i, : len(r)] = r
    return mask, values


def _outputs(log_probs: Tensor, log_sum_sq_probs: Tensor | None) -> SimpleNamespace:
    return SimpleNamespace(
        log_probs=log_probs,
        log_sum_sq_probs=log_sum_sq_probs,
        entropy=torch.zeros_like(log_probs),
        mean_logits=torch.zeros_like(log_probs),
        is_top1=torch.zeros_like(log_probs, dtype=torch.bool),
        aux_loss=None,
    )


class StubLM(nn.Module):
    """Returns fixed per-token outputs (TRL's ``fused_lm_head`` output fields): ``kl_log_probs`` for
    inputs of their width (KTO's mismatched rows go through the same model), ``log_probs`` else."""

    is_gradient_checkpointing = False

    def __init__(
        self, log_probs: Tensor, log_sum_sq_probs: Tensor | None = None, kl_log_probs: Tensor | None = None
    ) -> None:
        super().__init__()
        self.main = _outputs(log_probs, log_sum_sq_probs)
        self.kl = None if kl_log_probs is None else _outputs(kl_log_probs, None)

    def forward(self, input_ids: Tensor, **kwargs) -> SimpleNamespace:
        if self.kl is not None and input_ids.shape[1] == self.kl.log_probs.shape[1] + 1:
            return self.kl
        return self.main


def _accelerator() -> SimpleNamespace:
    return SimpleNamespace(
        device=torch.device("cpu"),
        gather_for_metrics=lambda x: x.reshape(-1) if isinstance(x, Tensor) else x,
        gather=lambda x: x,
        unwrap_model=lambda m: m,
    )


def trl_dpo_loss(
    policy: list[Tensor],
    reference: list[Tensor],
    beta: float,
    loss_type: str = "sigmoid",
    ld_alpha: float | None = None,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    policy_sq: list[Tensor] | None = None,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, dict[str, float]]:
    """TRL 1.16 ``DPOTrainer._compute_loss``: 2P rows, chosen first, then rejected.

    Args:
        policy, reference: per-token log-probs of each completion (2P tensors).
        policy_sq: per-token ``log Σ_v p(v)²`` of the policy (``use_weighting=True`` when given).

    Returns:
        the scalar loss and TRL's logged metrics (their last value).
    """
    mask, logps = padded(policy)
    _, ref_logps = padded(reference)
    sq = None if policy_sq is None else padded(policy_sq)[1]
    trainer = object.__new__(DPOTrainer)
    model = StubLM(logps, sq)
    vars(trainer).update(
        model=model,
        ref_model=StubLM(ref_logps),
        accelerator=_accelerator(),
        args=SimpleNamespace(gradient_checkpointing_kwargs=None, discopop_tau=0.05),
        aux_loss_enabled=False,
        ld_alpha=ld_alpha,
        precompute_ref_logps=False,
        f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef,
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=sq is not None,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.ones_like(mask),
        "attention_mask": torch.ones_like(mask),
        "completion_mask": mask,
    }
    loss = trainer._compute_loss(model, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def trl_kto_loss(
    policy: list[Tensor],
    reference: list[Tensor],
    labels: list[bool],
    policy_kl: list[Tensor],
    reference_kl: list[Tensor],
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, dict[str, float]]:
    """TRL 1.16 ``KTOTrainer._compute_loss`` (``loss_type="kto"``) on U rows and their KL rows.

    ``policy_kl`` / ``reference_kl``: per-token log-probs of the mismatched rows (one per row).
    """
    mask, logps = padded(policy)
    _, ref_logps = padded(reference)
    kl_mask, kl_logps = padded(policy_kl)
    _, ref_kl_logps = padded(reference_kl)
    if kl_mask.shape[1] == mask.shape[1]:
        raise ValueError(
            "give the KL rows another width than the main rows (the stub tells them apart by it)"
        )
    model, ref_model = StubLM(logps, kl_log_probs=kl_logps), StubLM(ref_logps, kl_log_probs=ref_kl_logps)
    trainer = object.__new__(KTOTrainer)
    vars(trainer).update(
        model=model,
        ref_model=ref_model,
        accelerator=_accelerator(),
        args=SimpleNamespace(gradient_checkpointing_kwargs=None),
        aux_loss_enabled=False,
        precompute_ref_logps=False,
        calculate_KL=True,
        loss_type="kto",
        beta=beta,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.ones_like(mask),
        "attention_mask": torch.ones_like(mask),
        "completion_mask": mask,
        "KL_input_ids": torch.ones_like(kl_mask),
        "KL_attention_mask": torch.ones_like(kl_mask),
        "KL_completion_mask": kl_mask,
        "label": torch.tensor(labels),
    }
    loss = trainer._compute_loss(model, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}
