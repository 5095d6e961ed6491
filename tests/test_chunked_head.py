"""The chunked LM head: log-probs, gradients and TRL's token metrics equal the full-logits
computation, with and without a post-head logit transform (soft-capping, scales)."""

from __future__ import annotations

import pytest
import torch

from dpo_lightning.engine.chunked_head import (
    IDENTITY,
    LogitTransform,
    head_token_stats,
    linear_token_stats,
    transform_from_config,
)

TRANSFORMS = [
    IDENTITY,
    LogitTransform(softcap=2.0),
    LogitTransform(scale=0.5),
    LogitTransform(scale=3.0, softcap=1.5),
]


def _naive(y: torch.Tensor, t: torch.Tensor):
    """Full log-softmax of the transformed logits: log-probs, entropy, argmax hit, mean logit."""
    logp = torch.log_softmax(y, -1)
    return (
        logp.gather(-1, t[:, None]).squeeze(-1),
        -(logp.exp() * logp).sum(-1),
        (y.argmax(-1) == t).to(y.dtype),
        y.mean(-1),
    )


def _problem(seed=0):
    torch.manual_seed(seed)
    h = torch.randn(11, 8, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(8, 13, dtype=torch.float64)
    t = torch.randint(0, 13, (11,))
    with torch.no_grad():  # about half the targets are the argmax: the accuracy is not trivially 0
        t[::2] = head(h[::2]).argmax(-1)
    return h, head, t, torch.randn(11, dtype=torch.float64)


@pytest.mark.parametrize("transform", TRANSFORMS, ids=["identity", "softcap", "scale", "scale+softcap"])
def test_linear_head_stats_and_grads_match_full_logits(transform):
    """Custom autograd, chunks of 4 rows over 11 (the last one short), a bias: every statistic
    and the gradients w.r.t. hidden, weight and bias equal autograd through full logits."""
    h, head, t, g = _problem()
    y = transform(head(h))
    want = _naive(y, t)
    want_grads = torch.autograd.grad((want[0] * g).sum(), [h, head.weight, head.bias])
    got = linear_token_stats(h, head.weight, head.bias, t, chunk_size=4, transform=transform, metrics=True)
    got_grads = torch.autograd.grad((got.logps * g).sum(), [h, head.weight, head.bias])
    for a, b in zip((got.logps, got.entropy, got.top1, got.mean_logits), want, strict=True):
        torch.testing.assert_close(a, b.float())
    assert 0 < got.top1.sum() < 11
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("transform", TRANSFORMS[:2], ids=["identity", "softcap"])
def test_other_heads_use_checkpointed_chunks_with_the_same_stats(transform):
    """A head that is not a plain ``nn.Linear`` (a LoRA wrapper, here a Sequential) gives the same
    statistics and gradients through checkpointed chunks."""
    h, head, t, g = _problem(1)
    wrapped = torch.nn.Sequential(head)
    want = _naive(transform(head(h)), t)
    want_grads = torch.autograd.grad((want[0] * g).sum(), [h, head.weight])
    got = head_token_stats(wrapped, h, t, chunk_size=3, transform=transform, metrics=True)
    got_grads = torch.autograd.grad((got.logps * g).sum(), [h, head.weight])
    for a, b in zip((got.logps, got.entropy, got.top1, got.mean_logits), want, strict=True):
        torch.testing.assert_close(a, b.float())
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b.float() if a.dtype == torch.float32 else b, atol=1e-6, rtol=1e-5)


def test_metrics_are_optional_and_empty_inputs_work():
    h, head, t, _ = _problem()
    plain = linear_token_stats(h.float(), head.weight.float(), None, t, chunk_size=5)
    assert plain.entropy is None and plain.top1 is None
    empty = head_token_stats(head.float(), torch.zeros(0, 8, requires_grad=True), t[:0], 4, metrics=True)
    assert empty.logps.shape == (0,) and empty.entropy.shape == (0,)
    empty.logps.sum().backward()  # still connected to the graph


def test_transform_from_config_worked_examples():
    """Gemma-2 soft-caps at 30 (y = 30·tanh(z/30)), Cohere multiplies by 0.0625, Granite divides
    by 8 (y = z/8), Llama does nothing."""
    from transformers import CohereConfig, Gemma2Config, GraniteConfig, LlamaConfig

    assert transform_from_config(Gemma2Config(final_logit_softcapping=30.0)) == LogitTransform(softcap=30.0)
    assert transform_from_config(CohereConfig(logit_scale=0.0625)) == LogitTransform(scale=0.0625)
    assert transform_from_config(GraniteConfig(logits_scaling=8.0)) == LogitTransform(scale=0.125)
    assert transform_from_config(LlamaConfig()).is_identity
    y = LogitTransform(softcap=30.0)(torch.tensor([0.0, 30.0, -60.0]))
    torch.testing.assert_close(y, torch.tensor([0.0, 30 * 0.7615942, -30 * 0.9640276]))
