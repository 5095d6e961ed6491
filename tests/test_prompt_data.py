"""Prompt-only data (data=prompts): validation and accounting as for preference data, string
and chat prompts, truncation, batches."""

from __future__ import annotations

import json

import pytest

from dpo_lightning.data.prompts import PromptBatch, PromptDataModule, PromptFormat
from dpo_lightning.data.report import InvalidDataError
from dpo_lightning.data.tokenize import encode_prompt
from dpo_lightning.run.errors import UserError

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def datamodule(tokenizer, path, **kw):
    kw = {"val_fraction": 0.25, "max_length": 64, "batch_size": 2} | kw
    dm = PromptDataModule(tokenizer, path=str(path), **kw)
    dm.setup("fit")
    return dm


GOOD = [{"prompt": f"Review of Iron Valley {i}:"} for i in range(6)]


def test_string_prompts_are_tokenised_as_preference_prompts(tokenizer, tmp_path):
    dm = datamodule(tokenizer, write_jsonl(tmp_path / "p.jsonl", GOOD))
    assert not dm.format.chat
    rows = [*dm.train_set, *dm.val_set]
    assert len(rows) == 6 and all(r["completion_ids"] == [] and r["pairs"] == [] for r in rows)
    by_row = {r["row_id"]: r["prompt_ids"] for r in rows}
    assert by_row[2] == encode_prompt(tokenizer, "Review of Iron Valley 2:")
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, PromptBatch) and batch["num_prompts"] == 2
    assert batch["prompt_ids"] == [by_row[i] for i in batch["prompt_row_ids"].tolist()]
    assert batch["num_pairs"] == 0 and batch["num_tokens"] == sum(len(p) for p in batch["prompt_ids"])
    report = dm.report()[str(tmp_path / "p.jsonl")]
    assert report["rows_in"] == 6 and report["rows_kept"] == 6 and report["rows_dropped"] == 0


def test_chat_prompts_end_with_the_generation_prompt(tokenizer, tmp_path):
    tok = tokenizer
    tok.chat_template = CHAT_TEMPLATE
    rows = [
        {"prompt": [{"role": "user", "content": "Review Iron Valley"}]},
        {"prompt": "a plain string is one user turn"},
        {"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]},
        {"prompt": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "done"}]},
    ]
    dm = datamodule(tok, write_jsonl(tmp_path / "c.jsonl", rows), on_invalid="skip", val_fraction=0.4)
    assert dm.format.chat
    kept = {r["row_id"]: r["prompt_ids"] for r in [*dm.train_set, *dm.val_set]}
    expected = tok.apply_chat_template(
        [{"role": "user", "content": "Review Iron Valley"}], tokenize=False, add_generation_prompt=True
    )
    assert expected.endswith("<|assistant|>")
    assert kept[0] == tok(expected, add_special_tokens=False)["input_ids"]
    report = next(iter(dm.report().values()))
    assert report["dropped"] == {"prompt_ends_with_assistant": 1} and report["example_rows"] == {
        "prompt_ends_with_assistant": [4]
    }
    tok.chat_template = None


def test_bad_rows_are_counted_with_their_lines_before_any_model_work(tokenizer, tmp_path):
    rows = [
        *GOOD,
        {"question": "no prompt column"},
        {"prompt": None},
        {"prompt": "   "},
        {"prompt": 42},
        "{not json",
        {"prompt": "word " * 200},  # fills max_length on its own
    ]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(InvalidDataError) as err:
        datamodule(tokenizer, path)
    text = str(err.value)
    for reason, line in [
        ("missing_prompt", 7),
        ("null_prompt", 8),
        ("empty_prompt", 9),
        ("wrong_type_prompt", 10),
        ("malformed_json_line", 11),
        ("prompt_fills_max_length", 12),
    ]:
        assert f"1 row(s) with {reason} (lines {line})" in text, reason
    dm = datamodule(tokenizer, path, on_invalid="skip")  # or drop and count
    report = dm.report()[str(path)]
    assert report["rows_in"] == 12 and report["rows_kept"] == 6 and report["rows_dropped"] == 6


def test_long_prompts_are_cut_and_counted_with_max_prompt_length(tokenizer, tmp_path):
    long = "word " * 200
    path = write_jsonl(tmp_path / "long.jsonl", [*GOOD, {"prompt": long}])
    dm = datamodule(tokenizer, path, max_prompt_length=30, truncation_mode="keep_start")
    kept = {r["row_id"]: r["prompt_ids"] for r in [*dm.train_set, *dm.val_set]}
    assert kept[6] == encode_prompt(tokenizer, long)[:30]  # keep_start: its first 30 tokens
    assert all(kept[i] == encode_prompt(tokenizer, GOOD[i]["prompt"]) for i in range(6))  # short: as is
    assert dm.report()[str(path)]["truncated"] == {"prompt": 1}


def test_columns_and_system_prompt_apply(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": f"Film {i}?"} for i in range(4)])
    dm = datamodule(tokenizer, path, columns={"prompt": "question"}, system_prompt="Critic.")
    ids = {r["row_id"]: r["prompt_ids"] for r in [*dm.train_set, *dm.val_set]}
    assert ids[1] == encode_prompt(tokenizer, "Critic.\n\nFilm 1?")


def test_a_preference_format_is_refused(tokenizer):
    with pytest.raises(UserError, match=r"data=prompts reads \{prompt\} rows with PromptFormat"):
        PromptDataModule(tokenizer, path="x.jsonl", format="standard")
    assert PromptFormat(chat=True).detect([{"prompt": "s"}]).chat  # an explicit choice is kept
