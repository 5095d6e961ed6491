"""Sequence log-probabilities of completions: pure tensor functions.

All completions of a batch (chosen and rejected, or K ranked ones) go through the model in one
concatenated forward, as in the DPO authors' ``concatenated_forward``. Labels follow the HF
convention: ``labels`` equals ``input_ids`` on completion tokens and ``-100`` on prompt and
padding; the logit at position t predicts the label at t + 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dpo_lightning.data.collate import IGNORE_INDEX


@dataclass
class CompletionStats:
    """Per-completion statistics of one forward pass, each of shape (B,).

    Attributes:
        logps: log-prob of the completion tokens, **summed** over the completion.
        lengths: number of completion tokens (the mask sum), float.
        mean_logits: mean raw logit over completion tokens and the vocabulary (for metrics).
    """

    logps: Tensor
    lengths: Tensor
    mean_logits: Tensor

    def select(self, rows: Tensor) -> CompletionStats:
        """The statistics of completions ``rows`` (R,) only."""
        return CompletionStats(self.logps[rows], self.lengths[rows], self.mean_logits[rows])


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions counted over real tokens only, so left padding does not shift RoPE: (B, T)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def token_logps(logits: Tensor, targets: Tensor) -> Tensor:
    """log softmax(logits)[target] per token, in fp32: (..., V), (...) -> (...).

    ``logit[target] - logsumexp(logits)`` avoids materialising the full (B, T, V) log-softmax.
    """
    logits = logits.float()
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def completion_stats(logits: Tensor, labels: Tensor) -> CompletionStats:
    """Summed completion log-probs from logits and labels.

    Args:
        logits: (B, T, V) model outputs.
        labels: (B, T) target ids, ``IGNORE_INDEX`` on prompt and padding.

    Returns:
        :class:`CompletionStats` with (B,) tensors.
    """
    logits, labels = logits[:, :-1], labels[:, 1:]  # position t predicts token t + 1
    mask = labels != IGNORE_INDEX
    safe_labels = labels.masked_fill(~mask, 0)  # any valid id; masked out below
    per_token = token_logps(logits, safe_labels) * mask
    lengths = mask.sum(-1).float()
    logit_sums = (logits.detach().float().mean(-1) * mask).sum(-1)
    return CompletionStats(
        logps=per_token.sum(-1),
        lengths=lengths,
        mean_logits=logit_sums / lengths.clamp(min=1.0),
    )


def concatenated_forward(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, labels: Tensor
) -> CompletionStats:
    """One forward of every completion in the batch.

    Args:
        model: a HF causal LM (anything returning ``.logits`` of shape (B, T, V)).
        input_ids, attention_mask, labels: (B, T), prompt + completion per row, left or right
            padded. Position ids are derived from the mask so both paddings give the same result.
    """
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    ).logits
    return completion_stats(logits, labels)
