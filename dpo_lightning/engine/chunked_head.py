"""Token log-probs through the LM head in chunks: the (tokens × vocab) logits never exist in full.

For a Llama-3.2-1B shape (vocab 128 256) one 8-pair DPO step has ~5 000 completion tokens: full
fp32 logits would take 2.6 GB, plus as much again for their gradient. Here the head is applied
``chunk_size`` rows at a time, only the log-prob of the target and the log-sum-exp are kept, and
the backward recomputes each chunk's logits (``softmax = exp(logits − lse)``), so peak extra memory
is one (chunk, V) fp32 block.

    log p(t | h) = (h·W[t] + b[t]) − logsumexp_v (h·W[v] + b[v])
    ∂/∂logits = g · (onehot(t) − softmax(logits))
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dpo_lightning.engine.logps import log_sum_sq_probs, token_logps


def _chunk_logits(h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """(n, H) @ (V, H)^T (+ b) in the weights' dtype, returned as fp32 (n, V)."""
    logits = h @ weight.t()
    if bias is not None:
        logits = logits + bias
    return logits.float()


class _LinearTokenLogps(torch.autograd.Function):
    """Custom autograd for ``log_softmax(h @ W.T + b)[target]`` computed chunk by chunk."""

    # Under bf16-mixed autocast the backward runs in the forward's autocast state (bf16 matmuls).
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, hidden, weight, bias, targets, chunk_size):  # type: ignore[override]
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        for s in range(0, hidden.shape[0], chunk_size):
            logits = _chunk_logits(hidden[s : s + chunk_size], weight, bias)  # (n, V) fp32
            lse[s : s + chunk_size] = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(-1, targets[s : s + chunk_size, None]).squeeze(-1)
            out[s : s + chunk_size] = picked - lse[s : s + chunk_size]
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_out):  # type: ignore[override]
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        # fp32 accumulators: bf16 sums over thousands of tokens lose the small per-token terms.
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b and bias is not None else None
        for s in range(0, hidden.shape[0], ctx.chunk_size):
            h = hidden[s : s + ctx.chunk_size]
            g = grad_out[s : s + ctx.chunk_size].float()
            logits = _chunk_logits(h, weight, bias)
            grad_logits = -torch.exp(logits - lse[s : s + ctx.chunk_size, None]) * g[:, None]
            grad_logits.scatter_add_(-1, targets[s : s + ctx.chunk_size, None], g[:, None])
            if grad_b is not None:
                grad_b += grad_logits.sum(0)
            grad_logits = grad_logits.to(weight.dtype)
            if grad_h is not None:
                grad_h[s : s + ctx.chunk_size] = grad_logits @ weight
            if grad_w is not None:
                grad_w += (grad_logits.t() @ h).float()
        grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
        grad_b = grad_b.to(bias.dtype) if grad_b is not None else None
        return grad_h, grad_w, grad_b, None, None


def linear_token_logps(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk_size: int
) -> Tensor:
    """fp32 log-probs of ``targets`` under a linear LM head, chunked in forward and backward.

    Args:
        hidden: (M, H) final hidden states, one row per predicted token.
        weight: (V, H) head weight (tied or not); bias: (V,) or None.
        targets: (M,) token ids.
        chunk_size: rows of logits alive at once.

    Returns:
        (M,) fp32 log-probs, differentiable w.r.t. ``hidden``, ``weight`` and ``bias``.
    """
    return _LinearTokenLogps.apply(hidden, weight, bias, targets, chunk_size)


def head_token_logps(head: nn.Module, hidden: Tensor, targets: Tensor, chunk_size: int | None) -> Tensor:
    """(M,) log-probs of ``targets`` from hidden states (M, H) through the model's output head.

    A plain ``nn.Linear`` head uses the custom chunked autograd above. Any other head (a LoRA
    wrapped ``lm_head``, a soft-capped one) is applied per chunk under activation checkpointing,
    which also keeps only one chunk of logits alive. ``chunk_size=None``: one chunk.
    """
    chunk = chunk_size or max(hidden.shape[0], 1)
    if type(head) is nn.Linear:
        return linear_token_logps(hidden, head.weight, head.bias, targets, chunk)
    parts = [
        checkpoint(_head_chunk, head, hidden[s : s + chunk], targets[s : s + chunk], use_reentrant=False)
        if torch.is_grad_enabled()
        else _head_chunk(head, hidden[s : s + chunk], targets[s : s + chunk])
        for s in range(0, hidden.shape[0], chunk)
    ]
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def _head_chunk(head: nn.Module, hidden: Tensor, targets: Tensor) -> Tensor:
    return token_logps(head(hidden), targets)


def head_mean_logits(head: nn.Module, hidden: Tensor) -> Tensor:
    """(M,) mean logit over the vocabulary, detached (a metric): ``h · mean_v W[v] + mean(b)``.

    Linear in ``h``, so it needs no (M, V) logits at all; other heads are applied in chunks.
    """
    with torch.no_grad():
        if type(head) is nn.Linear:
            mean = hidden.float() @ head.weight.mean(0, dtype=torch.float32)
            return mean + (head.bias.float().mean() if head.bias is not None else 0.0)
        parts = [head(h).float().mean(-1) for h in hidden.split(1024)]
        return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def head_log_sum_sq_probs(head: nn.Module, hidden: Tensor, chunk_size: int | None) -> Tensor:
    """(M,) ``log Σ_v p(v)²`` per hidden state (M, H), no gradient, one (chunk, V) block at a time.

    A separate no-grad pass over the head (one more head forward), run only when a loss asks for
    it (WPO weights); never the full (M, V) logits.
    """
    chunk = chunk_size or max(hidden.shape[0], 1)
    with torch.no_grad():
        parts = [log_sum_sq_probs(head(h)) for h in hidden.split(chunk)]
        return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
