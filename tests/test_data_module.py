"""The DataModule on real file shapes: bad input, caching, K-wise batches, bucketing, sources."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import datasets
import lightning as L
import pytest
import torch

from dpo_lightning.data.datamodule import PreferenceDataModule
from dpo_lightning.data.formats import ImplicitPromptFormat, StandardFormat
from dpo_lightning.data.ranked import RankedFormat
from dpo_lightning.data.report import InvalidDataError
from dpo_lightning.data.sampler import ResumableSampler
from tests.conftest import REPO, compose, make_tiny_model

FIXTURES = Path(__file__).resolve().parent / "fixtures"
BAD = FIXTURES / "bad_rows.jsonl"
# Every fault kind of the issue, and the line of bad_rows.jsonl that has it.
BAD_LINES = {
    "missing_scores": 11,
    "null_prompt": 12,
    "wrong_type_completions": 13,
    "empty_completions": 14,
    "chosen_equals_rejected": 15,
    "prompt_fills_max_length": 16,
    "unknown_role_prompt": 17,
    "empty_conversation_prompt": 18,
    "fewer_than_two_distinct_scores": 19,
    "undecodable_line": 20,
    "malformed_json_line": 21,
}
UF_FORMAT = functools.partial(
    RankedFormat, text_key="response", score_key="overall_score", columns={"prompt": "instruction"}
)


def make_dm(tokenizer, tmp_path, **kwargs) -> PreferenceDataModule:
    kwargs = {"max_length": 256, "batch_size": 4, "cache_dir": str(tmp_path / "cache")} | kwargs
    return PreferenceDataModule(tokenizer, **kwargs)


def bad_dm(tokenizer, tmp_path, on_invalid):
    return make_dm(tokenizer, tmp_path, path=str(BAD), format=RankedFormat(chat=True), on_invalid=on_invalid)


def test_bad_file_error_names_every_kind_with_its_line(tokenizer, tmp_path):
    with pytest.raises(InvalidDataError) as err:
        bad_dm(tokenizer, tmp_path, "error").setup("fit")
    lines = str(err.value).splitlines()[1:]
    assert len(lines) == len(BAD_LINES)  # one line per kind
    for kind, line in BAD_LINES.items():
        assert any(ln.startswith(f"{BAD}: 1 row(s) with {kind} (lines {line})") for ln in lines), kind


def test_bad_file_skip_trains_on_the_rest_and_counts_each_kind(tokenizer, tmp_path):
    dm = bad_dm(tokenizer, tmp_path, "skip")
    dm.setup("fit")
    report = dm.report()[str(BAD)]
    assert report["dropped"] == dict.fromkeys(BAD_LINES, 1)
    assert report["example_rows"] == {k: [v] for k, v in BAD_LINES.items()}
    assert report["rows_in"] == 24 and report["rows_kept"] == 13 == len(dm.train_set) + len(dm.val_set)
    good_ids = {*range(10), 21, 22, 23}  # 0-based line indices of the good rows
    assert set(dm.train_set["row_id"]) | set(dm.val_set["row_id"]) == good_ids


def test_invalid_data_stops_the_cli_before_the_model_is_built(tmp_path, monkeypatch):
    from dpo_lightning import train as train_mod

    monkeypatch.setattr(train_mod, "build_policy", lambda *a, **k: pytest.fail("model was built"))
    cfg = compose(
        [
            "data=file",
            f"data.path={BAD}",
            "data.format=ranked",
            f"data.cache_dir={tmp_path}/c",
            f"paths.output_dir={tmp_path}",
        ],
        tmp_path,
    )
    with pytest.raises(InvalidDataError, match="malformed_json_line \\(lines 21\\)"):
        train_mod.train(cfg)


IMDB = {"path": str(FIXTURES / "imdb.jsonl"), "format": StandardFormat(columns={"prompt": "text"})}


def test_second_run_does_not_tokenise_again(tokenizer, tmp_path, monkeypatch):
    from dpo_lightning.models.tokenizers import offline_sentiment_tokenizer

    first = make_dm(tokenizer, tmp_path, **IMDB)
    first.setup("fit")
    assert {r["tokenize_cache"] for r in first.report().values()} == {"miss"}
    # A separately built, equal tokenizer: the key is content, not object identity.
    fresh = offline_sentiment_tokenizer(vocab_size=256, n=400)
    calls = []
    original = type(fresh).__call__
    monkeypatch.setattr(type(fresh), "__call__", lambda s, *a, **k: calls.append(1) or original(s, *a, **k))
    again = make_dm(fresh, tmp_path, **IMDB)
    again.setup("fit")
    assert calls == [] and list(again.train_set["prompt_ids"]) == list(first.train_set["prompt_ids"])
    assert {r["tokenize_cache"] for r in again.report().values()} == {"hit"}
    make_dm(fresh, tmp_path, **(IMDB | {"max_length": 200})).setup("fit")  # other limits: a miss
    assert calls


@pytest.mark.slow
def test_tokenisation_cache_is_found_from_another_process(tokenizer, tmp_path):
    make_dm(tokenizer, tmp_path, **IMDB).setup("fit")
    code = (
        "import json, sys; sys.path[:0] = ['.']\n"
        "from dpo_lightning.models.tokenizers import offline_sentiment_tokenizer\n"
        "from dpo_lightning.data.datamodule import PreferenceDataModule\n"
        "from dpo_lightning.data.formats import StandardFormat\n"
        "dm = PreferenceDataModule(offline_sentiment_tokenizer(vocab_size=256, n=400), "
        f"path={IMDB['path']!r}, format=StandardFormat(columns={{'prompt': 'text'}}), "
        f"max_length=256, batch_size=4, cache_dir={str(tmp_path / 'cache')!r})\n"
        "dm.setup('fit'); print('REPORT', json.dumps(dm.report()))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.split("REPORT ", 1)[1])
    assert {r["tokenize_cache"] for r in report.values()} == {"hit"}


class RowCounter(L.Callback):
    """Records each training batch and the rows every policy forward receives."""

    def __init__(self) -> None:
        self.batches, self.policy_rows = [], []

    def on_train_start(self, trainer, pl_module) -> None:
        pl_module.policy.register_forward_pre_hook(
            lambda m, args, kw: self.policy_rows.append(kw["input_ids"].shape[0]), with_kwargs=True
        )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append(batch)


def test_kwise_forwards_each_completion_once_per_step(tokenizer, tmp_path):
    from dpo_lightning.losses import DPOLoss
    from dpo_lightning.stages.dpo import DPOModule

    dm = make_dm(
        tokenizer,
        tmp_path,
        path=str(FIXTURES / "ultrafeedback.jsonl"),
        format=UF_FORMAT(mode="all_pairs"),
    )
    dm.setup("fit")
    module = DPOModule(
        make_tiny_model(len(tokenizer)), DPOLoss(0.1), functools.partial(torch.optim.AdamW, lr=1e-3)
    )
    counter = RowCounter()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[counter],
    )
    trainer.fit(module, datamodule=dm)
    assert len(counter.batches) == 2
    for batch, rows in zip(counter.batches, counter.policy_rows, strict=True):
        assert rows == batch["input_ids"].shape[0] == 4 * 4  # 4 prompts x K=4 completions, once each
        assert batch["num_pairs"] >= 4 * 5  # all_pairs: 5 or 6 strict pairs per prompt of 4
        assert len({tuple(r.tolist()) for r in batch["input_ids"]}) == rows  # no row repeated
        used = torch.cat([batch["chosen_idx"], batch["rejected_idx"]]).unique()
        assert used.tolist() == list(range(rows))  # every forwarded row is in some pair


def test_best_vs_worst_keeps_two_rows_per_prompt(tokenizer, tmp_path):
    dm = make_dm(
        tokenizer,
        tmp_path,
        path=str(FIXTURES / "ultrafeedback.jsonl"),
        format=UF_FORMAT(mode="best_vs_worst"),
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 8 and batch["num_pairs"] == 4
    assert dm.report()[str(FIXTURES / "ultrafeedback.jsonl")]["notes"]["tied_pairs"] == 6


def _chunks(indices, size):
    return [indices[i : i + size] for i in range(0, len(indices), size)]


def test_length_grouped_batches_cover_every_row_with_less_padding():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 200, (203,), generator=gen).tolist()
    sampler = ResumableSampler(range(203), 8, lengths=lengths, mega_batch_mult=10)
    batches = _chunks(list(sampler), 8)
    assert sorted(i for b in batches for i in b) == list(range(203)) and len(batches) == 26
    assert all(len(b) == 8 for b in batches[:-1])  # the one short batch comes last

    def padding(bs):
        return sum(len(b) * max(lengths[i] for i in b) for b in bs) - sum(lengths)

    plain = _chunks(list(ResumableSampler(range(203), 8)), 8)
    assert padding(batches) < 0.3 * padding(plain)
    sampler.set_epoch(1)
    assert _chunks(list(sampler), 8) != batches  # a new order every epoch


def test_length_grouping_shards_across_ranks_without_gaps(tokenizer, tmp_path):
    dm = make_dm(tokenizer, tmp_path, batch_size=3, group_by_length=True, **IMDB)
    dm.setup("fit")
    seen, counts = [], []
    for rank in range(2):
        dm.trainer = types.SimpleNamespace(distributed_sampler_kwargs={"rank": rank, "num_replicas": 2})
        loader = dm.train_dataloader()
        assert loader.sampler.lengths is not None and loader.sampler.num_replicas == 2
        batches = list(loader.batch_sampler)
        counts.append(len(batches))
        seen += [i for b in batches for i in b]
    n = len(dm.train_set)
    assert counts[0] == counts[1] and sorted(set(seen)) == list(range(n))


def test_columns_and_auto_format_from_the_config(tokenizer, tmp_path):
    from hydra.utils import instantiate

    path = tmp_path / "qa.jsonl"
    rows = [{"question": f"Q{i}?", "good": " yes", "bad": f" no {i}"} for i in range(6)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cols = ["data.columns.prompt=question", "data.columns.chosen=good", "data.columns.rejected=bad"]
    for fmt in (["data.format=standard"], []):  # data=file detects the format by default
        cfg = compose(["data=file", f"data.path={path}", f"data.cache_dir={tmp_path}/c", *cols, *fmt])
        dm = instantiate(cfg.data, tokenizer=tokenizer)
        dm.setup("fit")
        ex = (dm.train_set.to_list() + dm.val_set.to_list())[0]
        assert tokenizer.decode(ex["prompt_ids"]) == f"<s>Q{ex['row_id']}?"
    cfg = compose(
        [
            "data=hh_rlhf",
            f"data.path={FIXTURES / 'hh_rlhf.jsonl'}",
            "data.format=auto",
            f"data.cache_dir={tmp_path}/c",
        ]
    )
    dm = instantiate(cfg.data, tokenizer=tokenizer)
    dm.setup("fit")
    assert isinstance(dm.format, ImplicitPromptFormat)


def test_row_ids_are_line_numbers_and_flow_into_the_batch(tokenizer, tmp_path):
    path = tmp_path / "gaps.jsonl"
    row = {"prompt": "Review of Open Water:", "chosen": " Great.", "rejected": " Bad."}
    lines = [
        "",
        json.dumps(row),
        "",
        json.dumps(row | {"chosen": " Good."}),
        json.dumps(row | {"rejected": " No."}),
    ]
    path.write_text("\n".join(lines) + "\n")
    dm = make_dm(tokenizer, tmp_path, path=str(path), val_fraction=0.01)
    dm.setup("fit")
    ids = sorted(list(dm.train_set["row_id"]) + list(dm.val_set["row_id"]))
    assert ids == [1, 3, 4]  # line number - 1
    batch = next(iter(dm.val_dataloader()))
    assert batch["pair_row_ids"].tolist() == list(dm.val_set["row_id"])


def test_other_sources_report_row_numbers(tokenizer, tmp_path):
    rows = [json.loads(line) for line in (FIXTURES / "shp.jsonl").read_text().splitlines()]
    rows[4]["history"] = None
    parquet = tmp_path / "shp.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(parquet))
    shp = RankedFormat(
        completion_columns=["human_ref_A", "human_ref_B"],
        score_columns=["score_A", "score_B"],
        prompt_template="{history}\n\n",
    )
    dm = make_dm(tokenizer, tmp_path, path=str(parquet), format=shp, on_invalid="skip")
    dm.setup("fit")
    report = dm.report()[str(parquet)]
    assert report["dropped"] == {"null_history": 1} and report["example_rows"] == {"null_history": [5]}
    array = tmp_path / "pairs.json"
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    array.write_text(json.dumps([good, good | {"chosen": None}, "oops", good | {"rejected": "c"}]))
    dm = make_dm(tokenizer, tmp_path, path=str(array), on_invalid="skip")
    dm.setup("fit")
    assert dm.report()[str(array)]["example_rows"] == {"null_chosen": [2], "not_a_json_object": [3]}
