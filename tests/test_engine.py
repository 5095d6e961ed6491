"""Throughput engine: every technique leaves log-probs, losses and gradients unchanged.

The reference is the plain computation: :class:`PaddedEngine` on padded rows with full logits.
"""

from __future__ import annotations

import random

import pytest
import torch

from dpo_lightning.data.collate import PreferenceCollator
from dpo_lightning.engine import PackedEngine, PaddedEngine
from dpo_lightning.engine.chunked_head import head_token_logps, linear_token_logps
from dpo_lightning.engine.logps import token_logps
from dpo_lightning.engine.packing import PackedCollator, dense_bool_mask, flex_block_mask
from dpo_lightning.losses import DPOLoss
from dpo_lightning.stages.dpo import DPOModule
from tests.conftest import make_tiny_model

V = 97


def _examples(ks=(2, 3, 2), seed=0):
    """Random examples; K=3 carries three ranked pairs (K-wise)."""
    rng = random.Random(seed)
    out = []
    for i, k in enumerate(ks):
        out.append(
            {
                "prompt_ids": [rng.randrange(V) for _ in range(rng.randint(1, 9))],
                "completion_ids": [[rng.randrange(V) for _ in range(rng.randint(1, 7))] for _ in range(k)],
                "pairs": [[0, 1]] if k == 2 else [[0, 1], [1, 2], [0, 2]],
                "row_id": i,
            }
        )
    return out


def _module(engine, model, loss=None):
    loss = loss or DPOLoss(beta=0.1)
    return DPOModule(model, loss, optimizer=lambda p: torch.optim.SGD(p, lr=0.1), engine=engine)


def _loss_and_grads(engine, batch, seed=0, loss=None):
    module = _module(engine, make_tiny_model(V, seed=seed), loss)
    # The reference must differ from the policy, or every reward is 0 and bugs hide.
    with torch.no_grad():
        for p in module.policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    module.log_dict = module.log = lambda *a, **k: None  # no trainer attached
    loss = module._shared_step(batch, "train")
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.policy.named_parameters()}


def test_collator_hand_worked():
    """Prompt [5, 6], completions [7, 8] and [9]: one shared prompt, positions restart at 2."""
    ex = {"prompt_ids": [5, 6], "completion_ids": [[7, 8], [9]], "pairs": [[0, 1]], "row_id": 3}
    b = PackedCollator(pad_token_id=0, pad_to_multiple_of=8)([ex])
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0, 0, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 2, 0, 1, 2]]
    assert b["branch_ids"].tolist() == [0, 0, 1, 1, 2, 0, 0, 0]
    assert b["doc_ids"].tolist() == [1, 1, 1, 1, 1, -1, -1, -1]
    # 7 and 9 are both predicted by the prompt's last token (position 1); 8 by 7 (position 2).
    assert b["logit_index"].tolist() == [1, 2, 1]
    assert b["target_ids"].tolist() == [7, 8, 9]
    assert b["completion_index"].tolist() == [0, 0, 1]
    assert (b["num_tokens"], b["num_completions"], b["num_pairs"]) == (5, 2, 1)
    mask = dense_bool_mask(b["doc_ids"], b["branch_ids"], torch.float32)[0, 0].int()
    # Row 4 (token 9, rejected) sees the prompt and itself, not the chosen tokens 7, 8.
    assert mask[4].tolist() == [1, 1, 0, 0, 1, 0, 0, 0]
    assert mask[3].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert mask[6].tolist() == [0, 0, 0, 0, 0, 1, 1, 0]  # padding: its own document

    flat = PackedCollator(pad_token_id=0, prefix_sharing=False)([ex])
    assert flat["input_ids"].tolist() == [[5, 6, 7, 8, 5, 6, 9]]
    assert flat["logit_index"].tolist() == [1, 2, 5]
    assert flat["doc_ids"].tolist() == [1, 1, 1, 1, 2, 2, 2]


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("attn", ["sdpa", "eager", "per_document"])
@pytest.mark.parametrize(
    "engine",
    [
        (PackedEngine(prefix_sharing=True, chunk_size=5, attn_implementation=None), None),
        (PackedEngine(prefix_sharing=False, chunk_size=None, attn_implementation=None), None),
        (PackedEngine(prefix_sharing=True, chunk_size=None, attn_implementation=None), 16),
    ],
    ids=["shared+chunked", "packed-only", "shared+padded-row"],
)
def test_packed_stats_equal_padded(engine, attn, padding_side):
    engine, multiple = engine
    model = make_tiny_model(V).requires_grad_(False)
    ex = _examples()
    want = PaddedEngine()(model, PreferenceCollator(0, padding_side)(ex))
    model.set_attn_implementation(attn)
    got = engine(model, engine.collator(0, pad_to_multiple_of=multiple)(ex))
    torch.testing.assert_close(got.logps, want.logps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.lengths, want.lengths)
    torch.testing.assert_close(got.mean_logits, want.mean_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ks", [(2, 2, 2), (3, 2)], ids=["pairs", "k-wise"])
def test_packed_loss_and_grads_equal_padded(ks):
    """Full DPO step (policy + frozen reference through the same engine): loss and every policy
    gradient (tied-free head, embeddings, attention) equal to the padded computation."""
    ex = _examples(ks, seed=1)
    want_loss, want_grads = _loss_and_grads(PaddedEngine(), PreferenceCollator(0, "left")(ex))
    engine = PackedEngine(prefix_sharing=True, chunk_size=4)
    got_loss, got_grads = _loss_and_grads(engine, engine.collator(0)(ex))
    assert want_loss.abs() > 1e-4  # rewards differ from 0: a real comparison
    torch.testing.assert_close(got_loss, want_loss, atol=1e-6, rtol=1e-5)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_chunked_head_grads_match_full_logits():
    """Custom autograd (chunked, recomputing) == autograd through the full log-softmax,
    with a bias and chunks that do not divide the rows."""
    torch.manual_seed(0)
    h = torch.randn(11, 8, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(8, 13, dtype=torch.float64)
    t = torch.randint(0, 13, (11,))
    g = torch.randn(11, dtype=torch.float64)
    want = torch.log_softmax(head(h), -1).gather(-1, t[:, None]).squeeze(-1)
    gw = torch.autograd.grad((want * g).sum(), [h, head.weight, head.bias])
    got = linear_token_logps(h, head.weight, head.bias, t, chunk_size=4)
    gg = torch.autograd.grad((got * g).sum(), [h, head.weight, head.bias])
    torch.testing.assert_close(got, want.float())
    for a, b in zip(gg, gw, strict=True):  # the head computes in fp32, whatever the input dtype
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_non_linear_head_uses_checkpointed_chunks():
    """A head that is not a plain Linear (here a Sequential) goes through the generic path."""
    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh())
    h = torch.randn(7, 6, requires_grad=True)
    t = torch.randint(0, 10, (7,))
    got = head_token_logps(head, h, t, chunk_size=3)
    torch.testing.assert_close(got, token_logps(head(h), t))
    (g_got,) = torch.autograd.grad(got.sum(), h)
    (g_want,) = torch.autograd.grad(token_logps(head(h), t).sum(), h)
    torch.testing.assert_close(g_got, g_want)


def test_flex_block_mask_matches_dense_and_skips_blocks():
    """FlexAttention's BlockMask encodes the same mask, and skips whole blocks (other documents)."""
    ex = _examples((2, 2, 2, 2, 2, 2, 2, 2), seed=2)
    for e in ex:
        e["prompt_ids"] = e["prompt_ids"] * 8
    b = PackedCollator(0, pad_to_multiple_of=128)(ex)
    dense = dense_bool_mask(b["doc_ids"], b["branch_ids"], torch.float32)[0, 0]
    block = flex_block_mask(b["doc_ids"], b["branch_ids"], torch.float32)
    n = dense.shape[0]
    idx = torch.arange(n)
    via_mod = block.mask_mod(None, None, idx[:, None], idx[None, :])
    assert torch.equal(via_mod, dense)
    assert block.sparsity() > 0  # % of blocks skipped


def test_engine_config_composes_and_is_wired(tmp_path):
    """``engine=packed`` composes to a PackedEngine whose collator the DataModule then uses."""
    from hydra.utils import instantiate

    from tests.conftest import compose

    cfg = compose(["engine=packed", "engine.chunk_size=7"], tmp_path)
    engine = instantiate(cfg.engine)
    assert isinstance(engine, PackedEngine) and engine.chunk_size == 7
    assert isinstance(instantiate(compose(["engine=padded"], tmp_path).engine), PaddedEngine)
    gpu = instantiate(compose(["engine=fast_gpu"], tmp_path).engine)
    assert (gpu.attn_implementation, gpu.compile) == ("flex_attention", True)
    assert gpu.collator(3).pad_to_multiple_of == 128  # FlexAttention's block, unless data says
    assert gpu.collator(3, pad_to_multiple_of=64).pad_to_multiple_of == 64

    # The DataModule is given the engine as its batch layout and builds that collator, once.
    from dpo_lightning.data.datamodule import PreferenceDataModule
    from dpo_lightning.run.errors import UserError

    tok = type("Tok", (), {"pad_token_id": 3})()
    dm = PreferenceDataModule(tok, path="unused.jsonl", layout=engine, pad_to_multiple_of=8)
    assert isinstance(dm.collator, PackedCollator) and dm.collator.pad_token_id == 3
    assert dm.collator.pad_to_multiple_of == 8 and dm.collator.prefix_sharing
    with pytest.raises(UserError, match="engine=packed packs each batch into one unpadded row"):
        PreferenceDataModule(tok, path="unused.jsonl", layout=engine, padding_side="left")


@pytest.mark.slow
def test_cli_packed_engine_trains(tmp_path):
    """The real CLI with the packed engine and length grouping: trains, validates, exports."""
    import json

    from tests.conftest import run_cli

    run_cli(
        [
            "engine=packed",
            "data.group_by_length=true",
            "debug=fast",
            "logger=csv",
            f"hydra.run.dir={tmp_path}",
        ],
        tmp_path,
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["val"]["loss"] > 0


@pytest.mark.slow
def test_bench_smoke(capsys):
    """One benchmark step of the dpo_lightning engine prints the documented keys."""
    import json

    from dpo_lightning.bench import main

    main(
        [
            "--shape",
            "tiny",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--engines",
            "dpo_lightning",
            "--threads",
            "1",
        ]
    )
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in (
        "engine",
        "device",
        "params",
        "sec_per_step",
        "pairs_per_s",
        "real_tok_per_s",
        "peak_mem_gib",
        "mfu",
    ):
        assert key in row
    assert row["engine"] == "dpo_lightning" and row["pairs_per_s"] > 0


def test_packed_equal_padded_bf16():
    """bf16 weights (the GPU setting): the same log-probs to bf16 tolerance, fp32 in the head."""
    model = make_tiny_model(V).to(torch.bfloat16).requires_grad_(False)
    ex = _examples((2, 3, 2), seed=3)
    want = PaddedEngine()(model, PreferenceCollator(0)(ex))
    engine = PackedEngine(chunk_size=4)
    got = engine(model, engine.collator(0)(ex))
    assert got.logps.dtype == torch.float32
    torch.testing.assert_close(got.logps, want.logps, atol=2e-2, rtol=2e-3)


def test_packed_layout_hand_worked():
    """Documents [p p c1 c2] and [p c1], padded: a (2+1, 4) grid, slots and per-document masks."""
    from dpo_lightning.engine.doc_attention import packed_layout

    doc = torch.tensor([1, 1, 1, 1, 2, 2, -1])
    branch = torch.tensor([0, 0, 1, 2, 0, 1, 0])
    lay = packed_layout(doc, branch)
    assert (lay.docs, lay.width) == (3, 4)
    assert lay.slot.tolist() == [0, 1, 2, 3, 4, 5, 8]
    assert lay.gather[:6].tolist() == [0, 1, 2, 3, 4, 5] and lay.gather[8] == 6
    m = lay.mask[:, 0].int()
    assert m[0].tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 0, 1]]
    assert m[1].tolist() == [
        [1, 0, 0, 0],
        [1, 1, 0, 0],
        [0, 0, 1, 0],
        [0, 0, 0, 1],
    ]  # 2 empty slots
    assert m[2, 0].tolist() == [1, 0, 0, 0]


def test_per_document_without_layout_is_plain_sdpa():
    """Outside the engine (generation, callbacks) a model switched to per_document is unchanged."""
    model = make_tiny_model(V)
    ids = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    want = model(input_ids=ids, attention_mask=mask).logits
    model.set_attn_implementation("per_document")
    got = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()])


def test_engines_and_a_stage_pickle_for_spawned_workers():
    """ddp_spawn pickles the module with its engine: compiled-model bookkeeping starts afresh."""
    import functools
    import pickle

    engine = PackedEngine(compile=True)
    model = make_tiny_model(V)
    engine._compiled.add(model)
    module = DPOModule(
        model, DPOLoss(beta=0.1), optimizer=functools.partial(torch.optim.SGD, lr=0.1), engine=engine
    )
    clone = pickle.loads(pickle.dumps(module))
    assert clone.engine.compile and len(clone.engine._compiled) == 0
    assert isinstance(pickle.loads(pickle.dumps(PaddedEngine())), PaddedEngine)
