"""Issue 13's objectives through the stage and the CLI: KTO / BCO on unpaired rows, f-DPO, LD-DPO and
``weighting=wpo`` train from local fixtures, update the policy, leave the reference alone, log
TRL's metric names, and refuse the combinations that cannot work in one line."""

from __future__ import annotations

import csv
import functools
import json

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from dpo_lightning.data.datamodule import PreferenceDataModule
from dpo_lightning.data.synthetic import sentiment_pairs
from dpo_lightning.losses import BCOLoss, IPOLoss, KTOLoss, LDDPOLoss, WPOWeighting
from dpo_lightning.reference import PrecomputedReference
from dpo_lightning.run.errors import UserError
from dpo_lightning.stages.dpo import DPOModule
from tests.conftest import compose, make_tiny_model, run_cli
from tests.test_data_module import FIXTURES

FAST = [
    "debug=fast",
    "logger=csv",
    "callbacks.progress_bar=null",
    "data.batch_size=4",
    "data.eval_batch_size=4",
]


def module_for(overrides, tokenizer, **kw):
    cfg = compose(overrides)
    return instantiate(
        cfg.stage.module,
        policy=make_tiny_model(len(tokenizer)),
        optimizer=instantiate(cfg.optim.optimizer),
        **kw,
    )


def test_weighting_wraps_whichever_loss_is_chosen(tokenizer):
    module = module_for(["loss=ipo", "loss.beta=0.3", "weighting=wpo"], tokenizer)
    assert isinstance(module.loss_fn, WPOWeighting) and isinstance(module.loss_fn.loss, IPOLoss)
    assert module.loss_fn.loss.beta == 0.3 and module.policy_outputs == {"log_sum_sq_probs"}
    assert module.reference_outputs == frozenset()  # WPO reads the policy only
    plain = module_for([], tokenizer)
    assert not isinstance(plain.loss_fn, WPOWeighting) and plain.policy_outputs == frozenset()
    ld = module_for(["loss=ld_dpo"], tokenizer)
    assert ld.policy_outputs == ld.reference_outputs == {"token_logps"}
    with pytest.raises(Exception, match="depend on the whole batch"):
        module_for(["loss=aot", "weighting=wpo"], tokenizer)


def test_a_cache_of_summed_logps_is_refused_where_it_cannot_serve(tokenizer):
    opt = functools.partial(torch.optim.SGD, lr=0.1)
    for loss in (KTOLoss(), LDDPOLoss()):
        with pytest.raises(UserError, match="reference=copy"):
            DPOModule(make_tiny_model(len(tokenizer)), loss, opt, reference=PrecomputedReference())
    DPOModule(make_tiny_model(len(tokenizer)), BCOLoss(), opt, reference=PrecomputedReference())  # rows only


def fit(module, datamodule, steps=2):
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=datamodule)
    return trainer


@pytest.fixture(scope="module")
def unpaired_file(tokenizer):
    dm = PreferenceDataModule(tokenizer, path=str(FIXTURES / "unpaired.jsonl"), format="auto", batch_size=4)
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("name", ["kto", "bco"])
def test_unpaired_losses_train_the_policy_not_the_reference(name, tokenizer, unpaired_file):
    module = module_for([f"loss={name}"], tokenizer)
    policy0 = [p.clone() for p in module.policy.parameters()]
    reference0 = [p.clone() for p in module.reference_model.parameters()]
    if name == "kto":  # 23 desirable / 11 undesirable rows with λ_D = λ_U: outside Eq. 8's range
        with pytest.warns(UserWarning, match=r"λ_D·n_D / \(λ_U·n_U\)"):
            trainer = fit(module, unpaired_file)
    else:
        trainer = fit(module, unpaired_file)
    assert any(not torch.equal(a, b) for a, b in zip(policy0, module.policy.parameters(), strict=True))
    assert all(
        torch.equal(a, b) for a, b in zip(reference0, module.reference_model.parameters(), strict=True)
    )
    logged = trainer.callback_metrics
    for key in (
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "logps/chosen",
        "logits/rejected",
    ):
        assert torch.isfinite(logged[f"train/{key}"]), key
    assert f"train/{'kl' if name == 'kto' else 'delta'}" in logged
    if name == "bco":  # δ is module state: checkpointed, and moved once per step
        state = module.state_dict()
        assert state["loss_fn.num_batches"].item() == 2 and "loss_fn.running_mean" in state


def test_pairwise_loss_on_an_unpaired_batch_fails_in_one_line(tokenizer, unpaired_file):
    module = module_for(["loss=dpo"], tokenizer)
    batch = next(iter(unpaired_file.train_dataloader()))
    with pytest.raises(UserError, match="loss=kto or loss=bco"):
        module._shared_step(batch, "train")
    kto = module_for(["loss=kto"], tokenizer)
    paired = PreferenceDataModule(tokenizer, generator=functools.partial(sentiment_pairs, n=20), batch_size=2)
    paired.setup("fit")
    with pytest.raises(UserError, match=r"data\.unpair=true"):
        kto._shared_step(next(iter(paired.train_dataloader())), "train")


def read_csv(run_dir):
    with open(run_dir / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_cli_kto_on_unpaired_rows(tmp_path):
    """``dpo-train loss=kto data=file data.path=<unpaired jsonl>``: the README's KTO command."""
    run = tmp_path / "run"
    proc = run_cli(
        ["loss=kto", "data=file", f"data.path={FIXTURES / 'unpaired.jsonl'}", *FAST, f"hydra.run.dir={run}"],
        tmp_path,
    )
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["pairs_trained"] == 12  # 3 steps × 4 labelled rows
    rows = read_csv(run)
    assert any(r.get("train/kl") for r in rows) and any(r.get("val/kl") for r in rows)
    assert "outside the paper's" in proc.stderr  # the loss-aversion advice, with the counts


CLI_RUNS = {
    "kto_unpair_packed": [
        "loss=kto",
        "data=imdb",
        f"data.path={FIXTURES / 'imdb.jsonl'}",
        "data.unpair=true",
        "engine=packed",
    ],
    "kto_mix_preset": [
        "loss=kto",
        "data=kto_mix",
        f"data.path={FIXTURES / 'kto_mix.jsonl'}",
        "data.max_length=128",
        "data.max_prompt_length=64",  # the preset's 512 must stay below max_length
    ],
    "bco_conversational": [
        "loss=bco",
        "data=file",
        f"data.path={FIXTURES / 'kto_mix.jsonl'}",
        "engine=packed",
    ],
    "f_dpo_js": ["loss=f_dpo", "loss.divergence=js", "data=imdb", f"data.path={FIXTURES / 'imdb.jsonl'}"],
    "f_dpo_alpha": ["loss=f_dpo", "loss.divergence=alpha", "loss.alpha=0.3", "data.generator.n=100"],
    "ld_dpo_k_wise_packed": [
        "loss=ld_dpo",
        "loss.alpha=0.3",
        "data=ultrafeedback",
        f"data.path={FIXTURES / 'ultrafeedback.jsonl'}",
        "data.max_length=128",
        "data.max_prompt_length=64",  # the preset's 512 must stay below max_length
        "engine=packed",
    ],
    "wpo_ipo": ["loss=ipo", "weighting=wpo", "data=imdb", f"data.path={FIXTURES / 'imdb.jsonl'}"],
    "wpo_ld_dpo_padded": ["loss=ld_dpo", "weighting=wpo", "data.generator.n=100"],
}


@pytest.mark.slow  # one subprocess each (~20-30 s on a shared CPU)
@pytest.mark.parametrize("name", sorted(CLI_RUNS))
def test_cli_objectives_train_from_fixtures(name, tmp_path):
    run = tmp_path / "run"
    run_cli([*CLI_RUNS[name], *FAST, f"hydra.run.dir={run}"], tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["rows_dropped"] == 0
    assert torch.isfinite(torch.tensor(summary["val"]["loss"]))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["loss=kto", "data=imdb", f"data.path={FIXTURES / 'imdb.jsonl'}"], "add data.unpair=true"),
        (["loss=dpo", "data=file", f"data.path={FIXTURES / 'unpaired.jsonl'}"], "use an unpaired loss"),
        (["loss=kto", "reference=precomputed"], "use reference=copy"),
    ],
    ids=["kto-on-pairs", "dpo-on-unpaired", "kto-precomputed"],
)
def test_cli_mismatches_fail_in_one_line(args, message, tmp_path):
    proc = run_cli([*args, *FAST, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow  # two processes (gloo): the losses' and metrics' collectives line up, no hang
@pytest.mark.parametrize("name", ["kto", "bco"])
def test_cli_unpaired_losses_under_ddp(name, tmp_path):
    run = tmp_path / "run"
    args = [f"loss={name}", "data=file", f"data.path={FIXTURES / 'unpaired.jsonl'}", "trainer=ddp_cpu"]
    run_cli([*args, *FAST, f"hydra.run.dir={run}"], tmp_path, timeout=400, env={"OMP_NUM_THREADS": "1"})
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["pairs_trained"] == 24  # 2 ranks × 3 steps × 4 rows
    key = "kl" if name == "kto" else "delta"
    assert torch.isfinite(torch.tensor(summary["val"][key]))
