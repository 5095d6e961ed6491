"""Token log-probs through the LM head in chunks: the (tokens × vocab) logits never exist in full.

For a Llama-3.2-1B shape (vocab 128 256) one 8-pair DPO step has ~5 000 completion tokens: full
fp32 logits would take 2.6 GB, plus as much again for their gradient. Here the head is applied
``chunk_size`` rows at a time, only the log-prob of the target and the log-sum-exp are kept, and
the backward recomputes each chunk's logits (``softmax = exp(y − lse)``), so peak extra memory
is one (chunk, V) fp32 block (two with soft-capping).

    z = h·W[v] + b[v]                  the head
    y = c · tanh(s·z / c)              the logit transform (s: scale, c: soft-cap; default identity)
    log p(t | h) = y[t] − logsumexp_v y[v]
    ∂/∂y = g · (onehot(t) − softmax(y)),   ∂y/∂z = s · (1 − (y / c)²)

The same chunks give, for free, what TRL 1.16 logs from its fused head (``entropy``,
``mean_token_accuracy``, ``logits/*``): per token the entropy ``logsumexp(y) − Σ p·y``, whether the
target is the (first) argmax, and the mean of ``y`` over the vocabulary — no second head pass.

Why our own kernel rather than ``torch.nn.functional.linear_cross_entropy`` (torch 2.13): it
returns only ``−log p``, so entropy and accuracy would need a second head pass; it has no logit
transform (soft-capping, scales); it does not exist before torch 2.13; and on the SmolLM2 shape
it was no faster on CPU, at the same peak memory (``python -m dpo_lightning.bench.head``,
figures in ``benchmarks/RESULTS.md``; ``benchmarks/gpu_check.sh`` compares them on GPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class LogitTransform:
    """What a model does to its head's output before the softmax: ``y = c·tanh(s·z / c)``.

    Attributes:
        scale: ``s`` (Cohere's ``logit_scale``; Granite divides by ``logits_scaling``).
        softcap: ``c`` (Gemma-2/3 ``final_logit_softcapping``); None: no soft-capping.
    """

    scale: float = 1.0
    softcap: float | None = None

    @property
    def is_identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None

    def __call__(self, z: Tensor) -> Tensor:
        """``y`` from ``z`` (differentiable; not in place)."""
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    def apply_(self, z: Tensor) -> Tensor:
        """``y`` from ``z`` in place (the kernel's buffers)."""
        if self.scale != 1.0:
            z.mul_(self.scale)
        if self.softcap is not None:
            z.div_(self.softcap).tanh_().mul_(self.softcap)
        return z

    def derivative_(self, y: Tensor) -> Tensor:
        """``∂y/∂z`` from ``y``, in place over ``y``: ``s·(1 − (y/c)²)`` (soft-capped only)."""
        y.div_(self.softcap).square_().neg_().add_(1.0)
        return y.mul_(self.scale) if self.scale != 1.0 else y


IDENTITY = LogitTransform()

#: Config keys of post-head logit transforms -> the part of the transform each sets (the keys TRL
#: 1.16's fused head reads). The packed engine checks the result against the padded engine once per
#: model (:func:`dpo_lightning.engine.support.probe_mismatch`), so a model that uses a key
#: otherwise (or transforms its logits in an unlisted way) falls back to the padded engine.
TRANSFORM_KEYS: dict[str, Any] = {
    "final_logit_softcapping": lambda v: {"softcap": float(v)},
    "logit_scale": lambda v: {"scale": float(v)},  # Cohere: logits * logit_scale
    "output_multiplier": lambda v: {"scale": float(v)},  # Muse Glimmer, before the soft-cap
    "lm_head_multiplier": lambda v: {"scale": float(v)},  # Falcon-H1
    "logits_scaling": lambda v: {"scale": 1.0 / float(v)},  # Granite: logits / logits_scaling
}


def transform_from_config(config: Any) -> LogitTransform:
    """The :class:`LogitTransform` a HF config declares (identity when it declares none)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale, softcap = 1.0, None
    for key, part in TRANSFORM_KEYS.items():
        value = getattr(text, key, None)
        if value is not None:
            found = part(value)
            scale *= found.get("scale", 1.0)
            softcap = found.get("softcap", softcap)
    return LogitTransform(scale=scale, softcap=softcap)


@dataclass
class TokenStats:
    """Per predicted token, each (M,) fp32 (``entropy`` and ``top1`` only when asked for).

    Attributes:
        logps: log p(target), differentiable.
        mean_logits: the mean of y over the vocabulary (detached).
        entropy: −Σ_v p log p (detached), or None.
        top1: 1.0 where the target is the first argmax of y (detached), or None.
    """

    logps: Tensor
    mean_logits: Tensor
    entropy: Tensor | None = None
    top1: Tensor | None = None


def _logits_into(out: Tensor, h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``out[:n] = h @ W.T (+ b)`` as fp32, reusing ``out`` (a page-faulted buffer on CPU)."""
    buf = out[: h.shape[0]]
    if weight.dtype == torch.float32 and h.dtype == torch.float32:
        torch.mm(h, weight.t(), out=buf)
    else:
        buf.copy_(h @ weight.t())
    if bias is not None:
        buf.add_(bias)
    return buf


class _LinearTokenStats(torch.autograd.Function):
    """Custom autograd for ``log_softmax(T(h @ W.T + b))[target]`` computed chunk by chunk."""

    # Under bf16-mixed autocast the backward runs in the forward's autocast state (bf16 matmuls).
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, hidden, weight, bias, targets, chunk_size, transform, metrics):  # type: ignore[override]
        m = hidden.shape[0]
        out = torch.empty(m, dtype=torch.float32, device=hidden.device)
        lse, sums = torch.empty_like(out), torch.empty_like(out)
        entropy = torch.empty_like(out) if metrics else out.new_empty(0)
        top1 = torch.empty_like(out) if metrics else out.new_empty(0)
        buf = out.new_empty(min(chunk_size, m), weight.shape[0])
        for s in range(0, m, chunk_size):
            e, t = s + min(chunk_size, m - s), targets[s : s + chunk_size]
            y = transform.apply_(_logits_into(buf, hidden[s:e], weight, bias))  # (n, V) fp32
            out[s:e] = y.gather(-1, t[:, None]).squeeze(-1)
            sums[s:e] = y.mean(-1)
            if metrics:
                top1[s:e] = (y.argmax(-1) == t).float()
            peak = y.amax(-1, keepdim=True)
            y.sub_(peak)  # y − max: exp cannot overflow
            if metrics:
                p = torch.exp(y)
                total = p.sum(-1)
                # H = log Σe − Σ e·(y − max) / Σe, the dot product without an (n, V) temporary
                dot = torch.bmm(p[:, None, :], y[:, :, None]).view(-1)
                entropy[s:e] = total.log() - dot / total
            else:
                total = y.exp_().sum(-1)
            lse[s:e] = total.log() + peak.squeeze(-1)
        out -= lse
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk_size, ctx.transform = chunk_size, transform
        ctx.mark_non_differentiable(sums, entropy, top1)
        return out, sums, entropy, top1

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_out, *_):  # type: ignore[override]
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        transform, chunk = ctx.transform, ctx.chunk_size
        m = hidden.shape[0]
        grad_h = torch.empty_like(hidden) if need_h else None
        # fp32 accumulators: bf16 sums over thousands of tokens lose the small per-token terms.
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b and bias is not None else None
        buf = lse.new_empty(min(chunk, m), weight.shape[0])
        for s in range(0, m, chunk):
            e = s + min(chunk, m - s)
            h, g = hidden[s:e], grad_out[s:e].float()
            y = transform.apply_(_logits_into(buf, h, weight, bias))
            slope = transform.derivative_(y.clone()) if transform.softcap is not None else None
            grad = y.sub_(lse[s:e, None]).exp_().mul_(-g[:, None])  # −g·softmax, in place
            grad.scatter_add_(-1, targets[s:e, None], g[:, None])
            if slope is not None:
                grad.mul_(slope)
            elif transform.scale != 1.0:
                grad.mul_(transform.scale)
            if grad_b is not None:
                grad_b += grad.sum(0)
            low = grad.to(weight.dtype)
            if grad_h is not None:
                grad_h[s:e] = low @ weight
            if grad_w is not None:
                if low.dtype == torch.float32 and h.dtype == torch.float32:
                    grad_w.addmm_(low.t(), h)
                else:
                    grad_w += (low.t() @ h).float()
        grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
        grad_b = grad_b.to(bias.dtype) if grad_b is not None else None
        return grad_h, grad_w, grad_b, None, None, None, None


def linear_token_stats(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    chunk_size: int,
    transform: LogitTransform = IDENTITY,
    metrics: bool = False,
) -> TokenStats:
    """:class:`TokenStats` of ``targets`` under a linear LM head, chunked in forward and backward.

    Args:
        hidden: (M, H) final hidden states, one row per predicted token.
        weight: (V, H) head weight (tied or not); bias: (V,) or None.
        targets: (M,) token ids.
        chunk_size: rows of logits alive at once.
        transform: the model's post-head logit transform.
        metrics: also compute ``entropy`` and ``top1``.

    Returns:
        (M,) fp32 statistics; ``logps`` differentiable w.r.t. ``hidden``, ``weight``, ``bias``.
    """
    if hidden.shape[0] == 0:
        return _empty_stats(hidden, metrics)
    logps, sums, entropy, top1 = _LinearTokenStats.apply(
        hidden, weight, bias, targets, max(int(chunk_size), 1), transform, metrics
    )
    return TokenStats(logps, sums, entropy if metrics else None, top1 if metrics else None)


def linear_token_logps(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    chunk_size: int,
    transform: LogitTransform = IDENTITY,
) -> Tensor:
    """(M,) fp32 log-probs of ``targets``: :func:`linear_token_stats` without the metrics."""
    return linear_token_stats(hidden, weight, bias, targets, chunk_size, transform).logps


def logits_token_stats(y: Tensor, targets: Tensor, metrics: bool = False) -> TokenStats:
    """:class:`TokenStats` from transformed logits (..., V) and targets (...): the plain
    computation (the padded engine, heads that are not a plain ``nn.Linear``)."""
    y = y.float()
    lse = torch.logsumexp(y, dim=-1)
    logps = y.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    with torch.no_grad():
        sums = y.mean(-1)
        if not metrics:
            return TokenStats(logps, sums)
        entropy = lse - (torch.softmax(y, dim=-1) * y).sum(-1)
        top1 = (y.argmax(-1) == targets).float()
    return TokenStats(logps, sums, entropy, top1)


def head_token_stats(
    head: nn.Module,
    hidden: Tensor,
    targets: Tensor,
    chunk_size: int | None,
    transform: LogitTransform = IDENTITY,
    metrics: bool = False,
) -> TokenStats:
    """(M,) :class:`TokenStats` of ``targets`` from hidden states (M, H) through the output head.

    A plain ``nn.Linear`` head uses the custom chunked autograd above. Any other head (a LoRA
    wrapped ``lm_head``) is applied per chunk under activation checkpointing, which also keeps
    only one chunk of logits alive; its metrics come from the same chunk. ``chunk_size=None``:
    one chunk.
    """
    chunk = chunk_size or max(hidden.shape[0], 1)
    if type(head) is nn.Linear:
        return linear_token_stats(hidden, head.weight, head.bias, targets, chunk, transform, metrics)
    parts = [
        checkpoint(_head_chunk, head, h, t, transform, metrics, use_reentrant=False)
        if torch.is_grad_enabled()
        else _head_chunk(head, h, t, transform, metrics)
        for h, t in zip(hidden.split(chunk), targets.split(chunk), strict=True)
    ]
    if not parts:
        return _empty_stats(hidden, metrics)
    cat = [torch.cat(col) if col[0] is not None else None for col in zip(*parts, strict=True)]
    return TokenStats(*cat)


def _empty_stats(hidden: Tensor, metrics: bool) -> TokenStats:
    """No predicted token: (0,) statistics, still connected to the graph (backward works)."""
    empty = hidden.float().sum(-1) * 0.0
    none = empty.detach()
    return TokenStats(empty, none, none if metrics else None, none if metrics else None)


def _head_chunk(head: nn.Module, hidden: Tensor, targets: Tensor, transform: LogitTransform, metrics: bool):
    s = logits_token_stats(transform(head(hidden)), targets, metrics)
    return s.logps, s.mean_logits, s.entropy, s.top1


def head_token_logps(
    head: nn.Module,
    hidden: Tensor,
    targets: Tensor,
    chunk_size: int | None,
    transform: LogitTransform = IDENTITY,
) -> Tensor:
    """(M,) log-probs of ``targets``: :func:`head_token_stats` without the metrics."""
    return head_token_stats(head, hidden, targets, chunk_size, transform).logps


def log_sum_sq_probs(y: Tensor) -> Tensor:
    """``log Σ_v softmax(y)_v²`` per position, in fp32, no gradient: (..., V) -> (...).

    ``= logsumexp(2 y) − 2 logsumexp(y)``: WPO's alignment term (TRL 1.16 ``log_sum_sq_probs``).
    """
    with torch.no_grad():
        y = y.float()
        return torch.logsumexp(2 * y, dim=-1) - 2 * torch.logsumexp(y, dim=-1)


def head_log_sum_sq_probs(
    head: nn.Module, hidden: Tensor, chunk_size: int | None, transform: LogitTransform = IDENTITY
) -> Tensor:
    """(M,) ``log Σ_v p(v)²`` per hidden state (M, H), no gradient, one (chunk, V) block at a time.

    A separate no-grad pass over the head (one more head forward), run only when a loss asks for
    it (WPO weights); never the full (M, V) logits.
    """
    chunk = chunk_size or max(hidden.shape[0], 1)
    with torch.no_grad():
        parts = [log_sum_sq_probs(transform(head(h))) for h in hidden.split(chunk)]
        return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
