"""Per-document SDPA for packed rows: attention costs Σ_doc L², not N² (the CPU varlen path).

A dense (N, N) mask makes SDPA compute every query-key pair of the packed row, although keys of
other documents are always masked: with D documents that is ~D times the needed work. Here the
attention call regroups its queries, keys and values into a (D, L_max) batch — one row per
document (an example's prompt and its completions) — runs one SDPA with a small per-document
mask, and scatters the result back to the packed order. Everything outside attention (the
matmuls, the norms) still runs on the padding-free (1, N) row.

Registered with transformers' ``AttentionInterface`` as ``packed_sdpa``; the layout travels to
each attention call as the ``packed_layout`` keyword, which HF decoders pass through to attention.
Called without a layout (generation, a callback calling the policy directly) it *is* ``sdpa``,
mask included, so switching a model to it changes nothing outside the packed engine. On GPU,
``flex_attention`` with a block mask does the per-document work inside one kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "packed_sdpa"


@dataclass
class PackedLayout:
    """Where each packed token sits in the (D, L_max) per-document grid.

    Attributes:
        gather: (D·L_max,) packed index of each grid slot (0 for empty slots).
        slot: (N,) grid slot of each packed token.
        mask: (D, 1, L_max, L_max) bool, True = attend (empty slots attend to themselves only,
            so no softmax row is empty).
        docs, width: D and L_max.
    """

    gather: Tensor
    slot: Tensor
    mask: Tensor
    docs: int
    width: int


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
    valid = valid.view(docs, width)
    q, k = (
        torch.arange(width, device=doc_ids.device)[:, None],
        torch.arange(width, device=doc_ids.device),
    )
    visible = (branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None])  # (D, Lq, Lk)
    mask = visible & (k <= q) & valid[:, None, :] & valid[:, :, None]
    mask |= torch.eye(width, dtype=torch.bool, device=doc_ids.device) & ~valid[:, :, None]
    return PackedLayout(gather, slot, mask[:, None], docs, width)


def packed_sdpa_attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    packed_layout: PackedLayout | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """HF attention-interface function: (1, H, N, d) q and (1, Hkv, N, d) k/v -> (1, N, H, d)."""
    if packed_layout is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    lay = packed_layout

    def to_grid(x: Tensor) -> Tensor:  # (1, h, N, d) -> (D, h, L, d)
        h, d = x.shape[1], x.shape[-1]
        return x[0][:, lay.gather].view(h, lay.docs, lay.width, d).transpose(0, 1)

    out = F.scaled_dot_product_attention(
        to_grid(query),
        to_grid(key),
        to_grid(value),
        attn_mask=lay.mask,
        dropout_p=dropout if module.training else 0.0,
        scale=scaling,
        enable_gqa=key.shape[1] != query.shape[1],
    )  # (D, H, L, d)
    h, d = out.shape[1], out.shape[-1]
    out = out.transpose(0, 1).reshape(h, lay.docs * lay.width, d)[:, lay.slot]  # (H, N, d)
    return out.transpose(0, 1)[None].contiguous(), None


#: Handed to the decoder as its attention mask next to a layout: a 4D tensor is passed through
#: untouched by transformers' mask builders, so they build no (N, N) mask that nobody reads.
NO_MASK = torch.ones(1, 1, 0, 0, dtype=torch.bool)

AttentionInterface.register(NAME, packed_sdpa_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)
