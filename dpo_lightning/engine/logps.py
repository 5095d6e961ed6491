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
from dpo_lightning.engine.chunked_head import log_sum_sq_probs, logits_token_stats

#: The optional output that adds ``entropy`` and ``top1`` (TRL's ``entropy`` /
#: ``mean_token_accuracy``), from the forward's own logits: no second head pass.
TOKEN_METRICS = "token_metrics"
#: Optional outputs an engine computes only when the step asks for them (``EngineBatch.outputs``).
OPTIONAL_OUTPUTS = frozenset({"token_logps", "log_sum_sq_probs", TOKEN_METRICS})


@dataclass
class CompletionStats:
    """Per-completion statistics of one forward pass, each of shape (B,) unless said otherwise.

    Attributes:
        logps: log-prob of the completion tokens, **summed** over the completion.
        lengths: number of completion tokens (the mask sum), float.
        mean_logits: mean logit over completion tokens and the vocabulary, after the model's
            logit transform (for metrics).
        token_logps: only when asked for (``"token_logps"``): (M,) the log-prob of every
            completion token, completion 0's ``lengths[0]`` tokens first, each completion in
            position order; differentiable like ``logps`` (LD-DPO splits it at a length).
        log_sum_sq_probs: only when asked for (``"log_sum_sq_probs"``): (B,)
            ``Σ_t log Σ_v p_t(v)²`` over the completion's tokens, detached (WPO's weight
            alignment, https://arxiv.org/abs/2406.11827).
        entropy: only when asked for (``"token_metrics"``): policy entropy **summed** over the
            completion's tokens (detached).
        top1: only when asked for (``"token_metrics"``): completion tokens whose label is the
            (first) argmax of the logits (detached, float).
    """

    logps: Tensor
    lengths: Tensor
    mean_logits: Tensor
    token_logps: Tensor | None = None
    log_sum_sq_probs: Tensor | None = None
    entropy: Tensor | None = None
    top1: Tensor | None = None

    def select(self, rows: Tensor) -> CompletionStats:
        """The statistics of completions ``rows`` (R,) only."""
        pick = lambda x: None if x is None else x[rows]  # noqa: E731
        tokens = None
        if self.token_logps is not None:
            tokens = self.token_logps[segment_index(self.offsets()[rows], self.lengths[rows].long())]
        return CompletionStats(
            pick(self.logps),
            pick(self.lengths),
            pick(self.mean_logits),
            tokens,
            pick(self.log_sum_sq_probs),
            pick(self.entropy),
            pick(self.top1),
        )

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
    stats = CompletionStats(
        logps=per_token.sum(-1),
        lengths=lengths,
        mean_logits=logit_sums / lengths.clamp(min=1.0),
        # Row-major over the mask: completion by completion, each in position order.
        token_logps=per_token[mask] if "token_logps" in outputs else None,
        log_sum_sq_probs=(log_sum_sq_probs(logits) * mask).sum(-1) if "log_sum_sq_probs" in outputs else None,
    )
    if TOKEN_METRICS in outputs:
        with torch.no_grad():  # row by row, completion positions only: one (T_c, V) temporary at a time
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
