"""Tool-calling conversations: ``tools`` passed to the chat template, ``tool_calls`` and ``tool``
messages kept, the prompt-prefix check, and faults counted (fixtures: nvidia/When2Call's
``train_pref`` schema and TRL's conversational schema with tools)."""

from __future__ import annotations

import json

import pytest

from dpo_lightning.data.chat import ConversationalFormat, render_messages, tokenize_chat_batch
from dpo_lightning.data.datamodule import PreferenceDataModule
from dpo_lightning.data.formats import InvalidRow
from dpo_lightning.data.report import InvalidDataError
from dpo_lightning.data.tokenize import Limits
from dpo_lightning.models.tokenizers import offline_sentiment_tokenizer
from tests.conftest import run_cli
from tests.test_data_module import FIXTURES

TOOLS = [{"type": "function", "function": {"name": "find_reviews", "parameters": {"type": "object"}}}]
CALL = {"type": "function", "function": {"name": "find_reviews", "arguments": {"title": "Quiet Storm"}}}


def rows(name):
    return [json.loads(line) for line in (FIXTURES / name).read_text().splitlines()]


@pytest.fixture(scope="module")
def chat_tokenizer():
    return offline_sentiment_tokenizer(vocab_size=512, n=400)


def reason(fmt, row):
    with pytest.raises(InvalidRow) as err:
        fmt(row)
    return str(err.value)


def test_tool_calls_and_tool_messages_are_kept_and_normalised():
    row = rows("tool_conversations.jsonl")[1]  # tools JSON-encoded, string arguments in rejected
    out = ConversationalFormat()(row)
    prompt = render_messages(out["prompt"])
    assert [m["role"] for m in prompt] == ["user", "assistant", "tool"]
    assert prompt[1]["tool_calls"] == [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "find_reviews", "arguments": {"title": "Velvet Hours"}},
        }
    ]
    assert prompt[2]["tool_call_id"] == "call_1" and prompt[2]["name"] == "find_reviews"
    (rejected,) = render_messages(out["completions"][1])
    # OpenAI-style string arguments parsed into the object templates expect; null content -> "".
    assert rejected["content"] == "" and rejected["tool_calls"][0]["function"]["arguments"] == {
        "title": "Velvet Hours"
    }
    assert json.loads(out["tools"]) == json.loads(row["tools"])
    # The same row with tools as a list gives the same output.
    assert ConversationalFormat()({**row, "tools": json.loads(row["tools"])}) == out


def test_when2call_tagged_calls_become_tool_calls():
    fmt = ConversationalFormat(
        tool_call_tags=["<TOOLCALL>", "</TOOLCALL>"],
        columns={"prompt": "messages", "chosen": "chosen_response", "rejected": "rejected_response"},
    )
    row = rows("when2call.jsonl")[0]
    out = fmt(row)
    (chosen,) = render_messages(out["completions"][0])
    assert chosen == {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"type": "function", "function": {"name": "find_reviews", "arguments": {"title": "Quiet Storm"}}}
        ],
    }
    assert render_messages(out["completions"][1])[0]["content"] == row["rejected_response"]["content"]
    assert json.loads(out["tools"]) == row["tools"]
    broken = {**row, "chosen_response": {"role": "assistant", "content": "<TOOLCALL>[{oops</TOOLCALL>"}}
    assert reason(fmt, broken) == "malformed_tool_call_chosen_response"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            {"chosen": [{"role": "assistant", "tool_calls": [{"function": {"arguments": {}}}]}]},
            "malformed_tool_call_chosen",
        ),
        ({"chosen": [{"role": "assistant", "tool_calls": "not json"}]}, "malformed_tool_call_chosen"),
        ({"chosen": [{"role": "assistant", "tool_calls": []}]}, "malformed_tool_call_chosen"),
        (
            {
                "chosen": [
                    {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}
                ]
            },
            "malformed_tool_call_chosen",
        ),
        ({"prompt": [{"role": "user", "content": "q", "tool_calls": [CALL]}]}, "malformed_tool_call_prompt"),
        ({"tools": {"name": "f"}}, "malformed_tools"),
        ({"tools": [{"description": "no name"}]}, "malformed_tools"),
        ({"tools": "{not json"}, "malformed_tools"),
        (
            {
                "chosen": [
                    {"role": "assistant", "content": "", "tool_calls": [CALL]},
                    {"role": "tool", "content": "42 reviews"},
                    {"role": "assistant", "content": "Loved."},
                ]
            },
            "tool_message_in_completion",
        ),
    ],
)
def test_malformed_tool_rows_are_named_faults(change, expected):
    good = {
        "prompt": [{"role": "user", "content": "Reviews of Quiet Storm?"}],
        "chosen": [{"role": "assistant", "content": "", "tool_calls": [CALL]}],
        "rejected": [{"role": "assistant", "content": "No idea."}],
        "tools": TOOLS,
    }
    ConversationalFormat()(good)  # the row itself is fine
    assert reason(ConversationalFormat(), {**good, **change}) == expected


def test_tokenisation_passes_tools_to_the_template_as_trl_does(chat_tokenizer):
    """TRL 1.16 ``DPOTrainer`` (``tokenize_fn``): prompt ids = ``apply_chat_template(prompt,
    tools=tools, add_generation_prompt=True)``, chosen ids = the rest of
    ``apply_chat_template(prompt + chosen, tools=tools)``. The same ids here, tools in both."""
    row = rows("tool_conversations.jsonl")[0]
    ex = ConversationalFormat()(row)
    batch = {k: [v] for k, v in ex.items()} | {"row_id": [0]}
    out = {k: v[0] for k, v in tokenize_chat_batch(batch, chat_tokenizer, Limits(512)).items()}
    tools, prompt = row["tools"], render_messages(ex["prompt"])

    def ids(messages, **kw):
        return chat_tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=True, return_dict=True, **kw
        )["input_ids"]

    prompt_ids = ids(prompt, add_generation_prompt=True)
    assert out["drop_reason"] is None and out["notes"] == []
    assert out["prompt_ids"] == prompt_ids
    for k, completion in enumerate(ex["completions"]):
        full = ids(prompt + render_messages(completion))
        assert full[: len(prompt_ids)] == prompt_ids  # the prompt-prefix check passed
        assert out["completion_ids"][k] == full[len(prompt_ids) :]
    text = chat_tokenizer.decode(out["prompt_ids"])
    assert "# Tools" in text and '"find_reviews"' in text and "<|tool|>" in text
    rejected = chat_tokenizer.decode(out["completion_ids"][1])
    assert (
        rejected
        == '<tool_call>{"name": "find_reviews", "arguments": {"title": "Quiet Storm"}}</tool_call></s>\n'
    )


def test_the_prompt_prefix_check_applies_to_tool_rows(chat_tokenizer):
    tok = offline_sentiment_tokenizer(vocab_size=512, n=400)
    # Tools rendered after the messages: the generation prompt is not a prefix of the whole.
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if tools %}<|tools|>{{ tools | tojson }}</s>\n{% endif %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    ex = ConversationalFormat()(rows("tool_conversations.jsonl")[0])
    batch = {k: [v] for k, v in ex.items()} | {"row_id": [0]}
    out = tokenize_chat_batch(batch, tok, Limits(512))
    assert out["drop_reason"] == ["chat_template_not_prefix"]


def test_datamodule_renders_each_row_exactly_as_given(chat_tokenizer, tmp_path):
    """Rows whose messages and arguments have different keys go through one Arrow table: no
    null keys may reach the template (the arguments are rendered exactly as written)."""
    source = rows("tool_conversations.jsonl")[:4]
    source[2]["prompt"][1]["tool_calls"][0]["function"]["arguments"] = {"title": "Velvet", "year": 1999}
    path = tmp_path / "tools.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in source) + "\n")
    dm = PreferenceDataModule(
        chat_tokenizer, path=str(path), format="conversational", max_length=512, val_fraction=0.25
    )
    dm.setup("fit")
    by_row = {}
    for split in (dm.train_set, dm.val_set):
        for r, p, c in zip(split["row_id"], split["prompt_ids"], split["completion_ids"], strict=True):
            by_row[r] = (p, c)
    for i, row in enumerate(source):
        tools = row["tools"] if isinstance(row["tools"], list) else json.loads(row["tools"])
        prompt = chat_tokenizer.apply_chat_template(
            render_messages(ConversationalFormat()(row)["prompt"]),
            tools=tools,
            tokenize=False,
            add_generation_prompt=True,
        )
        assert chat_tokenizer.decode(by_row[i][0]) == prompt, i
    assert '"year": 1999' in chat_tokenizer.decode(by_row[2][0])
    assert "null" not in chat_tokenizer.decode(by_row[0][0])


def test_bad_tool_rows_are_counted_or_stop_the_run(chat_tokenizer, tmp_path):
    good = rows("tool_conversations.jsonl")[:6]
    bad = [
        {
            **good[0],
            "rejected": [
                {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{x"}}]}
            ],
        },
        {**good[1], "tools": 7},
        {**good[2], "chosen": good[2]["chosen"] + [{"role": "tool", "content": "more"}]},
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [*good, *bad]) + "\n")
    args = dict(path=str(path), format="conversational", max_length=512, val_fraction=0.2)
    with pytest.raises(InvalidDataError) as err:
        PreferenceDataModule(chat_tokenizer, **args).setup("fit")
    message = str(err.value)
    for kind, line in (
        ("malformed_tool_call_rejected", 7),
        ("malformed_tools", 8),
        ("tool_message_in_completion", 9),
    ):
        assert f"1 row(s) with {kind} (lines {line})" in message, message
    dm = PreferenceDataModule(chat_tokenizer, **args, on_invalid="skip")
    dm.setup("fit")
    (report,) = dm.report().values()
    assert report["rows_in"] == 9 and report["rows_kept"] == 6 and report["rows_dropped"] == 3


@pytest.mark.slow
def test_cli_trains_on_tool_conversations(tmp_path):
    fixture = FIXTURES / "tool_conversations.jsonl"
    run = tmp_path / "run"
    args = ["data=file", f"data.path={fixture}", "data.max_length=512", "debug=fast", "trainer.max_steps=2"]
    run_cli([*args, f"data.cache_dir={tmp_path}/cache", f"hydra.run.dir={run}"], tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    report = summary["data"][str(fixture)]
    assert summary["steps"] == 2 and report["rows_kept"] == 24 and summary["rows_dropped"] == 0
