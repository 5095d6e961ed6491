"""Nothing vanishes, nothing trains that should not: the DataModule end to end on rows that
used to be lost silently, break detection, crash, or train with no signal."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dpo_lightning.data.ranked import RankedFormat
from tests.test_data_module import make_dm
from tests.test_data_sources import fault_lines, jsonl, kept_ids, pair


def write(tmp_path, name: str, rows: list) -> str:
    path = tmp_path / name
    path.write_text(jsonl(rows))
    return str(path)


def test_auto_format_with_one_int_prompt_among_40_rows(tokenizer, tmp_path):
    rows = [pair(i) for i in range(40)]
    rows[12] = pair(12, prompt=12)
    path = write(tmp_path, "auto.jsonl", rows)
    assert fault_lines(make_dm(tokenizer, tmp_path, path=path, format="auto")) == [
        f"{path}: 1 row(s) with wrong_type_prompt (lines 13)"
    ]
    dm = make_dm(tokenizer, tmp_path, path=path, format="auto", on_invalid="skip")
    dm.setup("fit")
    report = dm.report()[path]
    assert report["dropped"] == {"wrong_type_prompt": 1} and report["rows_kept"] == 39
    assert kept_ids(dm) == set(range(40)) - {12}


def test_ranked_nan_scores_are_counted_and_best_vs_random_does_not_crash(tokenizer, tmp_path):
    rows = [{"prompt": f"p{i}", "completions": [" a", " b", " c"], "scores": [2, 1, 0]} for i in range(10)]
    rows[3]["scores"] = [math.nan, 1, 0]  # json.dumps writes NaN, which json.loads reads back
    rows[6]["scores"] = [2, math.inf, 0]
    path = write(tmp_path, "ranked.jsonl", rows)
    for mode in ("all_pairs", "best_vs_worst", "best_vs_random"):
        dm = make_dm(tokenizer, tmp_path, path=path, format=RankedFormat(mode=mode), on_invalid="skip")
        dm.setup("fit")
        report = dm.report()[path]
        assert report["dropped"] == {"nonfinite_score": 2} and report["example_rows"] == {
            "nonfinite_score": [4, 7]
        }
        # every kept row keeps all three completions: none vanished from the ranking
        assert kept_ids(dm) == set(range(10)) - {3, 6}
        if mode == "all_pairs":
            assert all(len(c) == 3 for c in dm.train_set["completion_ids"])


def _pair_rows_differ(batch) -> list[bool]:
    ids, labels = batch["input_ids"], batch["labels"]
    out = []
    for c, r in zip(batch["chosen_idx"].tolist(), batch["rejected_idx"].tolist(), strict=True):
        out.append(not (torch.equal(ids[c], ids[r]) and torch.equal(labels[c], labels[r])))
    return out


def test_pairs_identical_after_truncation_never_train(tokenizer, tmp_path):
    # 20 pairs differ only after 12 completion tokens (before: all 20 trained, loss ln 2 and zero
    # gradient), 20 differ at once.
    same_start = " great film, really great film, really"
    rows = [pair(i, chosen=same_start + " good", rejected=same_start + " bad") for i in range(20)]
    rows += [pair(i) for i in range(20, 40)]
    path = write(tmp_path, "trunc.jsonl", rows)
    kwargs = {"path": path, "max_length": 24, "max_prompt_length": 8}
    lines = fault_lines(make_dm(tokenizer, tmp_path, **kwargs))
    assert len(lines) == 1 and lines[0].startswith(
        f"{path}: 20 row(s) with identical_after_truncation (lines 1, 2, 3, 4, 5, ...)"
    )
    dm = make_dm(tokenizer, tmp_path, on_invalid="skip", **kwargs)
    dm.setup("fit")
    assert dm.report()[path]["dropped"] == {"identical_after_truncation": 20}
    assert kept_ids(dm) == set(range(20, 40))
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        for batch in loader:
            assert all(_pair_rows_differ(batch))


def test_kwise_rows_keep_the_pairs_that_still_differ_after_truncation(tokenizer, tmp_path):
    shared = " great film, really great film, really"
    row = {"prompt": "p", "completions": [shared + " good", shared + " fine", " bad"], "scores": [3, 2, 1]}
    rows = [row | {"prompt": f"Review {i}:"} for i in range(6)]
    path = write(tmp_path, "k.jsonl", rows)
    dm = make_dm(tokenizer, tmp_path, path=path, format="ranked", max_length=24, max_prompt_length=8)
    dm.setup("fit")
    report = dm.report()[path]
    # all_pairs (0,1) (0,2) (1,2): (0,1) lost its difference, the other two train
    assert report["rows_kept"] == 6 and report["notes"] == {"identical_after_truncation": 6}
    assert all(sorted(map(tuple, p)) == [(0, 2), (1, 2)] for p in dm.train_set["pairs"])
    for batch in dm.train_dataloader():
        assert all(_pair_rows_differ(batch)) and batch["num_pairs"] == 2 * len(batch["input_ids"]) // 3
    # a completion whose only pair lost its signal goes too: scores 3, 2, 2 -> pairs (0,1) (0,2)
    # ((1,2) is a tie); 0 and 1 are the same after the cut, so (0,1) goes and with it completion 1
    tied = {"prompt": "p", "completions": [shared + " good", shared + " fine", " bad"], "scores": [3, 2, 2]}
    path = write(tmp_path, "k2.jsonl", [tied | {"prompt": f"Review {i}:"} for i in range(4)])
    dm = make_dm(tokenizer, tmp_path, path=path, format="ranked", max_length=24, max_prompt_length=8)
    dm.setup("fit")
    assert dm.report()[path]["notes"] == {"tied_pairs": 4, "identical_after_truncation": 4}
    for ex in dm.train_set.to_list() + dm.val_set.to_list():
        assert ex["pairs"] == [[0, 1]] and len(ex["completion_ids"]) == 2
        assert tokenizer.decode(ex["completion_ids"][1]).startswith(" bad")


def split_files(tmp_path, shared: int = 3):
    folder = tmp_path / "dup"
    folder.mkdir()
    train = [pair(i) for i in range(12)]
    val = [pair(i) for i in range(shared)] + [pair(i) for i in range(100, 104)]
    (folder / "train.jsonl").write_text(jsonl(train))
    (folder / "validation.jsonl").write_text(jsonl(val))
    return folder


def test_rows_in_both_splits_are_reported(tokenizer, tmp_path, capsys):
    folder = split_files(tmp_path)
    dm = make_dm(tokenizer, tmp_path, path=str(folder))
    dm.setup("fit")
    report = dm.report()
    assert report[str(folder / "train.jsonl")]["duplicated_across_splits"] == {"train": 3}
    assert report[str(folder / "validation.jsonl")]["duplicated_across_splits"] == {"validation": 3}
    assert len(dm.train_set) == 12 and len(dm.val_set) == 7  # reported, kept
    out = capsys.readouterr().out
    assert (
        "3 validation row(s) have the content of a train row (3 train row(s) involved): kept in both" in out
    )


@pytest.mark.parametrize(
    ("policy", "side", "reason", "sizes"),
    [
        ("keep_in_train", "validation", "duplicate_of_train_row", (12, 4)),
        ("keep_in_validation", "train", "duplicate_of_validation_row", (9, 7)),
    ],
)
def test_cross_split_duplicates_dropped_from_one_side_without_stopping(
    tokenizer, tmp_path, policy, side, reason, sizes
):
    folder = split_files(tmp_path)
    dm = make_dm(tokenizer, tmp_path, path=str(folder), cross_split_duplicates=policy)
    dm.setup("fit")  # on_invalid=error: a de-duplication drop is not a fault
    report = dm.report()[str(folder / f"{side}.jsonl")]
    assert report["dropped"] == {reason: 3} and report["example_rows"] == {reason: [1, 2, 3]}
    assert report["rows_in"] == report["rows_kept"] + 3
    assert (len(dm.train_set), len(dm.val_set)) == sizes
    train_content = {tuple(map(tuple, c)) for c in dm.train_set["completion_ids"]}
    assert not train_content & {tuple(map(tuple, c)) for c in dm.val_set["completion_ids"]}


def test_duplicates_carved_into_both_sides_of_one_file(tokenizer, tmp_path):
    rows = [pair(i) for i in range(40)] + [pair(i) for i in range(10)]  # 10 rows twice
    path = write(tmp_path, "twice.jsonl", rows)
    dm = make_dm(tokenizer, tmp_path, path=path, val_fraction=0.2, seed=1)
    dm.setup("fit")
    val_keys = {tuple(r["prompt_ids"]) for r in dm.val_set.to_list()}
    in_train = sum(tuple(r["prompt_ids"]) in val_keys for r in dm.train_set.to_list())
    counts = dm.report()[path]["duplicated_across_splits"]
    assert counts["train"] == in_train > 0 and counts["validation"] > 0
    dm = make_dm(
        tokenizer, tmp_path, path=path, val_fraction=0.2, seed=1, cross_split_duplicates="keep_in_train"
    )
    dm.setup("fit")
    assert dm.report()[path]["dropped"] == {"duplicate_of_train_row": counts["validation"]}


def test_unknown_cross_split_policy_is_a_one_line_error(tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"cross_split_duplicates=.dedup.: must be one of"):
        make_dm(tokenizer, tmp_path, path="x.jsonl", cross_split_duplicates="dedup")


def test_summary_json_counts_cross_split_duplicates(tmp_path):
    from omegaconf import open_dict

    from dpo_lightning.train import train
    from tests.conftest import compose

    folder = split_files(tmp_path)
    run = tmp_path / "run"
    cfg = compose(
        [
            "data=file",
            f"data.path={folder}",
            "data.format=standard",
            "data.cross_split_duplicates=keep_in_train",
            f"data.cache_dir={tmp_path}/cache",
            "data.batch_size=4",
            "debug=fast",
            "trainer.max_steps=2",
            "callbacks.progress_bar=null",
            f"paths.output_dir={run}",
        ],
        run,
    )
    with open_dict(cfg):
        del cfg["hydra"]
    train(cfg)
    data = json.loads((run / "summary.json").read_text())["data"]
    assert data[str(folder / "train.jsonl")]["duplicated_across_splits"] == {"train": 3}
    assert data[str(folder / "validation.jsonl")]["duplicated_across_splits"] == {"validation": 3}
    assert data[str(folder / "validation.jsonl")]["dropped"] == {"duplicate_of_train_row": 3}


@pytest.mark.parametrize("seed", range(6))
def test_carved_validation_is_drawn_from_rows_that_survive_tokenization(tokenizer, tmp_path, seed):
    # 8 of 10 rows are dropped by tokenisation; carving before it could leave validation empty.
    rows = [pair(i, prompt=f"Review {i}: " + "so long " * 40) for i in range(8)] + [pair(8), pair(9)]
    path = write(tmp_path, "long.jsonl", rows)
    dm = make_dm(tokenizer, tmp_path, path=path, on_invalid="skip", val_fraction=0.5, seed=seed)
    dm.setup("fit")
    assert dm.report()[path]["dropped"] == {"prompt_fills_max_length": 8}
    assert (len(dm.train_set), len(dm.val_set)) == (1, 1) and kept_ids(dm) == {8, 9}
