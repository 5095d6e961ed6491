"""Streaming data (``data.streaming=true``): every row exactly once across ranks × workers, the
same row accounting, exact resume.

The data: 8 ``.jsonl`` shards of 12 valid pairs each (the first shard has 4 more at its start,
the validation rows) and 3 bad lines in between (malformed JSON, chosen == rejected, a missing
field). With 4 streams (2 ranks × 2 workers, or 4 in-process "ranks") each stream gets 2 shards
= 24 rows = 6 batches of 4, so 12 steps of 2 × 4 read every training row exactly once.
"""

from __future__ import annotations

import itertools
import json
import signal
from pathlib import Path

import pytest
import torch

from dpo_lightning.data.report import InvalidDataError
from dpo_lightning.data.streaming import (
    StreamingLoader,
    StreamingPreferenceDataModule,
    StreamingPreferences,
    datamodule,
)
from dpo_lightning.data.synthetic import sentiment_pairs
from dpo_lightning.run.errors import UserError
from tests.conftest import run_cli

SHARDS, ROWS, VAL = 8, 12, 4
BAD = {(2, 5): "{not json", (5, 0): "same", (6, 11): "missing"}  # (shard, before row) -> fault


def write_shards(folder: Path) -> set[int]:
    """The shards; returns the row ids (shard << 32 | line - 1) of every training row."""
    folder.mkdir(parents=True, exist_ok=True)
    pairs = iter(sentiment_pairs(n=SHARDS * ROWS + VAL + 8, seed=1))
    ids = set()
    for shard in range(SHARDS):
        lines = [json.dumps(next(pairs)) for _ in range(VAL)] if shard == 0 else []
        for row in range(ROWS):
            fault = BAD.get((shard, row))
            if fault == "same":
                p = next(pairs)
                lines.append(json.dumps({**p, "rejected": p["chosen"]}))
            elif fault == "missing":
                lines.append(json.dumps({"prompt": "x", "chosen": "y"}))
            elif fault:
                lines.append(fault)
            lines.append(json.dumps(next(pairs)))
            ids.add((shard << 32) | (len(lines) - 1))
        (folder / f"part-{shard:02d}.jsonl").write_text("\n".join(lines) + "\n")
    return ids


@pytest.fixture
def shards(tmp_path) -> tuple[Path, set[int]]:
    folder = tmp_path / "shards"
    return folder, write_shards(folder)


def _module(tokenizer, folder, **kwargs) -> StreamingPreferenceDataModule:
    args = dict(path=str(folder), batch_size=4, streaming_val_rows=VAL, on_invalid="skip", max_length=64)
    dm = datamodule(tokenizer=tokenizer, streaming=True, **{**args, **kwargs})
    dm.setup("fit")
    return dm


def _batches(dm, rank, replicas, n, start=None):
    dataset = StreamingPreferences(dm.shards, dm, rank, replicas, 1, dm.holdout, start)
    out = []
    for batch in dataset:
        out.append(batch)
        if len(out) == n:
            return out
    raise AssertionError("stream ended")


def test_every_row_exactly_once_across_streams_and_resume_continues_each(tokenizer, shards):
    folder, ids = shards
    dm = _module(tokenizer, folder)
    assert len(dm.val_set) == VAL and dm.holdout[1] == VAL  # the first 4 lines of part-00
    per_stream = [_batches(dm, r, 4, 6) for r in range(4)]
    seen = [i for stream in per_stream for b in stream for i in b["pair_row_ids"].tolist()]
    assert len(seen) == len(set(seen)) == len(ids) and set(seen) == ids
    # Resume stream 2 from its state after 3 batches: exactly its last 3 batches follow.
    state = per_stream[2][2]["stream_state"]
    resumed = _batches(dm, 2, 4, 3, start={2: state})
    for a, b in zip(resumed, per_stream[2][3:], strict=True):
        assert a["pair_row_ids"].tolist() == b["pair_row_ids"].tolist()
    assert resumed[-1]["stream_state"]["counts"] == per_stream[2][5]["stream_state"]["counts"]
    # The counts: 3 bad lines dropped, each named by its file and line.
    counts = {}
    for stream in per_stream:
        counts.update(stream[-1]["stream_state"]["counts"])
    dropped = {k: v["dropped"] for k, v in counts.items() if v["dropped"]}
    assert dropped == {
        str(folder / "part-02.jsonl"): {"malformed_json_line": 1},
        str(folder / "part-05.jsonl"): {"chosen_equals_rejected": 1},
        str(folder / "part-06.jsonl"): {"missing_rejected": 1},
    }
    assert counts[str(folder / "part-02.jsonl")]["examples"] == {"malformed_json_line": [6]}
    assert sum(v["rows_kept"] for v in counts.values()) == len(ids)


def test_a_resumed_rank_keeps_only_its_own_streams(tokenizer, shards):
    """Every rank loads the whole checkpoint (all streams); a rank that kept the other ranks'
    states, frozen at the checkpoint, would hand them to the next gather, where they override
    the owners' newer ones (later ranks win the merge): summary.json and the next checkpoint
    would get the checkpoint's counts and positions for those streams."""
    folder, _ = shards
    dm = _module(tokenizer, folder)

    def ranks(checkpoint=None) -> list[StreamingLoader]:
        loaders = [
            StreamingLoader(StreamingPreferences(dm.shards, dm, r, 2, 1, dm.holdout), 100) for r in (0, 1)
        ]
        for loader in loaders if checkpoint else ():
            loader.load_state_dict(checkpoint)
        return loaders

    def take(loaders, n):
        for loader in loaders:
            list(itertools.islice(iter(loader), n))

    def gather(loaders):  # what all_streams returns under DDP: each rank's dict, merged in rank order
        return {k: v for loader in loaders for k, v in loader.states.items()}

    whole, killed = ranks(), ranks()
    take(whole, 6)
    take(killed, 3)
    resumed = ranks({"streams": 2, "states": gather(killed)})
    assert [sorted(r.states) for r in resumed] == [[0], [1]]
    take(resumed, 3)
    assert gather(resumed) == gather(whole)  # positions and counts of both streams


def test_fewer_shards_than_streams_split_rows(tokenizer, tmp_path):
    folder = tmp_path / "two"
    ids = {i for i in write_shards(folder) if i >> 32 < 2}
    for extra in sorted(folder.glob("*.jsonl"))[2:]:
        extra.unlink()
    dm = _module(tokenizer, folder)
    streams = [_batches(dm, r, 4, 1) for r in range(4)]  # 4 streams, 2 shards: rows r::4
    seen = [i for s in streams for b in s for i in b["pair_row_ids"].tolist()]
    assert len(seen) == len(set(seen)) == 16 and set(seen) <= ids


def test_hub_style_source_streams_through_datasets(tokenizer, tmp_path):
    """A folder of parquet goes through datasets.load_dataset(streaming=True), like a hub id."""
    folder = tmp_path / "parquet"
    folder.mkdir()
    rows = sentiment_pairs(n=40, seed=2)
    for k in range(2):
        rows.select(range(k * 20, (k + 1) * 20)).to_parquet(str(folder / f"train-{k}.parquet"))
    dm = _module(tokenizer, folder)
    assert len(dm.shards) == 2 and dm.shards[0].unit == "row"
    first = _batches(dm, 0, 1, 4)
    resumed = _batches(dm, 0, 1, 2, start={0: first[1]["stream_state"]})
    assert [b["pair_row_ids"].tolist() for b in resumed] == [b["pair_row_ids"].tolist() for b in first[2:]]


def test_streaming_refusals(tokenizer, shards):
    folder, _ = shards
    dm = _module(tokenizer, folder, on_invalid="error")
    loader = StreamingLoader(StreamingPreferences(dm.shards, dm, 0, 1, 1, dm.holdout), length=100)
    with pytest.raises(
        InvalidDataError, match=r"while streaming: .*part-0[256].jsonl: 1 row\(s\) with \w+ \(lines"
    ):
        for _ in loader:
            pass
    with pytest.raises(UserError, match=r"needs data\.path"):
        datamodule(tokenizer=tokenizer, streaming=True, generator=lambda: None)
    with pytest.raises(UserError, match="reference=precomputed reads the whole data set"):
        _module(tokenizer, folder).full_dataloaders()


# -- 2 ranks × 2 workers through the CLI, killed and resumed -----------------------------------
ARGS = [
    "data=file",
    "data.streaming=true",
    f"data.streaming_val_rows={VAL}",
    "data.on_invalid=skip",
    "data.batch_size=4",
    "data.num_workers=2",
    "data.max_length=64",
    "trainer=ddp_cpu",
    "trainer.max_steps=12",
    "trainer.val_check_interval=6",
    "trainer.log_every_n_steps=1",
    "callbacks.checkpoint.every_n_train_steps=4",
    "callbacks.progress_bar=null",
    "debug=pair_ids",
    "+logger.csv.flush_logs_every_n_steps=1",
]
ENV = {"OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_two_ranks_two_workers_every_row_once_and_exact_resume_after_a_kill(tmp_path):
    import csv

    from tests.test_resume import TIMING, _weights

    # Job-wide throughput rows (DDP: train/items_per_sec, ...) restart with the process, too.
    timing = (*TIMING, "train/flops_per_sec", "train/items_per_sec", "train/samples_per_sec", "train/mfu")

    def metrics(run: Path) -> list[dict[str, str]]:
        rows = [
            {k: v for k, v in r.items() if not k.startswith(timing)}
            for r in csv.DictReader((run / "csv" / "metrics.csv").read_text().splitlines())
        ]
        return [r for r in rows if any(v for k, v in r.items() if k not in ("epoch", "step"))]

    folder = tmp_path / "shards"
    ids = write_shards(folder)
    data = f"data.path={folder}"
    whole = tmp_path / "whole"
    run_cli([f"hydra.run.dir={whole}", *ARGS, data], tmp_path, timeout=400, env=ENV)
    ranks = [json.loads((whole / "pair_ids" / f"rank{r}.json").read_text()) for r in (0, 1)]
    seen = [i for rank in ranks for batch in rank for i in batch]
    assert len(seen) == len(set(seen)) == len(ids) and set(seen) == ids  # every row exactly once
    summary = json.loads((whole / "summary.json").read_text())
    assert summary["rows_dropped"] == 3 and summary["pairs_trained"] == len(ids)
    streamed = {k: v for k, v in summary["data"].items() if "validation" not in k}
    assert sum(v["rows_in"] for v in streamed.values()) == len(ids) + 3

    run_dir = tmp_path / "run"
    faults = {**ENV, "DPO_LIGHTNING_FAULTS": "kill@6"}
    killed = run_cli([f"hydra.run.dir={run_dir}", *ARGS, data], tmp_path, check=False, env=faults)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    run_cli([f"hydra.run.dir={run_dir}", *ARGS, data, "resume=true"], tmp_path, timeout=400, env=ENV)
    a, b = _weights(whole), _weights(run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical weights
    assert metrics(run_dir) == metrics(whole)  # the same metric history, every step once
    resumed = json.loads((run_dir / "summary.json").read_text())

    # The same rows read, dropped and kept. Whether this process tokenised the validation rows
    # itself or found the killed run's tokenisation in the cache is no row count: set aside.
    def rows(run: dict) -> dict:
        return {k: {f: n for f, n in v.items() if f != "tokenize_cache"} for k, v in run["data"].items()}

    assert rows(resumed) == rows(summary)
    assert [v["tokenize_cache"] for k, v in resumed["data"].items() if "validation" in k] == ["hit"]
