"""Forward engines: how a batch of completions becomes per-completion log-probs.

An engine owns both ends of the layout — the collator that builds the batch and the forward that
reads it — so the module never checks which one it has (``conf/engine/*.yaml``):

* :class:`PaddedEngine` (default): one padded row per completion, full logits
  (:func:`~dpo_lightning.logps.concatenated_forward`).
* :class:`PackedEngine`: the whole batch as one padding-free row, the prompt shared by its K
  completions, the LM head applied in chunks to completion tokens only; the reference model reads
  the same packed batch and the same attention mask (built once per batch).

Both return :class:`~dpo_lightning.logps.CompletionStats` over the same B completions, so losses
and metrics are unchanged (``tests/test_engine.py`` checks losses and gradients).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from dpo_lightning import doc_attention  # noqa: F401 - registers the packed_sdpa attention
from dpo_lightning.chunked_logps import head_mean_logits, head_token_logps
from dpo_lightning.logps import CompletionStats, concatenated_forward
from dpo_lightning.packing import PackedCollator, packed_attention_kwargs

#: Config keys of models whose head output is transformed after the LM head (soft-capping, a
#: scale): the chunked head would skip that step, so such models must use the padded engine.
_POST_HEAD_KEYS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")


class ForwardEngine:
    """Interface: ``prepare(datamodule)`` once, then ``engine(model, batch) -> CompletionStats``.

    ``row_per_completion`` says whether batches keep one padded row per completion (what a
    per-row reference cache can key on).

    Args:
        compile: ``torch.compile`` each decoder layer of every model the engine runs (regional
            compilation, dynamic shapes: one graph for all batch lengths). Pays on GPU; on a small
            CPU model the compile time exceeds what it saves.
        group_by_length: build training batches from examples of similar length (fewer padding
            tokens for the padded engine; steadier tokens per step for the packed one).
    """

    row_per_completion: bool = True

    def __init__(self, compile: bool = False, group_by_length: bool = False) -> None:
        self.compile = compile
        self.group_by_length = group_by_length

    def collator(self, base: Callable) -> Callable:
        """The collator this engine reads, given the DataModule's (padded) one."""
        return base

    def prepare(self, datamodule: Any) -> None:
        """Install the engine's collator (and batch order) on a PreferenceDataModule."""
        datamodule.collator = self.collator(datamodule.collator)
        if self.group_by_length:
            datamodule.group_by_length = True  # the DataModule's length-grouped sampler

    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> CompletionStats:
        if self.compile and not getattr(model, "_dpo_compiled", False):
            compile_decoder_layers(model)
        return self.forward(model, batch)

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> CompletionStats:
        raise NotImplementedError


class PaddedEngine(ForwardEngine):
    """One padded row per completion, full (B, T, V) logits: the reference computation."""

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> CompletionStats:
        return concatenated_forward(model, batch["input_ids"], batch["attention_mask"], batch["labels"])


class PackedEngine(ForwardEngine):
    """Padding-free packing, prefix sharing, chunked log-probs (:mod:`dpo_lightning.packing`).

    Args:
        prefix_sharing: prompt computed once per example, its K completions branching off it.
        chunk_size: rows of (chunk, V) logits alive at once in the LM head; ``None``: all
            completion tokens at once (still never the prompt's).
        pad_to_multiple_of: round the packed row up (e.g. 128, FlexAttention's block size).
        attn_implementation: switch the models to this attention: ``packed_sdpa`` (per-document
            SDPA, :mod:`dpo_lightning.doc_attention`), ``flex_attention`` (GPU, block-sparse);
            ``None`` keeps the model's (``sdpa``/``eager``: a dense (N, N) mask, N² work).
        compile, group_by_length: see :class:`ForwardEngine`.
    """

    row_per_completion = False

    def __init__(
        self,
        prefix_sharing: bool = True,
        chunk_size: int | None = 1024,
        pad_to_multiple_of: int | None = None,
        attn_implementation: str | None = "packed_sdpa",
        compile: bool = False,
        group_by_length: bool = False,
    ) -> None:
        super().__init__(compile=compile, group_by_length=group_by_length)
        self.prefix_sharing = prefix_sharing
        self.chunk_size = chunk_size
        self.pad_to_multiple_of = pad_to_multiple_of
        self.attn_implementation = attn_implementation

    def collator(self, base: Callable) -> Callable:
        return PackedCollator(base.pad_token_id, self.prefix_sharing, self.pad_to_multiple_of)

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> CompletionStats:
        _check_head(model)
        impl = self._attention(model)
        attention = _cached_attention(batch, impl, next(model.parameters()).dtype)
        hidden = model.get_decoder()(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            use_cache=False,
            **attention,
        ).last_hidden_state[0]  # (N, H)
        predicting = hidden.index_select(0, batch["logit_index"])  # (M, H)
        head = model.get_output_embeddings()
        logps = head_token_logps(head, predicting, batch["target_ids"], self.chunk_size)  # (M,)
        mean_logits = head_mean_logits(head, predicting)  # (M,)
        return segment_stats(logps, mean_logits, batch["completion_index"], int(batch["num_completions"]))

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


def _cached_attention(batch: dict[str, Any], impl: str, dtype: torch.dtype) -> dict[str, Any]:
    """The packed mask (or layout), built once per batch and shared by policy and reference."""
    key = f"_packed_attention/{impl}/{dtype}"
    if key not in batch:
        batch[key] = packed_attention_kwargs(impl, batch["doc_ids"], batch["branch_ids"], dtype)
    return batch[key]


def _check_head(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    for key in _POST_HEAD_KEYS:
        value = getattr(config, key, None)
        if value not in (None, 1.0):
            raise ValueError(
                f"packed engine: the model's config sets {key}={value} (logits are transformed "
                "after the LM head, which the chunked head does not do); use engine=padded"
            )


def compile_decoder_layers(model: nn.Module) -> None:
    """``torch.compile`` every decoder layer in place (regional compilation: one small graph
    reused by all layers, compiled once; dynamic shapes so new batch lengths do not recompile)."""
    for layer in model.get_decoder().layers:
        layer.compile(dynamic=True)
    model._dpo_compiled = True
