"""Conversational rows: message lists rendered with the tokenizer's chat template.

Accepted shapes (UltraFeedback-binarized style and its relatives):

* ``prompt`` a list of ``{role, content}`` messages (or a string: one user turn) and
  ``chosen`` / ``rejected`` lists of assistant messages (or strings: one assistant turn);
* ``chosen`` / ``rejected`` whole conversations repeating the prompt: the shared leading
  messages are the prompt (``columns.prompt: null``, or a prompt equal to that prefix).

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


def check_messages(value: Any, key: str, roles: tuple[str, ...] = ROLES) -> list[dict[str, str]]:
    """A non-empty list of ``{role, content}`` with known roles (extra keys dropped)."""
    if isinstance(value, str):
        return value  # caller wraps strings into a single turn
    if not isinstance(value, list):
        raise InvalidRow(f"wrong_type_{key}")
    if not value:
        raise InvalidRow(f"empty_conversation_{key}")
    out = []
    for msg in value:
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise InvalidRow(f"wrong_type_{key}")
        if msg["role"] not in roles:
            raise InvalidRow(f"unknown_role_{key}")
        out.append({"role": msg["role"], "content": check_text(msg["content"], f"{key}_content")})
    return out


def as_turns(value: Any, key: str, role: str, roles: tuple[str, ...]) -> list[dict[str, str]]:
    checked = check_messages(value, key, roles)
    if isinstance(checked, str):
        return [{"role": role, "content": check_text(checked, key)}]
    return checked


class ConversationalFormat(RowFormat):
    """Prompt and completions as chat messages, rendered with ``tokenizer.apply_chat_template``.

    Args:
        roles: the message roles accepted (others: ``unknown_role_<column>``).
        columns, system_prompt, ...: see :class:`~dpo_lightning.data.formats.RowFormat`; map
            ``prompt`` to ``null`` for conversations whose prompt is implicit.
    """

    fields = ("prompt", "chosen", "rejected")

    def __init__(self, roles: list[str] | tuple[str, ...] = ROLES, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.roles = tuple(roles)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        chosen, rejected = (
            as_turns(require_value(row, self.col(k)), self.col(k), "assistant", self.roles)
            for k in ("chosen", "rejected")
        )
        prompt_col = self.col("prompt")
        if prompt_col and prompt_col in row:
            prompt = as_turns(require_value(row, prompt_col), prompt_col, "user", self.roles)
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
        check_preference(chosen, rejected)
        prompt = self.with_system_message(prompt, row)
        return {"prompt": prompt, "completions": [chosen, rejected], "pairs": [[0, 1]]}

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

    Renders every prompt and conversation of the batch first, then tokenises them in two calls.
    """
    render = tokenizer.apply_chat_template
    prompts = batch["prompt"]
    prompt_texts = [render(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    full_texts = [
        [render(p + c, tokenize=False) for c in cs]
        for p, cs in zip(prompts, batch["completions"], strict=True)
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
