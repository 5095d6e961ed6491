"""Supervised fine-tuning (the paper's first stage): token-level NLL on completion tokens.

``dpo-train stage=sft`` trains on the **chosen** completions of the same preference data (the DPO
paper's "Preferred-FT" / SFT step) and exports ``hf_model/``, which a DPO run then loads as both
policy and reference (``model=hf model.name_or_path=<sft run>/hf_model``). With ``data=text``
(:class:`TextFormat`) it is plain language modelling on a text column: every row is one
completion with an empty prompt and no pairs, and every completion token is trained on.

    dpo-train stage=sft hydra.run.dir=/tmp/sft                    # SFT on the chosen completions
    dpo-train stage=sft data=text data.path=reviews.jsonl         # plain text (column "text")
    dpo-train model=hf model.name_or_path=/tmp/sft/hf_model       # then DPO from the SFT model
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dpo_lightning.data.formats import RowFormat, require_text
from dpo_lightning.logps import concatenated_forward
from dpo_lightning.policy_module import PolicyModule


def sft_rows(batch: dict[str, Any]) -> Tensor:
    """Indices (R,) of the rows SFT trains on: the completions that win some pair, or every row
    when the batch has no pairs (plain text). A completion chosen in several pairs counts once."""
    if int(batch["num_pairs"]) == 0:
        return torch.arange(batch["input_ids"].shape[0], device=batch["input_ids"].device)
    return torch.unique(batch["chosen_idx"])


def token_nll(logps: Tensor, lengths: Tensor) -> Tensor:
    """Mean NLL per completion token over the batch: ``-Σ logps / Σ lengths`` from (R,), (R,).

    Token-level (not a mean of per-sequence means), so a long completion weighs by its tokens
    exactly as in ordinary causal-LM fine-tuning.
    """
    return -logps.sum() / lengths.sum().clamp(min=1.0)


class SFTModule(PolicyModule):
    """Causal-LM fine-tuning on completion tokens (prompt tokens are context only).

    Args:
        policy: the causal LM being trained (a HF ``PreTrainedModel``).
        optimizer: ``params -> Optimizer`` (a Hydra ``_partial_``).
        scheduler: ``(optimizer=, num_training_steps=) -> LRScheduler`` or None; stepped per step.

    Takes the batches of :class:`~dpo_lightning.data.collate.PreferenceCollator` and forwards
    only the rows :func:`sft_rows` selects. Logs ``{train,val}/loss`` (token NLL) and
    ``{train,val}/ppl``.
    """

    def _shared_step(self, batch: dict[str, Any], stage: str) -> Tensor:
        rows = sft_rows(batch)
        stats = concatenated_forward(
            self.policy,
            batch["input_ids"][rows],
            batch["attention_mask"][rows],
            batch["labels"][rows],
        )
        loss = token_nll(stats.logps, stats.lengths)
        n = int(rows.numel())
        self.log_stage({"loss": loss, "ppl": loss.detach().exp()}, stage, n, prog_bar=True)
        return loss


class TextFormat(RowFormat):
    """Plain text rows ``{text}`` for language-model fine-tuning: an empty prompt (the tokenizer
    adds BOS where the model uses one), the text as the single completion, no pairs.

    Args:
        columns: ``{"text": your column}`` when the text column has another name.
    """

    fields = ("text",)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        return {"prompt": "", "completions": [require_text(row, self.col("text"))], "pairs": []}
