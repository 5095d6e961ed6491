"""Padding-free packing with prefix sharing: a whole preference batch as one token row.

Every example (one prompt, K completions) becomes one *document* in a single row of length N:

    [prompt | completion 1 | completion 2 | ... | completion K]   (prefix sharing)
    [prompt | completion 1][prompt | completion 2]...              (packing only)

Each token carries a document id and a *branch* (0 = prompt, k = completion k). A query token
attends to a key token iff they are in the same document, the key is not later in the row, and the
key is in the prompt or in the query's own completion. Completion positions restart at the prompt
length, so every completion sees exactly what it would see in its own padded row
``prompt + completion`` — the log-probs are the same, but the prompt is computed once per example
(not once per completion) and no padding is computed at all.

The first token of every completion is predicted by the prompt's last hidden state, which is
shared; the collator therefore lists explicitly, for each completion token, which position
predicts it (``logit_index``) instead of relying on a shift by one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from dpo_lightning.data.collate import completion_keys, flat_pairs, pair_tensors


@dataclass
class PackedCollator:
    """Packs examples ``{prompt_ids, completion_ids, pairs, row_id}`` into one (1, N) row.

    Args:
        pad_token_id: id of the padding appended when ``pad_to_multiple_of`` rounds N up.
        prefix_sharing: one prompt per example followed by its K completions; off, every
            completion gets its own copy of the prompt (padding-free packing only).
        pad_to_multiple_of: round N up (tensor-core friendly shapes on GPU); padding tokens form
            their own document and are never predicted.

    Output keys:
        ``input_ids``, ``position_ids`` (1, N); ``doc_ids``, ``branch_ids`` (N,) for the mask
        (``doc_ids`` is -1 on padding); ``logit_index``, ``target_ids``, ``completion_index``
        (M,) — for every completion token, the row position whose hidden state predicts it, its
        id and its completion (0..B-1, the row order of ``PreferenceCollator``); ``chosen_idx``,
        ``rejected_idx``, ``pair_row_ids`` (P,); ``num_completions`` (B), ``num_pairs`` and
        ``num_tokens`` (tokens in the row, padding excluded) as ints; ``completion_keys`` (B
        python ints, the same as ``PreferenceCollator``'s: :func:`~dpo_lightning.data.collate.content_key`).
    """

    pad_token_id: int
    prefix_sharing: bool = True
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        row = _Row()
        for ex in examples:
            completions = [list(c) for c in ex["completion_ids"]]
            row.add_example(list(ex["prompt_ids"]), completions, self.prefix_sharing)
        real = len(row.ids)
        if self.pad_to_multiple_of:
            row.pad(-(-real // self.pad_to_multiple_of) * self.pad_to_multiple_of, self.pad_token_id)
        long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
        return {
            "input_ids": long(row.ids)[None],
            "position_ids": long(row.positions)[None],
            "doc_ids": long(row.docs),
            "branch_ids": long(row.branches),
            "logit_index": long(row.logit_index),
            "target_ids": long(row.targets),
            "completion_index": long(row.completion_index),
            **pair_tensors(flat_pairs(examples)),  # completions numbered as in PreferenceCollator
            "num_tokens": real,
            "completion_keys": completion_keys(examples),
        }


class _Row:
    """The growing packed row and its per-token metadata (plain lists; tensors at the end)."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.positions: list[int] = []
        self.docs: list[int] = []
        self.branches: list[int] = []
        self.logit_index: list[int] = []
        self.targets: list[int] = []
        self.completion_index: list[int] = []
        self.num_completions = 0
        self.num_docs = 0

    def _extend(self, ids: list[int], start_pos: int, doc: int, branch: int) -> None:
        self.ids += ids
        self.positions += range(start_pos, start_pos + len(ids))
        self.docs += [doc] * len(ids)
        self.branches += [branch] * len(ids)

    def add_example(self, prompt: list[int], completions: list[list[int]], share: bool) -> None:
        prompt_last = None
        if share:
            self.num_docs += 1
            self._extend(prompt, 0, self.num_docs, 0)
            prompt_last = len(self.ids) - 1 if prompt else None
        for k, comp in enumerate(completions):
            if not share:  # its own document and its own copy of the prompt
                self.num_docs += 1
                self._extend(prompt, 0, self.num_docs, 0)
                prompt_last = len(self.ids) - 1 if prompt else None
            start = len(self.ids)
            self._extend(comp, len(prompt), self.num_docs, k + 1)
            # Token j of the completion is predicted by position start + j - 1, except token 0,
            # predicted by the prompt's last position (none for an empty prompt, as in the
            # padded path where row position 0 is never a target).
            for j, tok in enumerate(comp):
                src = start + j - 1 if j > 0 else prompt_last
                if src is not None:
                    self.logit_index.append(src)
                    self.targets.append(tok)
                    self.completion_index.append(self.num_completions)
            self.num_completions += 1

    def pad(self, width: int, pad_id: int) -> None:
        n = width - len(self.ids)
        self._extend([pad_id] * n, 0, -1, 0)


# --- attention masks from (doc_ids, branch_ids) -----------------------------------------------


def packed_mask_mod(doc_ids: Tensor, branch_ids: Tensor) -> Callable[..., Tensor]:
    """FlexAttention ``mask_mod(b, h, q, kv) -> bool``: same document, causal, and the key in the
    prompt or in the query's own completion."""

    def mask_mod(b, h, q, kv):
        same_doc = doc_ids[q] == doc_ids[kv]
        visible = (branch_ids[kv] == 0) | (branch_ids[kv] == branch_ids[q])
        return same_doc & visible & (kv <= q)

    return mask_mod


def dense_bool_mask(doc_ids: Tensor, branch_ids: Tensor, dtype: torch.dtype) -> Tensor:
    """(1, 1, N, N) bool mask, True = attend: for SDPA (CPU fallback; O(N²) memory)."""
    idx = torch.arange(doc_ids.shape[0], device=doc_ids.device)
    return packed_mask_mod(doc_ids, branch_ids)(None, None, idx[:, None], idx[None, :])[None, None]


def dense_additive_mask(doc_ids: Tensor, branch_ids: Tensor, dtype: torch.dtype) -> Tensor:
    """(1, 1, N, N) float mask, 0 = attend, dtype min = blocked: for eager attention."""
    allowed = dense_bool_mask(doc_ids, branch_ids, dtype)
    return torch.zeros(allowed.shape, dtype=dtype, device=doc_ids.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


def flex_block_mask(doc_ids: Tensor, branch_ids: Tensor, dtype: torch.dtype):
    """A FlexAttention ``BlockMask``: blocks that are fully masked (other documents, the
    chosen↔rejected cross blocks) are skipped, so attention costs ~Σ_doc L_doc², not N²."""
    from torch.nn.attention.flex_attention import create_block_mask

    n = doc_ids.shape[0]
    return create_block_mask(packed_mask_mod(doc_ids, branch_ids), None, None, n, n, device=doc_ids.device)


def _as_mask(
    builder: Callable[[Tensor, Tensor, torch.dtype], Any],
) -> Callable[..., dict[str, Any]]:
    return lambda doc_ids, branch_ids, dtype: {"attention_mask": builder(doc_ids, branch_ids, dtype)}


def _per_document(doc_ids: Tensor, branch_ids: Tensor, dtype: torch.dtype) -> dict[str, Any]:
    from dpo_lightning.engine.doc_attention import NO_MASK, packed_layout

    layout = packed_layout(doc_ids, branch_ids)
    return {"attention_mask": NO_MASK.to(doc_ids.device), "packed_layout": layout}


#: attention implementation (``model.config._attn_implementation``) -> the decoder keywords
#: that carry the packed mask to it.
PACKED_ATTENTION: dict[str, Callable[[Tensor, Tensor, torch.dtype], dict[str, Any]]] = {
    "sdpa": _as_mask(dense_bool_mask),
    "eager": _as_mask(dense_additive_mask),
    "flex_attention": _as_mask(flex_block_mask),
    "per_document": _per_document,
}


def packed_attention_kwargs(
    attn_implementation: str, doc_ids: Tensor, branch_ids: Tensor, dtype: torch.dtype
) -> dict[str, Any]:
    """Decoder keywords (a 4D mask, a BlockMask, or a per-document layout) for this attention."""
    try:
        builder = PACKED_ATTENTION[attn_implementation]
    except KeyError:
        raise ValueError(
            f"packed engine: attention implementation {attn_implementation!r} cannot take a "
            f"prefix-sharing mask; set engine.attn_implementation to one of "
            f"{sorted(PACKED_ATTENTION)} or use engine=padded"
        ) from None
    return builder(doc_ids, branch_ids, dtype)
