"""Per-document SDPA for packed rows: attention costs Σ_doc L², not N² (the CPU varlen path).

A dense (N, N) mask makes SDPA compute every query-key pair of the packed row, although keys of
other documents are always masked: with D documents that is ~D times the needed work. Here the
attention call regroups its queries, keys and values into a (D, L_max) batch — one row per
document (an example's prompt and its completions) — runs one SDPA with a small per-document
mask, and scatters the result back to the packed order. Everything outside attention (the
matmuls, the norms) still runs on the padding-free (1, N) row.

Registered with transformers' ``AttentionInterface`` as ``per_document``; the layout travels to
each attention call as the ``packed_layout`` keyword, which HF decoders pass through to attention.
Called without a layout (generation, a callback calling the policy directly) it *is* ``sdpa``,
mask included, so switching a model to it changes nothing outside the packed engine. On GPU,
``flex_attention`` with a block mask does the per-document work inside one kernel.

Supports the attention options HF decoders pass to their attention function: ``sliding_window``
(Mistral, Gemma-2/3, Qwen2: a query sees keys less than ``window`` positions back, by position,
not by slot — completions restart at the prompt length) and ``softcap`` (Gemma-2's
``attn_logit_softcapping``: ``s = c·tanh(s / c)`` before the mask, computed as eager attention
does, since SDPA has no soft-capping).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "per_document"


@dataclass
class PackedLayout:
    """Where each packed token sits in the (D, L_max) per-document grid.

    Attributes:
        gather: (D·L_max,) packed index of each grid slot (0 for empty slots).
        slot: (N,) grid slot of each packed token.
        mask: (D, 1, L_max, L_max) bool, True = attend (empty slots attend to themselves only,
            so no softmax row is empty).
        positions: (D, L_max) position id of each grid slot (0 for empty slots).
        docs, width: D and L_max.
    """

    gather: Tensor
    slot: Tensor
    mask: Tensor
    positions: Tensor
    docs: int
    width: int
    _windowed: dict[int, Tensor] = field(default_factory=dict, repr=False)

    def mask_for(self, sliding_window: int | None) -> Tensor:
        """The mask, restricted to keys fewer than ``sliding_window`` positions back (built once
        per window size and batch; the diagonal always stays, so no row is empty)."""
        if sliding_window is None:
            return self.mask
        if sliding_window not in self._windowed:
            near = (self.positions[:, :, None] - self.positions[:, None, :]) < sliding_window
            self._windowed[sliding_window] = self.mask & near[:, None]
        return self._windowed[sliding_window]


def packed_positions(doc_ids: Tensor, branch_ids: Tensor) -> Tensor:
    """(N,) position ids of a packed row, from its documents and branches alone: the prompt
    counts from 0, every completion from the prompt's length (as the collator numbers them)."""
    n = doc_ids.shape[0]
    idx = torch.arange(n, device=doc_ids.device)
    new_run = torch.ones(n, dtype=torch.bool, device=doc_ids.device)
    new_run[1:] = (doc_ids[1:] != doc_ids[:-1]) | (branch_ids[1:] != branch_ids[:-1])
    run_start = torch.cummax(torch.where(new_run, idx, 0), 0).values
    new_doc = torch.ones(n, dtype=torch.bool, device=doc_ids.device)
    new_doc[1:] = doc_ids[1:] != doc_ids[:-1]
    doc_start = torch.cummax(torch.where(new_doc, idx, 0), 0).values
    prompt = torch.zeros(n + 1, dtype=torch.long, device=doc_ids.device)
    prompt.index_add_(0, doc_start, (branch_ids == 0).long())  # prompt length per document start
    return idx - run_start + torch.where(branch_ids > 0, prompt[doc_start], 0)


def packed_layout(doc_ids: Tensor, branch_ids: Tensor) -> PackedLayout:
    """The grid of a packed row whose documents are contiguous runs of ``doc_ids`` (N,)."""
    n = doc_ids.shape[0]
    idx = torch.arange(n, device=doc_ids.device)
    new_run = torch.ones(n, dtype=torch.bool, device=doc_ids.device)
    new_run[1:] = doc_ids[1:] != doc_ids[:-1]
    run = new_run.long().cumsum(0) - 1  # (N,) document (run) of each token
    starts = idx[new_run]  # (D,)
    lengths = torch.diff(starts, append=torch.tensor([n], device=doc_ids.device))
    docs, width = starts.shape[0], int(lengths.max())
    offset = idx - starts[run]  # position inside its document
    slot = run * width + offset
    gather = torch.zeros(docs * width, dtype=torch.long, device=doc_ids.device)
    gather[slot] = idx
    valid = torch.zeros(docs * width, dtype=torch.bool, device=doc_ids.device)
    valid[slot] = True
    branch = branch_ids[gather].view(docs, width)
    positions = torch.where(valid, packed_positions(doc_ids, branch_ids)[gather], 0).view(docs, width)
    valid = valid.view(docs, width)
    q, k = (
        torch.arange(width, device=doc_ids.device)[:, None],
        torch.arange(width, device=doc_ids.device),
    )
    visible = (branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None])  # (D, Lq, Lk)
    mask = visible & (k <= q) & valid[:, None, :] & valid[:, :, None]
    mask |= torch.eye(width, dtype=torch.bool, device=doc_ids.device) & ~valid[:, :, None]
    return PackedLayout(gather, slot, mask[:, None], positions, docs, width)


def per_document_attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    packed_layout: PackedLayout | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """HF attention-interface function: (1, H, N, d) q and (1, Hkv, N, d) k/v -> (1, N, H, d)."""
    if packed_layout is None:
        if softcap is not None:  # sdpa refuses soft-capping: eager math on HF's own mask
            mask = attention_mask if attention_mask is not None else _causal(query, key)
            return capped_attention(module, query, key, value, mask, dropout, scaling, softcap), None
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    lay = packed_layout

    def to_grid(x: Tensor) -> Tensor:  # (1, h, N, d) -> (D, h, L, d)
        h, d = x.shape[1], x.shape[-1]
        return x[0][:, lay.gather].view(h, lay.docs, lay.width, d).transpose(0, 1)

    q, k, v, mask = to_grid(query), to_grid(key), to_grid(value), lay.mask_for(sliding_window)
    if softcap is not None:
        out = capped_attention(module, q, k, v, mask, dropout, scaling, softcap)  # (D, L, H, d)
        out = out.transpose(1, 2)
    else:
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=dropout if module.training else 0.0,
            scale=scaling,
            enable_gqa=key.shape[1] != query.shape[1],
        )  # (D, H, L, d)
    h, d = out.shape[1], out.shape[-1]
    out = out.transpose(0, 1).reshape(h, lay.docs * lay.width, d)[:, lay.slot]  # (H, N, d)
    return out.transpose(0, 1)[None].contiguous(), None


def capped_attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: Tensor,
    dropout: float,
    scaling: float | None,
    softcap: float,
) -> Tensor:
    """Eager attention with soft-capped scores, as Gemma-2's ``eager_attention_forward``:
    (B, H, Lq, d) q, (B, Hkv, Lk, d) k/v, bool mask (True = attend) -> (B, Lq, H, d)."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scores = query @ key.transpose(-1, -2) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return (weights @ value).transpose(1, 2).contiguous()


def _causal(query: Tensor, key: Tensor) -> Tensor:
    """(1, 1, Lq, Lk) bool causal mask, the queries being the last Lq of the Lk positions."""
    lq, lk = query.shape[-2], key.shape[-2]
    q = torch.arange(lk - lq, lk, device=query.device)[:, None]
    return (torch.arange(lk, device=query.device)[None, :] <= q)[None, None]


#: Handed to the decoder as its attention mask next to a layout: a 4D tensor is passed through
#: untouched by transformers' mask builders, so they build no (N, N) mask that nobody reads.
NO_MASK = torch.ones(1, 1, 0, 0, dtype=torch.bool)

AttentionInterface.register(NAME, per_document_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)
