"""Optional engine outputs (per-token log-probs for LD-DPO, ``Σ log Σ p²`` for WPO): equal to a
naive computation, equal between the padded and packed engines (and so the LD-DPO / WPO losses and
gradients), computed only when asked for, and never as (tokens × vocab) logits in the packed one."""

from __future__ import annotations

import pytest
import torch

from dpo_lightning.data.collate import PreferenceCollator
from dpo_lightning.engine import CompletionStats, EngineBatch, PackedEngine, PaddedEngine
from dpo_lightning.losses import IPOLoss, LDDPOLoss, WPOWeighting
from tests.conftest import make_tiny_model
from tests.test_engine import V, _examples, _loss_and_grads

BOTH = frozenset({"token_logps", "log_sum_sq_probs"})


def naive(model, ex):
    """Per completion: the per-token log-probs and Σ_t log Σ_v p_t(v)², one unpadded row at a time."""
    tokens, sq = [], []
    for e in ex:
        for comp in e["completion_ids"]:
            ids = torch.tensor([e["prompt_ids"] + comp])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            n = len(e["prompt_ids"])
            steps = range(n, n + len(comp))
            tokens.append(torch.stack([logp[s - 1, ids[0, s]] for s in steps]))
            sq.append(sum(torch.logsumexp(2 * logp[s - 1], -1) for s in steps))
    return tokens, torch.stack(sq)


ENGINES = [
    (PaddedEngine(), "right"),
    (PaddedEngine(), "left"),
    (PackedEngine(prefix_sharing=True, chunk_size=3), "right"),
    (PackedEngine(prefix_sharing=False, chunk_size=None), "right"),
]


@pytest.mark.parametrize(
    ("engine", "side"), ENGINES, ids=["padded-right", "padded-left", "packed", "packed-flat"]
)
def test_optional_outputs_equal_naive(engine, side):
    model = make_tiny_model(V).requires_grad_(False)
    ex = _examples((2, 3, 2), seed=4)
    collate = PreferenceCollator(0, side) if isinstance(engine, PaddedEngine) else engine.collator(0)
    got = engine(model, EngineBatch(collate(ex), outputs=BOTH))
    tokens, sq = naive(model, ex)
    torch.testing.assert_close(got.token_logps, torch.cat(tokens), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.log_sum_sq_probs, sq, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.lengths, torch.tensor([float(len(x)) for x in tokens]))
    # prefix sums per (completion, n), and a selection keeps each completion's own tokens
    rows, n = torch.tensor([4, 0, 4]), torch.tensor([1, 2, 3])
    want = torch.stack([tokens[r][:k].sum() for r, k in zip(rows.tolist(), n.tolist(), strict=True)])
    torch.testing.assert_close(got.prefix_logps(rows, n), want, atol=1e-5, rtol=1e-5)
    sub = got.select(torch.tensor([5, 1]))
    torch.testing.assert_close(sub.token_logps, torch.cat([tokens[5], tokens[1]]), atol=1e-5, rtol=1e-5)
    # nothing asked, nothing computed
    plain = engine(model, collate(ex))
    assert plain.token_logps is None and plain.log_sum_sq_probs is None


def test_prefix_logps_hand_worked():
    """Completions [−1, −2, −3] and [−4, −5]: first 2 tokens of 0 = −3, first 1 of 1 = −4."""
    stats = CompletionStats(
        logps=torch.tensor([-6.0, -9.0]),
        lengths=torch.tensor([3.0, 2.0]),
        mean_logits=torch.zeros(2),
        token_logps=torch.tensor([-1.0, -2.0, -3.0, -4.0, -5.0]),
    )
    torch.testing.assert_close(
        stats.prefix_logps(torch.tensor([0, 1, 0]), torch.tensor([2, 1, 0])), torch.tensor([-3.0, -4.0, 0.0])
    )
    with pytest.raises(ValueError, match="per-token log-probs were not computed"):
        CompletionStats(stats.logps, stats.lengths, stats.mean_logits).prefix_logps(
            torch.tensor([0]), torch.tensor([1])
        )


@pytest.mark.parametrize(
    "loss", [LDDPOLoss(beta=0.5, alpha=0.3), WPOWeighting(IPOLoss(beta=0.5))], ids=["ld_dpo", "wpo"]
)
@pytest.mark.parametrize("ks", [(2, 2, 2), (3, 2)], ids=["pairs", "k-wise"])
def test_packed_ld_dpo_and_wpo_steps_equal_padded(loss, ks):
    """A full step (policy + reference through one engine): loss and every gradient as padded."""
    ex = _examples(ks, seed=5)
    want_loss, want_grads = _loss_and_grads(PaddedEngine(), PreferenceCollator(0, "left")(ex), loss=loss)
    engine = PackedEngine(prefix_sharing=True, chunk_size=4)
    got_loss, got_grads = _loss_and_grads(engine, engine.collator(0)(ex), loss=loss)
    assert want_loss.abs() > 1e-4
    torch.testing.assert_close(got_loss, want_loss, atol=1e-6, rtol=1e-5)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_packed_head_never_sees_more_than_a_chunk():
    """The only head calls the optional outputs add are (chunk, V) blocks under no_grad; the
    per-token log-probs are the chunked head's own output (the model's own forward calls the head
    module on no position at all: ``logits_to_keep`` is empty)."""
    model = make_tiny_model(V).requires_grad_(False)
    head = model.get_output_embeddings()
    rows = []
    head.register_forward_hook(lambda mod, args, out: rows.append(out.reshape(-1, out.shape[-1]).shape[0]))
    engine = PackedEngine(chunk_size=3)
    ex = _examples((3, 3, 2), seed=6)
    stats = engine(model, EngineBatch(engine.collator(0)(ex), outputs=BOTH))
    assert int(stats.lengths.sum()) > 3 and rows and max(rows) <= 3
    rows.clear()
    engine(model, EngineBatch(engine.collator(0)(ex), outputs=frozenset({"token_logps"})))
    assert rows == [0]  # the model's forward, on no position


def test_softcapped_model_optional_outputs_packed_equal_padded():
    """Gemma-2's final-logit soft-capping: the packed head applies it per chunk to every optional
    output too (WPO's Σ log Σ p², per-token log-probs, token metrics), as the padded model does."""
    from dpo_lightning.engine.logps import TOKEN_METRICS
    from tests.test_engine_auto import _gemma2

    model = _gemma2().requires_grad_(False)
    ex = _examples((2, 3, 2), seed=7)
    every = BOTH | {TOKEN_METRICS}
    padded = PaddedEngine()(model, EngineBatch(PreferenceCollator(0)(ex), outputs=every))
    packed_engine = PackedEngine(chunk_size=4)
    packed = packed_engine(model, EngineBatch(packed_engine.collator(0)(ex), outputs=every))
    for name in ("logps", "token_logps", "log_sum_sq_probs", "mean_logits", "entropy", "top1"):
        torch.testing.assert_close(getattr(packed, name), getattr(padded, name), atol=1e-5, rtol=1e-5)
