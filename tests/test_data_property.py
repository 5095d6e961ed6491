"""Property: whatever mix of valid rows and faults a file holds, in whatever source format,
every row is accounted for and every kept row trains.

Hypothesis draws a source (jsonl, json array, csv, parquet, ``save_to_disk``, a folder of jsonl
files, a hub data set of parquet shards with a local folder standing in), a policy
(``on_invalid`` error / skip), and how many rows of each kind, in a random order. Each row is
built to have exactly one fault (or none), so its expected kind and location are known. Checked:

* ``error``: the run stops iff there is a fault, with one line per (file, kind) giving the
  count and every location (at most 3 of a kind, so the first-five list is complete);
* ``skip``: per file, ``rows_in = rows_kept + Σ dropped``; each kind's count and locations are
  the expected ones; the row ids reaching a train or validation batch are exactly the kept
  rows' ids.

Every (source, policy) case runs in every test pass with a few derandomised examples (stable
in CI, ~20 s on 2 cores); the thorough variants draw ten times as many and are marked slow.
"""

from __future__ import annotations

import csv
import io
import json
import math
import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import datasets
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from dpo_lightning.data import sources
from dpo_lightning.data.datamodule import PreferenceDataModule
from dpo_lightning.data.ranked import RankedFormat
from dpo_lightning.data.report import InvalidDataError

MAX_LENGTH = 32
SHARED = " great film, great film, great film, great film,"  # > 21 tokens: cut, then the same


def pair(i: int, **change: Any) -> dict:
    return {"prompt": f"Review {i}:", "chosen": f" great {i}", "rejected": f" bad {i}"} | change


def ranked(i: int, completions: list | None = None, scores: list | None = None) -> dict:
    comps = completions or [f" great {i}", f" fine {i}", f" bad {i}"]
    return {"prompt": f"Review {i}:", "completions": comps, "scores": scores or [2.0, 1.0, 0.0]}


# kind -> how to build a row with exactly that fault: a dict, or a raw line (str / bytes) for
# faults below the row level. "valid*" kinds are kept.
PAIR_ROWS: dict[str, Callable[[int], Any]] = {
    "valid": pair,
    "null_chosen": lambda i: pair(i, chosen=None),
    "empty_rejected": lambda i: pair(i, rejected="   "),
    "chosen_equals_rejected": lambda i: pair(i, rejected=f" great {i}"),
    "differ_only_by_whitespace": lambda i: pair(i, rejected=f" great  {i}"),
    "identical_after_truncation": lambda i: pair(i, chosen=SHARED + " good", rejected=SHARED + " bad"),
    "prompt_fills_max_length": lambda i: pair(i, prompt=f"Review {i}: " + "so long " * 8),
    "wrong_type_prompt": lambda i: pair(i, prompt=i),
    "missing_chosen": lambda i: {k: v for k, v in pair(i).items() if k != "chosen"},
    "unencodable_text": lambda i: pair(i, chosen=f" great \ud800 {i}"),  # json.dumps escapes it
    "not_a_json_object": lambda i: [i],
    "malformed_json_line": lambda i: f'{{"prompt": "Review {i}:", "chosen": ',
    "undecodable_line": lambda i: b'{"prompt": "Review %d:", "chosen": " \xff", "rejected": " b"}' % i,
}
CSV_ROWS: dict[str, Callable[[int], Any]] = {
    **{k: PAIR_ROWS[k] for k in ("valid", "empty_rejected", "chosen_equals_rejected")},
    **{k: PAIR_ROWS[k] for k in ("differ_only_by_whitespace", "identical_after_truncation")},
    "prompt_fills_max_length": PAIR_ROWS["prompt_fills_max_length"],
    "null_chosen": PAIR_ROWS["null_chosen"],  # an empty cell
    "csv_extra_fields": lambda i: f"Review {i}:, great {i}, bad {i}, extra",
    "csv_missing_fields": lambda i: f"Review {i}:, great {i}",
    "malformed_csv_line": lambda i: f'Review {i}:,"great" {i}, bad',
    "undecodable_line": lambda i: b"Review %d:, great \xff, bad" % i,
}
JSONL_ONLY = {"malformed_json_line", "undecodable_line"}
ARROW_KINDS = (
    "valid",
    "null_chosen",
    "empty_rejected",
    "chosen_equals_rejected",
    "differ_only_by_whitespace",
)
ARROW_ROWS = {
    k: PAIR_ROWS[k] for k in (*ARROW_KINDS, "identical_after_truncation", "prompt_fills_max_length")
}
RANKED_ROWS: dict[str, Callable[[int], Any]] = {
    "valid": ranked,
    # one pair loses its signal (whitespace): the row is kept with the other pairs
    "valid_partial": lambda i: ranked(i, [f" great {i}", f" great  {i}", f" bad {i}"]),
    "nonfinite_score": lambda i: ranked(i, scores=[2.0, math.nan if i % 2 else math.inf, 0.0]),
    "null_score": lambda i: ranked(i, scores=[2.0, None, 0.0]),
    "fewer_than_two_distinct_scores": lambda i: ranked(i, scores=[1.0, 1.0, 1.0]),
    "differ_only_by_whitespace": lambda i: ranked(i, [f" ok {i}", f" ok  {i}", f"  ok {i}"]),
    "identical_after_truncation": lambda i: ranked(i, [SHARED + " a", SHARED + " b", SHARED + " c"]),
}

# source -> (row kinds it can hold, how many files it is written as)
PAIR_SOURCES = {
    "jsonl": (PAIR_ROWS, 1),
    "json": ({k: v for k, v in PAIR_ROWS.items() if k not in JSONL_ONLY}, 1),
    "csv": (CSV_ROWS, 1),
    "parquet": (ARROW_ROWS, 1),
    "save_to_disk": (ARROW_ROWS, 1),
    "folder": (PAIR_ROWS, 2),
    "hub": (ARROW_ROWS, 2),
}
RANKED_SOURCES = {"jsonl": (RANKED_ROWS, 1), "parquet": (RANKED_ROWS, 1)}


def encode(row: Any) -> bytes:
    if isinstance(row, bytes):
        return row
    return (row if isinstance(row, str) else json.dumps(row)).encode()


def csv_line(row: Any) -> bytes:
    if not isinstance(row, dict):
        return encode(row)
    buf = io.StringIO()
    csv.writer(buf, lineterminator="").writerow([row["prompt"], row["chosen"], row["rejected"]])
    return buf.getvalue().encode()


def write_file(source: str, path: Path, rows: list[Any]) -> tuple[Path, int]:
    """Write ``rows`` as one file of ``source``; returns its path and the first row's location."""
    if source == "csv":
        path.write_bytes(b"prompt,chosen,rejected\n" + b"".join(csv_line(r) + b"\n" for r in rows))
        return path, 2
    if source == "json":
        path.write_text("[" + ",".join(json.dumps(r) for r in rows) + "]")
        return path, 1
    if source in ("parquet", "hub", "save_to_disk"):
        ds = datasets.Dataset.from_list(rows)
        if source == "save_to_disk":
            datasets.DatasetDict(train=ds).save_to_disk(str(path))
        else:
            ds.to_parquet(str(path))
        return path, 1
    path.write_bytes(b"".join(encode(r) + b"\n" for r in rows))
    return path, 1


SUFFIX = {"jsonl": ".jsonl", "json": ".json", "csv": ".csv", "parquet": ".parquet", "save_to_disk": ""}
SUFFIX |= {"folder": ".jsonl", "hub": ".parquet"}


def build(source: str, n_files: int, kinds: list[str], table: dict, root: Path) -> tuple[str, list[tuple]]:
    """Write the data; returns ``data.path`` and per row ``(label, location, row_id, kind)``."""
    rows = [table[k](i) for i, k in enumerate(kinds)]
    cut = len(rows) // 2 if n_files == 2 else len(rows)
    shards = [rows[:cut], rows[cut:]][:n_files] if n_files == 2 else [rows]
    folder = root / "data"
    folder.mkdir(parents=True)
    expected, first_id, at = [], 0, 0
    for n, shard in enumerate(shards):
        name = f"train-{n:05d}-of-{n_files:05d}{SUFFIX[source]}" if n_files == 2 else f"pairs{SUFFIX[source]}"
        path, start = write_file(source, folder / name, shard)
        label = f"{path}[train]" if source == "save_to_disk" else str(path)
        for j in range(len(shard)):
            location = start + j
            expected.append((label, location, first_id + location - 1, kinds[at]))
            at += 1
        first_id += start + len(shard) - 1  # the next file numbers on after this one's last line
    data_path = str(folder if n_files == 2 else folder / f"pairs{SUFFIX[source]}")
    return ("someone/pairs" if source == "hub" else data_path), expected


def check(tokenizer, source: str, table: dict, n_files: int, kinds: list[str], policy: str, fmt) -> None:
    event("with faults" if any(not k.startswith("valid") for k in kinds) else "all valid")
    with tempfile.TemporaryDirectory() as tmp:
        path, expected = build(source, n_files, kinds, table, Path(tmp))
        dm = PreferenceDataModule(
            tokenizer,
            path=path,
            format=fmt,
            max_length=MAX_LENGTH,
            batch_size=4,
            on_invalid=policy,
            cache_dir=f"{tmp}/cache",
        )
        real = datasets.load_dataset_builder
        folder = str(Path(tmp) / "data")
        redirect = lambda p, name=None, **kw: real(folder if p == "someone/pairs" else p, name, **kw)  # noqa: E731
        with mock.patch.object(sources.datasets, "load_dataset_builder", redirect):
            assert_accounted(dm, expected, policy)


def assert_accounted(dm: PreferenceDataModule, expected: list[tuple], policy: str) -> None:
    faults = defaultdict(list)  # (label, kind) -> locations
    for label, location, _, kind in expected:
        if not kind.startswith("valid"):
            faults[label, kind].append(location)
    if policy == "error" and faults:
        with pytest.raises(InvalidDataError) as err:
            dm.setup("fit")
        lines = str(err.value).splitlines()[1:]
        assert len(lines) == len(faults)
        for (label, kind), locs in faults.items():
            unit = "row" if label.endswith(("]", ".parquet")) else "line"
            head = f"{label}: {len(locs)} row(s) with {kind} ({unit}s {', '.join(map(str, locs))})"
            assert any(line.startswith(head) for line in lines), (head, lines)
        return
    dm.setup("fit")
    reports = dm.report()
    for label in {e[0] for e in expected}:
        r = reports[label]
        mine = [e for e in expected if e[0] == label]
        assert r["rows_in"] == len(mine) == r["rows_kept"] + sum(r["dropped"].values())
        want = Counter(e[3] for e in mine if not e[3].startswith("valid"))
        assert r["dropped"] == dict(want)
        assert r["example_rows"] == {k: locs for (lb, k), locs in faults.items() if lb == label}
    kept = {e[2] for e in expected if e[3].startswith("valid")}
    trained = {i for b in dm.train_dataloader() for i in b["pair_row_ids"].tolist()}
    validated = {i for b in dm.val_dataloader() for i in b["pair_row_ids"].tolist()}
    assert trained | validated == kept and not trained & validated
    assert trained == set(dm.train_set["row_id"]) and validated == set(dm.val_set["row_id"])


def kinds_of(table: dict) -> st.SearchStrategy[list[str]]:
    """The kind of each row of a file, in a random order: 3-10 valid rows, 0-3 of each fault."""

    @st.composite
    def draw_kinds(draw) -> list[str]:
        counts = {k: draw(st.integers(3, 10) if k == "valid" else st.integers(0, 3)) for k in sorted(table)}
        kinds = [k for k, n in counts.items() for _ in range(n)]
        draw(st.randoms(use_true_random=False)).shuffle(kinds)
        return kinds

    return draw_kinds()


# Every example builds files and a DataModule (0.1-1 s): bounded by example count, not deadline.
BOUNDED = dict(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
QUICK = settings(max_examples=4, derandomize=True, **BOUNDED)  # x 18 (source, policy) cases
THOROUGH = settings(max_examples=40, **BOUNDED)
POLICIES = ["error", "skip"]
PAIR_CASES = [(src, pol) for src in PAIR_SOURCES for pol in POLICIES]
RANKED_CASES = [(src, pol) for src in RANKED_SOURCES for pol in POLICIES]


def run_case(tokenizer, sources_table: dict, source: str, policy: str, kinds: list[str], fmt) -> None:
    table, n_files = sources_table[source]
    check(tokenizer, source, table, n_files, kinds, policy, fmt)


@pytest.mark.parametrize(("source", "policy"), PAIR_CASES)
@QUICK
@given(data=st.data())
def test_every_row_is_accounted_for_in_every_source(tokenizer, source, policy, data):
    kinds = data.draw(kinds_of(PAIR_SOURCES[source][0]))
    run_case(tokenizer, PAIR_SOURCES, source, policy, kinds, "standard")


@pytest.mark.parametrize(("source", "policy"), RANKED_CASES)
@QUICK
@given(data=st.data())
def test_every_ranked_row_is_accounted_for(tokenizer, source, policy, data):
    kinds = data.draw(kinds_of(RANKED_SOURCES[source][0]))
    run_case(tokenizer, RANKED_SOURCES, source, policy, kinds, RankedFormat())


@pytest.mark.slow
@pytest.mark.parametrize(("source", "policy"), PAIR_CASES)
@THOROUGH
@given(data=st.data())
def test_every_row_is_accounted_for_thorough(tokenizer, source, policy, data):
    kinds = data.draw(kinds_of(PAIR_SOURCES[source][0]))
    run_case(tokenizer, PAIR_SOURCES, source, policy, kinds, "standard")


@pytest.mark.slow
@pytest.mark.parametrize(("source", "policy"), RANKED_CASES)
@THOROUGH
@given(data=st.data())
def test_every_ranked_row_is_accounted_for_thorough(tokenizer, source, policy, data):
    kinds = data.draw(kinds_of(RANKED_SOURCES[source][0]))
    run_case(tokenizer, RANKED_SOURCES, source, policy, kinds, RankedFormat())
