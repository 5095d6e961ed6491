"""``logits/chosen`` / ``logits/rejected`` with TRL 1.16's definition, for both engines.

TRL 1.16 (``DPOTrainer._compute_loss``): the sum, over every completion token of the batch's
chosen (rejected) completions, of the mean logit over the vocabulary, divided by the number of
those tokens; a token-weighted mean, not the mean of per-sequence means.
"""

from __future__ import annotations

import pytest
import torch

from dpo_lightning.data.collate import IGNORE_INDEX, PreferenceCollator
from dpo_lightning.engine import PackedEngine, PaddedEngine
from dpo_lightning.losses import DPOLoss
from dpo_lightning.stages.dpo import DPOModule
from dpo_lightning.stages.metrics import token_mean_logits
from tests.conftest import make_tiny_model

V = 97


def test_token_weighted_mean_worked_example():
    """Completions of 1 and 3 tokens, per-token mean logits [4] and [0, 0, 0]:
    TRL 1.16 gives (4 + 0 + 0 + 0) / 4 = 1; the mean of sequence means would give (4 + 0) / 2 = 2."""
    per_sequence_mean = torch.tensor([4.0, 0.0])
    lengths = torch.tensor([1.0, 3.0])
    torch.testing.assert_close(token_mean_logits(per_sequence_mean, lengths), torch.tensor(1.0))
    assert per_sequence_mean.mean().item() == 2.0  # the old definition
    assert token_mean_logits(torch.zeros(2), torch.zeros(2)).item() == 0.0  # no tokens: 0, as TRL


def _examples():
    """Three pairs whose chosen completions have 1, 6 and 3 tokens: the two means differ."""
    g = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(3, V, (n,), generator=g).tolist()

    return [
        {"prompt_ids": ids(p), "completion_ids": [ids(c), ids(r)], "pairs": [[0, 1]], "row_id": i}
        for i, (p, c, r) in enumerate([(4, 1, 5), (2, 6, 2), (7, 3, 4)])
    ]


def _naive(model, examples) -> dict[str, float]:
    """Full logits of the padded batch; every chosen (rejected) completion token's logits over
    the vocabulary, pooled, then one mean."""
    batch = PreferenceCollator(0, "right")(examples)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits, labels = logits[:, :-1], batch["labels"][:, 1:]  # position t predicts token t + 1
    out = {}
    for name, rows in (("chosen", batch["chosen_idx"]), ("rejected", batch["rejected_idx"])):
        pooled = torch.cat([logits[r][labels[r] != IGNORE_INDEX] for r in rows.tolist()])  # (tokens, V)
        out[name] = pooled.mean().item()
    return out


@pytest.mark.parametrize(
    "engine",
    [PaddedEngine(), PackedEngine(prefix_sharing=True, chunk_size=4, attn_implementation=None)],
    ids=["padded", "packed"],
)
def test_logged_logits_equal_naive_token_weighted_mean(engine):
    examples = _examples()
    model = make_tiny_model(V, seed=3)
    module = DPOModule(
        model, DPOLoss(beta=0.1), optimizer=lambda p: torch.optim.SGD(p, lr=0.1), engine=engine
    )
    logged = {}
    module.log_dict = lambda metrics, **kw: logged.update(metrics)  # no trainer attached
    module.log = lambda *a, **k: None
    with torch.no_grad():
        module._shared_step(engine.collator(0)(examples), "train")
    want = _naive(model, examples)
    for name in ("chosen", "rejected"):
        got = logged[f"train/logits/{name}"].item()
        assert got == pytest.approx(want[name], abs=1e-5)
    # The old definition (mean of per-sequence means) is measurably different here.
    stats = engine(model, engine.collator(0)(examples))
    chosen = engine.collator(0)(examples)["chosen_idx"]
    assert abs(stats.mean_logits[chosen].mean().item() - want["chosen"]) > 1e-3
