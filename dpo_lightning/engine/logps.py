"""Sequence log-probabilities of completions: pure tensor functions.

All completions of a batch (chosen and rejected, or K ranked ones) go through the model in one
concatenated forward, as in the DPO authors' ``concatenated_forward``. Labels follow the HF
convention: ``labels`` equals ``input_ids`` on completion tokens and ``-100`` on prompt and
padding; the logit at position t predicts the label at t + 1.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from dpo_lightning.data.collate import IGNORE_INDEX
from dpo_lightning.engine.chunked_head import logits_token_stats


@dataclass
class CompletionStats:
    """Per-completion statistics of one forward pass, each of shape (B,).

    Attributes:
        logps: log-prob of the completion tokens, **summed** over the completion.
        lengths: number of completion tokens (the mask sum), float.
        mean_logits: mean logit over completion tokens and the vocabulary (for metrics).
        entropy: policy entropy **summed** over the completion's tokens (detached), when the
            forward was asked for token metrics; else None.
        top1: completion tokens whose label is the (first) argmax of the logits (detached,
            float), when asked for token metrics; else None.
    """

    logps: Tensor
    lengths: Tensor
    mean_logits: Tensor
    entropy: Tensor | None = None
    top1: Tensor | None = None

    def select(self, rows: Tensor) -> CompletionStats:
        """The statistics of completions ``rows`` (R,) only."""
        pick = lambda x: None if x is None else x[rows]  # noqa: E731
        return CompletionStats(*(pick(getattr(self, f.name)) for f in fields(self)))


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


def completion_stats(logits: Tensor, labels: Tensor, token_metrics: bool = False) -> CompletionStats:
    """Summed completion log-probs from logits and labels.

    Args:
        logits: (B, T, V) model outputs.
        labels: (B, T) target ids, ``IGNORE_INDEX`` on prompt and padding.
        token_metrics: also sum the entropy and the argmax hits over completion tokens (row by
            row, completion positions only: one (T_c, V) temporary at a time).

    Returns:
        :class:`CompletionStats` with (B,) tensors.
    """
    logits, labels = logits[:, :-1], labels[:, 1:]  # position t predicts token t + 1
    mask = labels != IGNORE_INDEX
    safe_labels = labels.masked_fill(~mask, 0)  # any valid id; masked out below
    per_token = token_logps(logits, safe_labels) * mask
    lengths = mask.sum(-1).float()
    logit_sums = (logits.detach().float().mean(-1) * mask).sum(-1)
    stats = CompletionStats(
        logps=per_token.sum(-1),
        lengths=lengths,
        mean_logits=logit_sums / lengths.clamp(min=1.0),
    )
    if token_metrics:
        with torch.no_grad():
            rows = [
                logits_token_stats(y[m], t[m], metrics=True)
                for y, t, m in zip(logits, labels, mask, strict=True)
            ]
            stats.entropy = torch.stack([r.entropy.sum() for r in rows])
            stats.top1 = torch.stack([r.top1.sum() for r in rows])
    return stats


def concatenated_forward(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
    token_metrics: bool = False,
) -> CompletionStats:
    """One forward of every completion in the batch.

    Args:
        model: a HF causal LM (anything returning ``.logits`` of shape (B, T, V)).
        input_ids, attention_mask, labels: (B, T), prompt + completion per row, left or right
            padded. Position ids are derived from the mask so both paddings give the same result.
        token_metrics: see :func:`completion_stats`.
    """
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    ).logits
    return completion_stats(logits, labels, token_metrics)
