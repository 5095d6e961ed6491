"""The packed engine: padding-free packing, prefix sharing, chunked log-probs.

The whole batch is one padding-free row (:mod:`dpo_lightning.engine.packing`), each prompt is
computed once for its K completions, the LM head runs in chunks over completion tokens only
(:mod:`dpo_lightning.engine.chunked_head`), and every model of the step (policy, reference) reads
the same row and the same attention mask, built once per batch.

Supports / assumptions: decoder-only HF models exposing ``get_decoder()`` and
``get_output_embeddings()`` whose attention implementation can take the packed mask
(``per_document``, ``flex_attention``, ``sdpa``, ``eager``); logit transforms after the LM head
(Gemma's ``final_logit_softcapping``, logit scales) applied per chunk; sliding windows and
attention soft-capping with ``per_document``. :meth:`PackedEngine.resolve` checks a model once
(:mod:`dpo_lightning.engine.support`: its structure, then a probe batch against the padded
engine) and names what it cannot do. No padding side (there is one row);
``data.pad_to_multiple_of`` rounds the row length up, and FlexAttention rounds it to its 128-token
block when nothing else is asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from dpo_lightning.engine import doc_attention  # noqa: F401 - registers the per_document attention
from dpo_lightning.engine.base import (
    BatchReader,
    EngineBatch,
    ForwardEngine,
    UnsupportedLayout,
    padded_rows_reasons,
)
from dpo_lightning.engine.chunked_head import (
    TokenStats,
    head_log_sum_sq_probs,
    head_token_stats,
    transform_from_config,
)
from dpo_lightning.engine.logps import TOKEN_METRICS, CompletionStats
from dpo_lightning.engine.packing import PACKED_ATTENTION, PackedCollator, packed_attention_kwargs
from dpo_lightning.engine.support import probe_mismatch, static_unsupported
from dpo_lightning.run.errors import UserError, check_choice, check_number

#: FlexAttention's block size: packed rows are rounded up to it unless data.pad_to_multiple_of says.
FLEX_BLOCK = 128


class PackedEngine(ForwardEngine):
    """Padding-free packing, prefix sharing, chunked log-probs (see the module docstring).

    Args:
        prefix_sharing: prompt computed once per example, its K completions branching off it.
        chunk_size: rows of (chunk, V) logits alive at once in the LM head; ``None``: all
            completion tokens at once (still never the prompt's).
        attn_implementation: switch the models to this attention: ``per_document`` (per-document
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
        attn_implementation: str | None = "per_document",
        compile: bool = False,
    ) -> None:
        super().__init__(compile=compile)
        self.prefix_sharing = check_choice("prefix_sharing", prefix_sharing, (True, False))
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

    def unsupported(self, model: nn.Module) -> str | None:
        """Why this engine cannot run ``model`` exactly (one line), or None: the static checks of
        :mod:`~dpo_lightning.engine.support`, then its probe batch against the padded engine."""
        return static_unsupported(model, self.attn_implementation) or probe_mismatch(self, model)

    def resolve(self, model: nn.Module, readers: Iterable[BatchReader] = ()) -> tuple[ForwardEngine, None]:
        reasons = padded_rows_reasons(readers)
        reason = reasons[0] if reasons else self.unsupported(model)
        if reason:
            raise UnsupportedLayout(f"engine=packed: {reason}; use engine=padded (engine=auto picks it)")
        return self, None

    def forward(self, model: nn.Module, batch: EngineBatch, rows: Tensor | None) -> CompletionStats:
        impl = self._attention(model)
        data = batch.data
        dtype = next(model.parameters()).dtype
        attention = batch.once(
            ("packed_attention", impl, dtype),
            lambda: packed_attention_kwargs(impl, data["doc_ids"], data["branch_ids"], dtype),
        )
        hidden = decoder_hidden_states(model, data["input_ids"], data["position_ids"], attention)[0]  # (N, H)
        predicting = hidden.index_select(0, data["logit_index"])  # (M, H)
        head, transform = model.get_output_embeddings(), transform_from_config(model.config)
        tokens = head_token_stats(
            head,
            predicting,
            data["target_ids"],
            self.chunk_size,
            transform,  # soft-capping / scales, per chunk
            TOKEN_METRICS in batch.outputs,
        )  # (M,) each
        stats = segment_stats(tokens, data["completion_index"], int(data["num_completions"]))
        if "token_logps" in batch.outputs:  # already in completion order: the row lists them so
            stats.token_logps = tokens.logps
        if "log_sum_sq_probs" in batch.outputs:
            per_token = head_log_sum_sq_probs(head, predicting, self.chunk_size, transform)  # (M,), no grad
            stats.log_sum_sq_probs = per_token.new_zeros(stats.logps.shape[0]).index_add(
                0, data["completion_index"], per_token
            )
        # Every completion of the row is computed (packing has no per-row skip): select after.
        return stats if rows is None else stats.select(rows)

    def _attention(self, model: nn.Module) -> str:
        if self.attn_implementation and model.config._attn_implementation != self.attn_implementation:
            model.set_attn_implementation(self.attn_implementation)
        return model.config._attn_implementation


def decoder_hidden_states(
    model: nn.Module, input_ids: Tensor, position_ids: Tensor, attention: dict[str, Any]
) -> Tensor:
    """(1, N, H): the decoder's last hidden state on the packed row, from the model's own forward.

    The whole model runs, not ``model.get_decoder()`` alone: wrappers hook the root module, and
    FSDP2 gathers the root's parameters there (embeddings, final norm, LM head) and registers
    their gradient reduction; TP and PEFT forward through it too. ``logits_to_keep`` with no
    position makes the model's head compute nothing (a (1, 0, V) output); the chunked head then
    runs on the captured hidden state.
    """
    captured: list[Tensor] = []

    def keep(_module: nn.Module, _args: Any, output: Any) -> None:
        captured.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

    handle = model.get_decoder().register_forward_hook(keep)
    try:
        model(
            input_ids=input_ids,
            position_ids=position_ids,
            use_cache=False,
            logits_to_keep=torch.zeros(0, dtype=torch.long, device=input_ids.device),
            **attention,
        )
    finally:
        handle.remove()
    return captured[-1]


def segment_stats(tokens: TokenStats, completion_index: Tensor, num: int) -> CompletionStats:
    """Per-token values (M,) summed into their completions (B,), as ``completion_stats`` does."""

    def per_completion(values: Tensor | None) -> Tensor | None:
        return None if values is None else values.new_zeros(num).index_add(0, completion_index, values)

    lengths = torch.bincount(completion_index, minlength=num).float()
    return CompletionStats(
        logps=per_completion(tokens.logps),
        lengths=lengths,
        mean_logits=per_completion(tokens.mean_logits) / lengths.clamp(min=1.0),
        entropy=per_completion(tokens.entropy),
        top1=per_completion(tokens.top1),
    )
