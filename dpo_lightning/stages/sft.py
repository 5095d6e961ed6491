"""Supervised fine-tuning (the paper's first stage): token-level NLL on completion tokens.

``dpo-train stage=sft`` trains on the **chosen** completions of the same preference data (the DPO
paper's "Preferred-FT" / SFT step) and exports ``hf_model/``, which a DPO run then loads as both
policy and reference (``model=hf model.name_or_path=<sft run>/hf_model``). With ``data=text``
(:class:`~dpo_lightning.data.formats.TextFormat`) it is plain language modelling on a text
column: every row is one completion with an empty prompt and no pairs, and every completion
token is trained on.

    dpo-train stage=sft hydra.run.dir=/tmp/sft                    # SFT on the chosen completions
    dpo-train stage=sft data=text data.path=reviews.jsonl         # plain text (column "text")
    dpo-train model=hf model.name_or_path=/tmp/sft/hf_model       # then DPO from the SFT model

Supports / assumptions: both engines (the padded one forwards only the trained rows; the packed
one computes every completion of its row and keeps the trained ones); every strategy (the token
mean is over the global batch: all ranks and all micro-batches of a step, see
:meth:`~dpo_lightning.stages.base.PolicyModule.reduce_loss`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dpo_lightning.stages.base import PolicyModule


def sft_rows(batch: dict[str, Any]) -> Tensor:
    """Indices (R,) of the completions SFT trains on: those that win some pair, the desirable ones
    of unpaired (labelled) data, or every one when the batch has neither (plain text). A completion
    chosen in several pairs counts once."""
    if "completion_labels" in batch:
        return torch.nonzero(batch["completion_labels"]).flatten()
    if int(batch["num_pairs"]) == 0:
        return torch.arange(int(batch["num_completions"]), device=batch["input_ids"].device)
    return torch.unique(batch["chosen_idx"])


def token_nll(logps: Tensor, lengths: Tensor) -> Tensor:
    """Mean NLL per completion token over the batch: ``-Σ logps / Σ lengths`` from (R,), (R,).

    Token-level (not a mean of per-sequence means), so a long completion weighs by its tokens
    exactly as in ordinary causal-LM fine-tuning.
    """
    return -logps.sum() / lengths.sum().clamp(min=1.0)


class SFTModule(PolicyModule):
    """Causal-LM fine-tuning on completion tokens (prompt tokens are context only).

    Args: those of :class:`~dpo_lightning.stages.base.PolicyModule` (policy, optimizer,
    scheduler, engine).

    Forwards the completions :func:`sft_rows` selects; the loss is :func:`token_nll` over the
    global batch. Logs ``{train,val}/loss`` (token NLL of the global batch) and ``{train,val}/ppl``.
    """

    def _shared_step(self, batch: dict[str, Any], stage: str) -> Tensor:
        rows = sft_rows(batch)
        n = int(rows.numel())
        if n == 0:  # unpaired rows, none desirable: no signal; a zero loss on the graph keeps the
            # step (and DDP's gradient sync) going without training on undesirable text
            total, tokens = self.engine(self.policy, batch).logps.sum() * 0.0, 0.0
        else:
            stats = self.engine(self.policy, batch, rows)
            total, tokens = -stats.logps.sum(), stats.lengths.sum()
        loss, nll = self.reduce_loss(total, tokens, stage)  # token mean over the global batch
        self.log_stage({"loss": nll, "ppl": nll.exp()}, stage, n, prog_bar=True)
        return loss
