"""Prompt-only data for online training (``data=prompts``): rows ``{prompt}``, no completions.

A row's prompt is a string or a list of chat messages (a string in a chat data set is one user
turn). Strings are tokenised as preference prompts are (:func:`~dpo_lightning.data.tokenize.
encode_prompt`: BOS where the model uses one, once); messages are rendered with
``apply_chat_template(..., add_generation_prompt=True)``, exactly what the model sees before it
answers. Validation and accounting are the preference data's: every fault is counted with its
line (``missing_prompt``, ``empty_prompt``, ``unknown_role_prompt``, ...), ``data.on_invalid``
applies, prompts are cut to ``data.max_prompt_length`` and a prompt that fills
``data.max_length`` on its own is dropped (``prompt_fills_max_length``), all in ``summary.json``.

Batches are :class:`PromptBatch` dicts of prompt ids: the online stage samples the completions
and builds the training batch with its engine's collator.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from dpo_lightning.data.chat import ROLES, as_turns
from dpo_lightning.data.datamodule import PreferenceDataModule, sample_rows
from dpo_lightning.data.formats import InvalidRow, RowFormat, require_value
from dpo_lightning.data.synthetic import sentiment_rows
from dpo_lightning.data.tokenize import Limits, dedup_bos, example_record
from dpo_lightning.run.errors import UserError


class PromptFormat(RowFormat):
    """``{prompt}`` rows: a string, or chat messages (``chat``).

    Args:
        chat: True: prompts are messages (a string is one user turn) rendered with the chat
            template; False: strings; None (default): True when any of the first rows holds a
            message list (set by :meth:`detect`).
        roles: the message roles accepted.
        columns, system_prompt, system_separator, prompt_template: see
            :class:`~dpo_lightning.data.formats.RowFormat`.
    """

    fields = ("prompt",)

    def __init__(self, chat: bool | None = None, roles: list[str] | tuple[str, ...] = ROLES, **kwargs: Any):
        super().__init__(**kwargs)
        self.chat = chat
        self.roles = tuple(roles)

    def detect(self, rows: list[dict[str, Any]]) -> PromptFormat:
        """This format with ``chat`` decided from sample rows (unchanged when already set)."""
        if self.chat is not None:
            return self
        out = self.configured()
        out.chat = any(isinstance(r.get(self.col("prompt")), list) for r in rows)
        return out

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        if not self.chat:
            return {"prompt": self.text_prompt(row), "completions": [], "pairs": []}
        col = self.col("prompt")
        turns = as_turns(require_value(row, col), col, "user", self.roles)
        if turns[-1]["role"] == "assistant":
            raise InvalidRow("prompt_ends_with_assistant")  # nothing left for the policy to answer
        return {"prompt": self.with_system_message(turns, row), "completions": [], "pairs": []}

    @property
    def tokenize_batch(self) -> Callable[..., dict[str, list]]:
        return tokenize_chat_prompts if self.chat else tokenize_text_prompts


def _prompt_records(
    row_ids: list[int], prompt_ids: list[list[int]], bos: int | None, limits: Limits
) -> dict[str, list]:
    """The stored rows: each prompt cut by ``limits`` (its completions are sampled later)."""
    out: dict[str, list] = {}
    for row_id, ids in zip(row_ids, prompt_ids, strict=True):
        ex = limits.apply(dedup_bos(ids, bos), [[]], bos)  # the prompt alone: rules 1 and 2
        ex.completion_ids = []
        for key, value in example_record(row_id, [], ex).items():
            out.setdefault(key, []).append(value)
    return out


def tokenize_text_prompts(
    batch: dict[str, list], tokenizer: PreTrainedTokenizerBase, limits: Limits
) -> dict[str, list]:
    """``datasets.map(batched=True)`` function for string prompts: one tokenizer call per batch."""
    ids = tokenizer(batch["prompt"], add_special_tokens=True)["input_ids"]
    return _prompt_records(batch["row_id"], ids, tokenizer.bos_token_id, limits)


def tokenize_chat_prompts(
    batch: dict[str, list], tokenizer: PreTrainedTokenizerBase, limits: Limits
) -> dict[str, list]:
    """``datasets.map(batched=True)`` function for message prompts: rendered with the generation
    prompt, then one tokenizer call per batch (the template writes the special tokens)."""
    texts = [
        tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in batch["prompt"]
    ]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return _prompt_records(batch["row_id"], ids, tokenizer.bos_token_id, limits)


class PromptBatch(dict):
    """A batch of prompts. Read as a preference batch (a stage that expects completions), it
    fails in one line naming the fix instead of with a bare ``KeyError``."""

    def __missing__(self, key: str) -> Any:
        raise UserError(
            f"the batch holds prompts only (data=prompts) and has no {key!r}: prompt-only data "
            "trains with stage=online_dpo, which samples the completions"
        )


@dataclass
class PromptCollator:
    """Prompt ids of a batch of rows, unpadded (generation pads them on the left).

    Output keys: ``prompt_ids`` (list of N id lists), ``prompt_row_ids`` (N,) source rows;
    ``pair_row_ids`` (N,) the same rows (what the non-finite guard names);
    ``num_prompts`` (N) and ``num_tokens`` (prompt tokens); ``num_pairs`` and
    ``num_completions`` are 0 until the stage has sampled (it fills them in, with the tokens
    it trained on, for the throughput callbacks that read the batch at its end).
    """

    def __call__(self, examples: list[dict[str, Any]]) -> PromptBatch:
        rows = torch.tensor([ex["row_id"] for ex in examples], dtype=torch.long)
        prompts = [list(ex["prompt_ids"]) for ex in examples]
        return PromptBatch(
            prompt_ids=prompts,
            prompt_row_ids=rows,
            pair_row_ids=rows.clone(),
            num_prompts=len(prompts),
            num_tokens=sum(len(p) for p in prompts),
            num_pairs=0,
            num_completions=0,
        )


class PromptDataModule(PreferenceDataModule):
    """Prompt-only rows (see the module docstring); arguments as
    :class:`~dpo_lightning.data.datamodule.PreferenceDataModule`'s (``batch_size``: prompts per
    device step; ``layout``, ``padding_side`` and ``pad_to_multiple_of`` are the online stage's
    business: it collates the sampled completions with its engine).
    """

    #: What ``batch_size`` counts (printed with the global batch).
    batch_unit = "prompts"

    def __init__(self, tokenizer: PreTrainedTokenizerBase, format: Any = None, **kwargs: Any) -> None:
        super().__init__(tokenizer, format=format if format is not None else PromptFormat(), **kwargs)
        if not isinstance(self.format, PromptFormat):
            raise UserError(
                f"data=prompts reads {{prompt}} rows with PromptFormat, got data.format="
                f"{type(self.format).__name__}: remove data.format (or use a preference data= preset)"
            )
        # Batches are prompts: the loaders collate with this, never with the engine's collator.
        self.collator = self.collate_fn = PromptCollator()

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None and self.format.chat is None:
            self.format = self.format.detect(sample_rows(self._parts()[self.train_split], 200))
        super().setup(stage)


def sentiment_prompts(n: int = 2000, seed: int = 0) -> datasets.Dataset:
    """The prompts of the built-in sentiment pairs (``data.synthetic``) as ``{prompt}`` rows."""
    return datasets.Dataset.from_dict({"prompt": [r["prompt"] for r in sentiment_rows(n, seed)]})
