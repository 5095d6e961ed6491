"""Every source the DataModule reads is validated row by row, with file and line / row numbers:
csv, parquet, ``save_to_disk`` folders, folders of data files, hub data sets (a local folder
standing in), JSON; text that cannot be encoded is an invalid row wherever it can occur."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pyarrow as pa
import pytest

from dpo_lightning.data import sources
from dpo_lightning.data.ranked import RankedFormat
from dpo_lightning.data.report import InvalidDataError
from tests.test_data_module import make_dm


def pair(i: int, **change) -> dict:
    return {"prompt": f"Review {i}:", "chosen": f" great film {i}", "rejected": f" bad film {i}"} | change


def jsonl(rows: list) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def csv_text(rows: list) -> str:
    """Header + one line per row (a dict's values, or a raw string line)."""
    lines = ["prompt,chosen,rejected"]
    lines += [r if isinstance(r, str) else ",".join(r.values()) for r in rows]
    return "\n".join(lines) + "\n"


def fault_lines(dm) -> list[str]:
    with pytest.raises(InvalidDataError) as err:
        dm.setup("fit")
    return str(err.value).splitlines()[1:]


def kept_ids(dm) -> set[int]:
    return set(dm.train_set["row_id"]) | set(dm.val_set["row_id"])


# Line of the csv below (header = line 1) -> its fault.
CSV_FAULTS = {5: "csv_extra_fields", 7: "csv_missing_fields", 9: "malformed_csv_line", 11: "null_rejected"}


def bad_csv(path: Path) -> Path:
    rows = [pair(i) for i in range(12)]
    lines = [",".join(r.values()) for r in rows]
    lines[3] = "Review 3:, great,film, bad"  # line 5: one field too many (an unquoted comma)
    lines[5] = "Review 5:, great film 5"  # line 7: one field missing
    lines[7] = 'Review 7:,"great" film, bad'  # line 9: a quote inside an unquoted field
    lines[9] = "Review 9:, great film 9,"  # line 11: an empty cell is null
    path.write_text("prompt,chosen,rejected\n" + "\n".join(lines) + "\n")
    return path


def test_csv_line_faults_name_their_line_instead_of_a_generation_error(tokenizer, tmp_path):
    path = bad_csv(tmp_path / "pairs.csv")
    lines = fault_lines(make_dm(tokenizer, tmp_path, path=str(path)))
    assert sorted(lines) == sorted(
        f"{path}: 1 row(s) with {kind} (lines {n})" + _hint(kind) for n, kind in CSV_FAULTS.items()
    )
    dm = make_dm(tokenizer, tmp_path, path=str(path), on_invalid="skip")
    dm.setup("fit")
    report = dm.report()[str(path)]
    assert report["dropped"] == {kind: 1 for kind in CSV_FAULTS.values()}
    assert report["rows_in"] == 12 and report["rows_kept"] == 8 and report["unit"] == "line"
    assert kept_ids(dm) == {line - 1 for line in range(2, 14)} - {n - 1 for n in CSV_FAULTS}


def _hint(kind: str) -> str:
    from dpo_lightning.data.report import hint

    return hint(kind)


def test_csv_quoted_fields_keep_commas_newlines_and_numbers_as_text(tokenizer, tmp_path):
    path = tmp_path / "quoted.csv"
    path.write_text(
        'prompt,chosen,rejected\n"2024","yes, it is"," no\nnot at all"\n'
        + "\n".join(",".join(pair(i).values()) for i in range(4))
        + "\n"
    )
    dm = make_dm(tokenizer, tmp_path, path=str(path), val_fraction=0.01)
    dm.setup("fit")
    assert dm.report()[str(path)]["rows_in"] == 5 and not dm.report()[str(path)]["dropped"]
    row = next(r for r in dm.train_set.to_list() + dm.val_set.to_list() if r["row_id"] == 1)
    # "2024" is a prompt, not a number: only the format's number columns are parsed
    assert tokenizer.decode(row["prompt_ids"]) == "<s>2024"
    assert tokenizer.decode(row["completion_ids"][1]).startswith(" no\nnot at all")
    # the record starting on line 2 spans lines 2-3: the next row starts on line 4
    assert kept_ids(dm) == {1, 3, 4, 5, 6}


def test_csv_score_cells_are_numbers_one_bad_cell_faults_one_row(tokenizer, tmp_path):
    path = tmp_path / "shp.csv"
    lines = ["history,human_ref_A,human_ref_B,score_A,score_B"]
    lines += [f"post {i},answer a{i},answer b{i},{i},{i + 2.5}" for i in range(8)]
    lines[3] = "post 2,answer a2,answer b2,abc,3"  # a typo in one score cell
    lines[5] = "post 4,answer a4,answer b4,nan,3"  # NaN in a csv score
    path.write_text("\n".join(lines) + "\n")
    fmt = RankedFormat(
        completion_columns=["human_ref_A", "human_ref_B"],
        score_columns=["score_A", "score_B"],
        prompt_template="{history}\n\n",
    )
    dm = make_dm(tokenizer, tmp_path, path=str(path), format=fmt, on_invalid="skip")
    dm.setup("fit")
    report = dm.report()[str(path)]
    assert report["dropped"] == {"wrong_type_score": 1, "nonfinite_score": 1}
    assert report["example_rows"] == {"wrong_type_score": [4], "nonfinite_score": [6]}
    assert report["rows_kept"] == 6
    # B scores higher in every row: the pair is (B, A) after the format's re-indexing
    assert all(p == [[1, 0]] for p in dm.train_set["pairs"])


def make_folder(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_folder_with_one_malformed_file_names_the_file_and_line(tokenizer, tmp_path):
    shards = {
        "data/train-00000.jsonl": jsonl([pair(i) for i in range(10)]),
        "data/train-00001.jsonl": jsonl([pair(i) for i in range(10, 14)] + ["{not json"] + [pair(14)]),
        "data/test-00000.jsonl": jsonl([pair(i) for i in range(20, 24)]),
    }
    folder = make_folder(tmp_path / "folder", shards)
    bad = folder / "data/train-00001.jsonl"
    lines = fault_lines(make_dm(tokenizer, tmp_path, path=str(folder), val_split="test"))
    assert lines == [f"{bad}: 1 row(s) with malformed_json_line (lines 5) — the line is not one JSON object"]
    dm = make_dm(tokenizer, tmp_path, path=str(folder), val_split="test", on_invalid="skip")
    dm.setup("fit")
    report = dm.report()
    assert set(report) == {str(folder / name) for name in shards}  # one report per file
    assert report[str(bad)]["rows_in"] == 6 and report[str(bad)]["rows_kept"] == 5
    # ids are unique across the split's files: the second file's numbering follows the first's
    assert sorted(dm.train_set["row_id"]) == [*range(10), 10, 11, 12, 13, 15]
    assert len(dm.val_set) == 4


def test_hub_dataset_files_are_read_and_located_like_a_folder(tokenizer, tmp_path, monkeypatch):
    # A local folder stands in for a hub repo: only the resolution of "someone/pairs" to its
    # builder is redirected, the rest (data files, download manager, readers) is the hub path.
    folder = tmp_path / "repo"
    (folder / "data").mkdir(parents=True)
    rows = [pair(i) for i in range(12)]
    rows[6] = pair(6, rejected=None)
    datasets.Dataset.from_list(rows[:8]).to_parquet(str(folder / "data/train-00000-of-00002.parquet"))
    datasets.Dataset.from_list(rows[8:]).to_parquet(str(folder / "data/train-00001-of-00002.parquet"))
    val_rows = [pair(30), pair(31, chosen=" bad  film 31"), pair(32)]
    datasets.Dataset.from_list(val_rows).to_parquet(str(folder / "data/validation-00000-of-00001.parquet"))
    real = datasets.load_dataset_builder
    asked = []

    def hub(path, name=None, **kwargs):
        asked.append(path)
        return real(str(folder) if path == "someone/pairs" else path, name, **kwargs)

    monkeypatch.setattr(sources.datasets, "load_dataset_builder", hub)
    lines = fault_lines(make_dm(tokenizer, tmp_path, path="someone/pairs"))
    assert asked == ["someone/pairs"]
    first, val = (
        folder / "data/train-00000-of-00002.parquet",
        folder / "data/validation-00000-of-00001.parquet",
    )
    assert sorted(lines) == [
        f"{first}: 1 row(s) with null_rejected (rows 7)",
        f"{val}: 1 row(s) with differ_only_by_whitespace (rows 2){_hint('differ_only_by_whitespace')}",
    ]


def test_save_to_disk_rows_are_validated_with_row_numbers(tokenizer, tmp_path):
    rows = [pair(i) for i in range(10)]
    rows[2] = pair(2, chosen="  ")
    rows[7] = pair(7, chosen=" same", rejected=" same")
    saved = tmp_path / "saved"
    datasets.DatasetDict(
        train=datasets.Dataset.from_list(rows), validation=datasets.Dataset.from_list([pair(20), pair(21)])
    ).save_to_disk(str(saved))
    dm = make_dm(tokenizer, tmp_path, path=str(saved), on_invalid="skip")
    dm.setup("fit")
    report = dm.report()[f"{saved}[train]"]
    assert report["example_rows"] == {"empty_chosen": [3], "chosen_equals_rejected": [8]}
    assert report["rows_kept"] == 8 and len(dm.val_set) == 2


def test_unreadable_parquet_file_is_one_error_naming_it(tokenizer, tmp_path):
    path = tmp_path / "broken.parquet"
    datasets.Dataset.from_list([pair(i) for i in range(6)]).to_parquet(str(path))
    path.write_bytes(path.read_bytes()[:-40])  # a truncated download
    with pytest.raises(InvalidDataError, match=f"{path}: not a readable parquet file"):
        make_dm(tokenizer, tmp_path, path=str(path)).setup("fit")


def test_lone_surrogates_are_invalid_rows_in_every_source_that_can_hold_them(tokenizer, tmp_path):
    # JSON escapes can spell a lone surrogate; it used to crash Arrow / the tokenizer.
    lines = [json.dumps(pair(i)) for i in range(8)]
    lines[2] = '{"prompt": "Review \\ud800:", "chosen": " a", "rejected": " b"}'
    lines[5] = '{"prompt": "Review 5:", "chosen": " \\udfff", "rejected": " b"}'
    path = tmp_path / "s.jsonl"
    path.write_text("\n".join(lines) + "\n")
    array = tmp_path / "s.json"
    array.write_text("[" + ",".join(lines) + "]")
    for p, unit in ((path, "lines"), (array, "lines")):
        assert fault_lines(make_dm(tokenizer, tmp_path, path=str(p))) == [
            f"{p}: 2 row(s) with unencodable_text ({unit} 3, 6){_hint('unencodable_text')}"
        ]
    ranked = tmp_path / "k.jsonl"
    msgs = [{"role": "user", "content": "hi \ud83d"}]
    ranked.write_text(
        jsonl(
            [{"prompt": "p", "completions": ["a", "b\ud800c"], "scores": [1, 0]}]
            + [{"prompt": msgs, "completions": ["a", "b"], "scores": [1, 0]}]
            + [{"prompt": f"p{i}", "completions": ["a", "b"], "scores": [1, 0]} for i in range(4)]
        )
    )
    dm = make_dm(tokenizer, tmp_path, path=str(ranked), format=RankedFormat(chat=True), on_invalid="skip")
    dm.setup("fit")
    assert dm.report()[str(ranked)]["example_rows"] == {"unencodable_text": [1, 2]}
    # csv: bytes that are not UTF-8 fault their own line, the file is still read
    raw = tmp_path / "b.csv"
    raw.write_bytes(csv_text([pair(i) for i in range(5)]).encode().replace(b"great film 3", b"great \xff 3"))
    assert fault_lines(make_dm(tokenizer, tmp_path, path=str(raw))) == [
        f"{raw}: 1 row(s) with undecodable_line (lines 5) — the line is not UTF-8"
    ]
    # Arrow-backed sources (parquet, save_to_disk, the hub's parquet) cannot hold one at all.
    with pytest.raises((UnicodeEncodeError, pa.ArrowException)):
        datasets.Dataset.from_list([pair(0, chosen="x\ud800")])


def test_tsv_file_and_a_folder_of_csv_files(tokenizer, tmp_path):
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text(
        "prompt\tchosen\trejected\n" + "".join(f"Review {i}:\t good, {i}\t bad {i}\n" for i in range(6))
    )
    tsv.write_text(tsv.read_text() + "Review 9:\tgood\tbad\textra\n")  # line 8
    assert fault_lines(make_dm(tokenizer, tmp_path, path=str(tsv))) == [
        f"{tsv}: 1 row(s) with csv_extra_fields (lines 8){_hint('csv_extra_fields')}"
    ]
    folder = make_folder(
        tmp_path / "csvs",
        {"train.csv": csv_text([pair(i) for i in range(6)]), "test.csv": csv_text([pair(9)])},
    )
    dm = make_dm(tokenizer, tmp_path, path=str(folder), val_split="test")
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set)) == (6, 1)
    assert dm.report()[str(folder / "train.csv")]["unit"] == "line"
