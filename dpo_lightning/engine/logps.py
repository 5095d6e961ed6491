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

#: Optional outputs an engine computes only when the step asks for them (``EngineBatch.outputs``).
OPTIONAL_OUTPUTS = frozenset({"token_logps", "log_sum_sq_probs"})


@dataclass
class CompletionStats:
    """Per-completion statistics of one forward pass, each of shape (B,) unless said otherwise.

    Attributes:
        logps: log-prob of the completion tokens, **summed** over the completion.
        lengths: number of completion tokens (the mask sum), float.
        mean_logits: mean raw logit over completion tokens and the vocabulary (for metrics).
        token_logps: only when asked for (``"token_logps"``): (M,) the log-prob of every
            completion token, completion 0's ``lengths[0]`` tokens first, each completion in
            position order; differentiable like ``logps`` (LD-DPO splits it at a length).
        log_sum_sq_probs: only when asked for (``"log_sum_sq_probs"``): (B,)
            ``Σ_t log Σ_v p_t(v)²`` over the completion's tokens, detached (WPO's weight
            alignment, https://arxiv.org/abs/2406.11827).
    """

    logps: Tensor
    lengths: Tensor
    mean_logits: Tensor
    token_logps: Tensor | None = None
    log_sum_sq_probs: Tensor | None = None

    def select(self, rows: Tensor) -> CompletionStats:
        """The statistics of completions ``rows`` (R,) only."""
        tokens = None
        if self.token_logps is not None:
            tokens = self.token_logps[segment_index(self.offsets()[rows], self.lengths[rows].long())]
        sq = None if self.log_sum_sq_probs is None else self.log_sum_sq_probs[rows]
        return CompletionStats(self.logps[rows], self.lengths[rows], self.mean_logits[rows], tokens, sq)

    def offsets(self) -> Tensor:
        """(B,) where each completion's tokens start in ``token_logps``."""
        lengths = self.lengths.long()
        return torch.cumsum(lengths, 0) - lengths

    def prefix_logps(self, rows: Tensor, n: Tensor) -> Tensor:
        """(R,) log-prob of the first ``n[i]`` tokens of completion ``rows[i]`` (``n`` ≤ its length).

        A completion in several pairs (K-wise rankings) gets a prefix per pair. Differences of a
        float64 running sum, so the prefix of a long batch keeps fp32 precision; differentiable.
        """
        if self.token_logps is None:
            raise ValueError(
                "per-token log-probs were not computed for this forward (a cached reference holds "
                "summed log-probs only): use a reference that runs a model (reference=copy)"
            )
        running = self.token_logps.double().cumsum(0)
        running = torch.cat([running.new_zeros(1), running])  # running[k] = Σ of the first k tokens
        start = self.offsets()[rows]
        return (running[start + n.long()] - running[start]).to(self.token_logps.dtype)


def segment_index(starts: Tensor, lengths: Tensor) -> Tensor:
    """Indices ``starts[i] .. starts[i] + lengths[i] - 1`` of every segment, concatenated: (Σ lengths,)."""
    within = torch.arange(int(lengths.sum()), device=lengths.device) - torch.repeat_interleave(
        torch.cumsum(lengths, 0) - lengths, lengths
    )
    return torch.repeat_interleave(starts, lengths) + within


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


def log_sum_sq_probs(logits: Tensor) -> Tensor:
    """``log Σ_v softmax(logits)_v²`` per position, in fp32, no gradient: (..., V) -> (...).

    ``= logsumexp(2 z) − 2 logsumexp(z)``: WPO's alignment term (TRL 1.16 ``log_sum_sq_probs``).
    """
    with torch.no_grad():
        z = logits.float()
        return torch.logsumexp(2 * z, dim=-1) - 2 * torch.logsumexp(z, dim=-1)


def completion_stats(
    logits: Tensor, labels: Tensor, outputs: frozenset[str] = frozenset()
) -> CompletionStats:
    """Summed completion log-probs from logits and labels.

    Args:
        logits: (B, T, V) model outputs.
        labels: (B, T) target ids, ``IGNORE_INDEX`` on prompt and padding.
        outputs: optional statistics to add (:data:`OPTIONAL_OUTPUTS`).

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
        # Row-major over the mask: completion by completion, each in position order.
        token_logps=per_token[mask] if "token_logps" in outputs else None,
        log_sum_sq_probs=(log_sum_sq_probs(logits) * mask).sum(-1) if "log_sum_sq_probs" in outputs else None,
    )


def concatenated_forward(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
    outputs: frozenset[str] = frozenset(),
) -> CompletionStats:
    """One forward of every completion in the batch.

    Args:
        model: a HF causal LM (anything returning ``.logits`` of shape (B, T, V)).
        input_ids, attention_mask, labels: (B, T), prompt + completion per row, left or right
            padded. Position ids are derived from the mask so both paddings give the same result.
        outputs: optional statistics to add (:data:`OPTIONAL_OUTPUTS`).
    """
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    ).logits
    return completion_stats(logits, labels, outputs)
