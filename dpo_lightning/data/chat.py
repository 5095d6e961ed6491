"""Conversational rows: message lists rendered with the tokenizer's chat template.

Accepted shapes (UltraFeedback-binarized style and its relatives):

* ``prompt`` a list of ``{role, content}`` messages (or a string: one user turn) and
  ``chosen`` / ``rejected`` lists of assistant messages (or strings: one assistant turn);
* ``chosen`` / ``rejected`` whole conversations repeating the prompt: the shared leading
  messages are the prompt (``columns.prompt: null``, or a prompt equal to that prefix);
* a completion may also be one assistant message as a dict (nvidia/When2Call's
  ``chosen_response``).

Tool calling (the schema HF chat templates and TRL 1.16 read): a ``tools`` column (a list of
function specs, or that list JSON-encoded) is passed to ``apply_chat_template(tools=...)`` for
the prompt and the whole conversation alike; assistant messages keep their ``tool_calls``
(``[{type: function, function: {name, arguments}}]``; a flat ``{name, arguments}`` is accepted)
and ``tool`` messages their ``tool_call_id`` / ``name``. ``arguments`` given as a JSON string (the
OpenAI API's form) are parsed into an object, as chat templates expect and serving stacks do
before rendering. With ``tool_call_tags`` (``["<TOOLCALL>", "</TOOLCALL>"]`` for When2Call), a
JSON list of calls written inside those tags in an assistant's text becomes its ``tool_calls``, so
the model's own template renders them. Counted faults: ``malformed_tool_call_<column>`` (not a
list of calls, a call without a function name, arguments that are not an object),
``malformed_tools``, and ``tool_message_in_completion`` (a tool result inside a completion would
be trained on as if the model wrote it: it belongs to the prompt). Tool calls and tools travel
through the data set JSON-encoded: Arrow would otherwise merge their nested schemas across rows
and add null keys to the arguments the template renders.

Tokenisation (:func:`tokenize_chat_batch`) renders the prompt with
``apply_chat_template(..., add_generation_prompt=True)`` — exactly what the model sees at
inference — and the whole conversation without it. The prompt's ids must be a prefix of the whole
conversation's ids; the completion is the rest. When a template breaks that (tokens merged across
the boundary, or a history rendered differently from the generation prompt) the example is never
trained on a context that differs from inference:

* the text still starts with the rendered prompt → the completion text is tokenised on its own
  after the inference prompt's ids (note ``chat_completion_retokenized``);
* otherwise → dropped (``chat_template_not_prefix``).

No EOS is added: the chat template ends the assistant turn itself.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from transformers import PreTrainedTokenizerBase

from dpo_lightning.data.formats import (
    InvalidRow,
    RowFormat,
    check_preference,
    check_text,
    common_prefix,
    require_value,
)
from dpo_lightning.data.tokenize import (
    Limits,
    TokenizedExample,
    dedup_bos,
    drop_signal_free_pairs,
    example_record,
)

ROLES = ("system", "user", "assistant", "tool")
#: Message keys kept besides role and content: what chat templates read for tool calling.
TOOL_KEYS = ("tool_calls", "tool_call_id", "name")


def _as_json_object(value: Any) -> dict[str, Any] | None:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    return value if isinstance(value, dict) else None


def check_tool_calls(value: Any, key: str) -> str:
    """A non-empty list of calls, normalised to ``{type: function, function: {name, arguments}}``
    (plus ``id`` when given) and JSON-encoded; else ``malformed_tool_call_<key>``."""
    fault = InvalidRow(f"malformed_tool_call_{key}")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise fault from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise fault
    calls = []
    for call in value:
        if not isinstance(call, dict):
            raise fault
        function = call.get("function", call)  # {type, function: {...}} or a flat {name, arguments}
        name = function.get("name") if isinstance(function, dict) else None
        arguments = _as_json_object(function.get("arguments", {})) if isinstance(function, dict) else None
        if not isinstance(name, str) or not name.strip() or arguments is None:
            raise fault
        out = {"type": "function", "function": {"name": name, "arguments": arguments}}
        if isinstance(call.get("id"), str):
            out["id"] = call["id"]
        calls.append(out)
    return json.dumps(calls, ensure_ascii=False)


def check_tools(value: Any) -> str | None:
    """The ``tools`` column: ``None`` (no tools), or function specs (each a dict naming its
    function, ``{type: function, function: {name, ...}}`` or a bare ``{name, ...}``), JSON-encoded."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise InvalidRow("malformed_tools") from None
    if not isinstance(value, list):
        raise InvalidRow("malformed_tools")
    for tool in value:
        spec = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise InvalidRow("malformed_tools")
    return json.dumps(value, ensure_ascii=False)


def split_tagged_calls(content: str, tags: tuple[str, str], key: str) -> tuple[str, str | None]:
    """``text<open>[calls]</close>`` → (text, checked calls); content without the tags unchanged."""
    opening, closing = tags
    body = content.rstrip()
    start = body.find(opening)
    if start < 0 or not body.endswith(closing):
        return content, None
    calls = check_tool_calls(body[start + len(opening) : len(body) - len(closing)], key)
    return body[:start].rstrip(), calls


def check_message(msg: Any, key: str, roles: tuple[str, ...], tags: tuple[str, str] | None) -> dict[str, Any]:
    """One message with a known role, its content, and the tool-calling keys it carries."""
    if not isinstance(msg, dict) or "role" not in msg or ("content" not in msg and "tool_calls" not in msg):
        raise InvalidRow(f"wrong_type_{key}")
    role = msg["role"]
    if role not in roles:
        raise InvalidRow(f"unknown_role_{key}")
    content, calls = msg.get("content"), msg.get("tool_calls")
    if role == "assistant" and tags and isinstance(content, str) and calls is None:
        content, calls = split_tagged_calls(content, tags, key)
    out: dict[str, Any] = {"role": role}
    if calls is not None:
        if role != "assistant":
            raise InvalidRow(f"malformed_tool_call_{key}")
        # A call may come without text (OpenAI's content: null): an empty string renders alike.
        out["content"] = "" if content is None else content
        if not isinstance(out["content"], str):
            raise InvalidRow(f"wrong_type_{key}_content")
        out["tool_calls"] = check_tool_calls(calls, key)
    else:
        out["content"] = check_text(content, f"{key}_content")
    for extra in ("tool_call_id", "name"):
        if isinstance(msg.get(extra), str):
            out[extra] = msg[extra]
    return out


def check_messages(
    value: Any, key: str, roles: tuple[str, ...] = ROLES, tags: tuple[str, str] | None = None
) -> list[dict[str, Any]] | str:
    """A non-empty list of messages (see :func:`check_message`; other keys dropped); a string is
    returned as it is (the caller wraps it into one turn) and a lone dict becomes a one-message list."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise InvalidRow(f"wrong_type_{key}")
    if not value:
        raise InvalidRow(f"empty_conversation_{key}")
    return [check_message(msg, key, roles, tags) for msg in value]


def as_turns(
    value: Any, key: str, role: str, roles: tuple[str, ...], tags: tuple[str, str] | None = None
) -> list[dict[str, Any]]:
    checked = check_messages(value, key, roles, tags)
    if isinstance(checked, str):
        return [{"role": role, "content": check_text(checked, key)}]
    return checked


def render_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as a chat template reads them: the JSON-encoded ``tool_calls`` decoded, and the
    keys the data set filled with nulls for messages without them removed."""
    out = []
    for msg in messages:
        rendered = {k: v for k, v in msg.items() if k not in TOOL_KEYS or v is not None}
        if rendered.get("tool_calls") is not None:
            rendered["tool_calls"] = json.loads(rendered["tool_calls"])
        out.append(rendered)
    return out


class ConversationalFormat(RowFormat):
    """Prompt and completions as chat messages, rendered with ``tokenizer.apply_chat_template``.

    Args:
        roles: the message roles accepted (others: ``unknown_role_<column>``).
        tool_call_tags: ``[open, close]``: tool calls written as a JSON list between these tags in
            an assistant's text become its ``tool_calls`` (When2Call: ``<TOOLCALL>``); null: none.
        columns, system_prompt, ...: see :class:`~dpo_lightning.data.formats.RowFormat`; map
            ``prompt`` to ``null`` for conversations whose prompt is implicit, and ``tools`` to
            the column of function specs (default ``tools``; absent or null: no tools).

    Output: ``{prompt, completions, pairs, tools}`` with ``tools`` JSON-encoded or None.
    """

    fields = ("prompt", "chosen", "rejected", "tools")

    def __init__(
        self,
        roles: list[str] | tuple[str, ...] = ROLES,
        tool_call_tags: list[str] | tuple[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.roles = tuple(roles)
        if tool_call_tags is not None and len(tool_call_tags) != 2:
            raise ValueError(f"data.format.tool_call_tags must be [open, close], got {tool_call_tags!r}")
        self.tool_call_tags = tuple(tool_call_tags) if tool_call_tags else None

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        tags = self.tool_call_tags
        chosen, rejected = (
            as_turns(require_value(row, self.col(k)), self.col(k), "assistant", self.roles, tags)
            for k in ("chosen", "rejected")
        )
        prompt_col, tools_col = self.col("prompt"), self.col("tools")
        tools = check_tools(row.get(tools_col)) if tools_col else None
        if prompt_col and prompt_col in row:
            prompt = as_turns(require_value(row, prompt_col), prompt_col, "user", self.roles, tags)
        else:
            prompt = None
        if prompt is None:
            # Whole conversations: the shared turns up to the last non-assistant one = prompt.
            n = common_prefix(chosen, rejected)
            while n > 0 and chosen[n - 1]["role"] == "assistant":
                n -= 1
            prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        elif prompt == chosen[: len(prompt)] == rejected[: len(prompt)]:
            chosen, rejected = chosen[len(prompt) :], rejected[len(prompt) :]
        if not prompt:
            raise InvalidRow("empty_conversation_prompt")
        if not chosen or not rejected:
            raise InvalidRow("empty_completion")
        if chosen[0]["role"] != "assistant" or rejected[0]["role"] != "assistant":
            raise InvalidRow("completion_not_assistant")
        if any(m["role"] == "tool" for m in chosen + rejected):
            raise InvalidRow("tool_message_in_completion")
        check_preference(chosen, rejected)
        prompt = self.with_system_message(prompt, row)
        return {"prompt": prompt, "completions": [chosen, rejected], "pairs": [[0, 1]], "tools": tools}

    @property
    def tokenize_batch(self) -> Callable[..., dict[str, list]]:
        """Message lists are rendered with the chat template (:func:`tokenize_chat_batch`)."""
        return tokenize_chat_batch


def completion_after_prompt(
    tokenizer: PreTrainedTokenizerBase,
    prompt_text: str,
    prompt_ids: list[int],
    full_text: str,
    full_ids: list[int],
) -> tuple[list[int] | None, str | None]:
    """Completion ids after ``prompt_ids`` and a note (``None`` ids: not a prefix, drop)."""
    if full_ids[: len(prompt_ids)] == prompt_ids and len(full_ids) > len(prompt_ids):
        return full_ids[len(prompt_ids) :], None
    if full_text.startswith(prompt_text) and full_text[len(prompt_text) :].strip():
        rest = tokenizer(full_text[len(prompt_text) :], add_special_tokens=False)["input_ids"]
        return rest, "chat_completion_retokenized"
    return None, "chat_template_not_prefix"


def tokenize_chat_batch(
    batch: dict[str, list], tokenizer: PreTrainedTokenizerBase, limits: Limits
) -> dict[str, list]:
    """``datasets.map(batched=True)`` function for message-list rows; see the module docstring.

    Renders every prompt and conversation of the batch first (with the row's ``tools``, the same
    for the generation prompt and the whole conversation), then tokenises them in two calls.
    """
    render = tokenizer.apply_chat_template
    prompts = [render_messages(p) for p in batch["prompt"]]
    tools = [None if t is None else json.loads(t) for t in batch.get("tools") or [None] * len(prompts)]
    prompt_texts = [
        render(p, tools=t, tokenize=False, add_generation_prompt=True)
        for p, t in zip(prompts, tools, strict=True)
    ]
    full_texts = [
        [render(p + render_messages(c), tools=t, tokenize=False) for c in cs]
        for p, cs, t in zip(prompts, batch["completions"], tools, strict=True)
    ]
    prompt_ids_all = tokenizer(prompt_texts, add_special_tokens=False)["input_ids"]
    flat = tokenizer([t for ts in full_texts for t in ts], add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    out: dict[str, list] = {}
    at = 0
    for i, raw_prompt_ids in enumerate(prompt_ids_all):
        prompt_ids = dedup_bos(raw_prompt_ids, bos)
        comps, notes, drop = [], [], None
        for full_text in full_texts[i]:
            ids, note = completion_after_prompt(
                tokenizer, prompt_texts[i], raw_prompt_ids, full_text, flat[at]
            )
            at += 1
            if ids is None:
                drop = note
            else:
                comps.append(ids)
                notes += [note] if note else []
        if drop is None:
            ex = limits.apply(prompt_ids, comps, bos)
        else:
            ex = TokenizedExample(prompt_ids, [], drop_reason=drop)
        ex.notes = notes
        pairs = drop_signal_free_pairs(ex, batch["pairs"][i], tokenizer.decode)
        for key, value in example_record(batch["row_id"][i], pairs, ex).items():
            out.setdefault(key, []).append(value)
    return out
