"""The packed engine: padding-free packing, prefix sharing, chunked log-probs.

The whole batch is one padding-free row (:mod:`dpo_lightning.engine.packing`), each prompt is
computed once for its K completions, the LM head runs in chunks over completion tokens only
(:mod:`dpo_lightning.engine.chunked_head`), and every model of the step (policy, reference) reads
the same row and the same attention mask, built once per batch.

Supports / assumptions: decoder-only HF models exposing ``get_decoder()`` and
``get_output_embeddings()`` whose attention implementation can take the packed mask
(``packed_sdpa``, ``flex_attention``, ``sdpa``, ``eager``); no logit transform after the LM head
(soft-capping or a logit scale is refused: use ``engine=padded``). No padding side (there is one
row); ``data.pad_to_multiple_of`` rounds the row length up, and FlexAttention rounds it to its
128-token block when nothing else is asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from dpo_lightning.engine import doc_attention  # noqa: F401 - registers the packed_sdpa attention
from dpo_lightning.engine.base import EngineBatch, ForwardEngine
from dpo_lightning.engine.chunked_head import head_log_sum_sq_probs, head_mean_logits, head_token_logps
from dpo_lightning.engine.logps import CompletionStats
from dpo_lightning.engine.packing import PACKED_ATTENTION, PackedCollator, packed_attention_kwargs
from dpo_lightning.run.errors import UserError, check_choice, check_number

#: Config keys of models whose head output is transformed after the LM head (soft-capping, a
#: scale): the chunked head would skip that step, so such models must use the padded engine.
_POST_HEAD_KEYS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")
#: FlexAttention's block size: packed rows are rounded up to it unless data.pad_to_multiple_of says.
FLEX_BLOCK = 128


class PackedEngine(ForwardEngine):
    """Padding-free packing, prefix sharing, chunked log-probs (see the module docstring).

    Args:
        prefix_sharing: prompt computed once per example, its K completions branching off it.
        chunk_size: rows of (chunk, V) logits alive at once in the LM head; ``None``: all
            completion tokens at once (still never the prompt's).
        attn_implementation: switch the models to this attention: ``packed_sdpa`` (per-document
            SDPA, :mod:`dpo_lightning.engine.doc_attention`), ``flex_attention`` (GPU,
            block-sparse); ``None`` keeps the model's (``sdpa``/``eager``: a dense (N, N) mask,
            N² work).
        compile: see :class:`~dpo_lightning.engine.base.ForwardEngine`.
    """

    row_per_completion = False

    def __init__(
        self,
        prefix_sharing: bool = True,
        chunk_size: int | None = 1024,
        attn_implementation: str | None = "packed_sdpa",
        compile: bool = False,
    ) -> None:
        super().__init__(compile=compile)
        self.prefix_sharing = prefix_sharing
        self.chunk_size = check_number("chunk_size", chunk_size, minimum=1, integer=True, optional=True)
        if attn_implementation is not None:
            check_choice("attn_implementation", attn_implementation, sorted(PACKED_ATTENTION))
        self.attn_implementation = attn_implementation

    def collator(
        self, pad_token_id: int, padding_side: str = "right", pad_to_multiple_of: int | None = None
    ) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
        if padding_side != "right":
            raise UserError(
                f"data.padding_side={padding_side!r}: engine=packed packs each batch into one "
                "unpadded row, so there is no padding side; remove the setting or use engine=padded"
            )
        if pad_to_multiple_of is None and self.attn_implementation == "flex_attention":
            pad_to_multiple_of = FLEX_BLOCK
        return PackedCollator(pad_token_id, self.prefix_sharing, pad_to_multiple_of)

    def forward(self, model: nn.Module, batch: EngineBatch, rows: Tensor | None) -> CompletionStats:
        _check_head(model)
        impl = self._attention(model)
        data = batch.data
        dtype = next(model.parameters()).dtype
        attention = batch.once(
            ("packed_attention", impl, dtype),
            lambda: packed_attention_kwargs(impl, data["doc_ids"], data["branch_ids"], dtype),
        )
        hidden = model.get_decoder()(
            input_ids=data["input_ids"],
            position_ids=data["position_ids"],
            use_cache=False,
            **attention,
        ).last_hidden_state[0]  # (N, H)
        predicting = hidden.index_select(0, data["logit_index"])  # (M, H)
        head = model.get_output_embeddings()
        logps = head_token_logps(head, predicting, data["target_ids"], self.chunk_size)  # (M,)
        mean_logits = head_mean_logits(head, predicting)  # (M,)
        stats = segment_stats(logps, mean_logits, data["completion_index"], int(data["num_completions"]))
        if "token_logps" in batch.outputs:  # already in completion order: the row lists them so
            stats.token_logps = logps
        if "log_sum_sq_probs" in batch.outputs:
            per_token = head_log_sum_sq_probs(head, predicting, self.chunk_size)  # (M,), no grad
            stats.log_sum_sq_probs = per_token.new_zeros(stats.logps.shape[0]).index_add(
                0, data["completion_index"], per_token
            )
        # Every completion of the row is computed (packing has no per-row skip): select after.
        return stats if rows is None else stats.select(rows)

    def _attention(self, model: nn.Module) -> str:
        if self.attn_implementation and model.config._attn_implementation != self.attn_implementation:
            model.set_attn_implementation(self.attn_implementation)
        return model.config._attn_implementation


def segment_stats(
    token_logps: Tensor, token_mean_logits: Tensor, completion_index: Tensor, num: int
) -> CompletionStats:
    """Per-token values (M,) summed into their completions (B,), as ``completion_stats`` does."""
    logps = token_logps.new_zeros(num).index_add(0, completion_index, token_logps)
    lengths = torch.bincount(completion_index, minlength=num).float()
    logit_sums = token_mean_logits.new_zeros(num).index_add(0, completion_index, token_mean_logits)
    return CompletionStats(logps=logps, lengths=lengths, mean_logits=logit_sums / lengths.clamp(min=1.0))


def _check_head(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    for key in _POST_HEAD_KEYS:
        value = getattr(config, key, None)
        if value not in (None, 1.0):
            raise ValueError(
                f"packed engine: the model's config sets {key}={value} (logits are transformed "
                "after the LM head, which the chunked head does not do); use engine=padded"
            )
