"""Can the packed engine run this model exactly? Static checks, then a numeric probe.

The packed engine is exact only if the model's decoder hands the packed layout to its attention
and the head's logit transform is one :mod:`~dpo_lightning.engine.chunked_head` applies. Rather
than trusting names, :func:`packed_unsupported` checks what it can read (a decoder and an output
head, an attention implementation that takes the packed mask, sliding windows only where the
attention honours them), then runs both engines on a tiny probe batch — two examples, a shared
prompt and two completions each — and compares the summed log-probs. Any model that passes gives
the padded computation's numbers; any that fails is named with the difference.

The probe costs two forwards of ~30 tokens, once per model, in eval mode without gradients. It is
skipped for a model whose weights are not materialised (meta device).
"""

from __future__ import annotations

import inspect
import random
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dpo_lightning.data.collate import PreferenceCollator
from dpo_lightning.engine.base import as_engine_batch
from dpo_lightning.engine.packing import PACKED_ATTENTION

if TYPE_CHECKING:
    from dpo_lightning.engine.packed import PackedEngine

#: The attention implementation that honours per-layer sliding windows and attention
#: soft-capping on packed rows (the others get a dense mask or a block mask without them).
WINDOW_AWARE = "per_document"


def sliding_window_of(config: Any) -> int | None:
    """The sliding-window size some of the model's layers use, or None."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(text, "sliding_window", None)
    if window is None or not getattr(text, "use_sliding_window", True):
        return None
    layer_types = getattr(text, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return int(window)


def accepts_logits_to_keep(model: nn.Module) -> bool:
    """Whether the causal LM's forward takes ``logits_to_keep`` (a PEFT wrapper: its base model's)."""
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def static_unsupported(model: nn.Module, attn_implementation: str | None) -> str | None:
    """What the packed engine cannot do for ``model``, read from its structure and config."""
    if not callable(getattr(model, "get_decoder", None)) or not callable(
        getattr(model, "get_output_embeddings", None)
    ):
        return f"{type(model).__name__} has no get_decoder()/get_output_embeddings()"
    if model.get_output_embeddings() is None:
        return f"{type(model).__name__} has no output embeddings (LM head)"
    if not accepts_logits_to_keep(model):
        return f"{type(model).__name__}.forward takes no logits_to_keep (the head would run on every token)"
    config = model.config
    impl = attn_implementation or config._attn_implementation
    if impl not in PACKED_ATTENTION:
        return f"attention {impl!r} cannot take a packed mask (one of {sorted(PACKED_ATTENTION)} can)"
    if impl != config._attn_implementation and not model.is_backend_compatible():  # PEFT: forwarded
        return f"{type(model).__name__} cannot switch its attention to {impl!r}"
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if impl != WINDOW_AWARE and sliding_window_of(config) is not None:
        return f"sliding-window attention needs engine.attn_implementation={WINDOW_AWARE}, not {impl!r}"
    if impl != WINDOW_AWARE and impl != "eager" and getattr(text, "attn_logit_softcapping", None):
        return f"attention soft-capping needs engine.attn_implementation={WINDOW_AWARE}, not {impl!r}"
    return None


def probe_examples(vocab: int, seed: int = 0) -> list[dict[str, Any]]:
    """Two examples, each a prompt shared by a chosen and a rejected completion (token ids)."""
    rng = random.Random(seed)
    ids = lambda n: [rng.randrange(min(vocab, 1000)) for _ in range(n)]  # noqa: E731
    return [
        {"prompt_ids": ids(7), "completion_ids": [ids(5), ids(8)], "pairs": [[0, 1]], "row_id": 0},
        {"prompt_ids": ids(4), "completion_ids": [ids(6), ids(3)], "pairs": [[0, 1]], "row_id": 1},
    ]


@torch.no_grad()
def probe_mismatch(engine: PackedEngine, model: nn.Module) -> str | None:
    """Summed log-probs of the probe batch, packed vs padded; a line naming the gap, or None.

    Tolerance: 1e-3 (+1e-4 relative) for fp32 weights, 0.1 (+2e-2 relative) for 16-bit ones
    (the two layouts round differently); a layout error moves log-probs by far more.
    """
    from dpo_lightning.engine.padded import PaddedEngine

    if any(p.is_meta for p in model.parameters()):
        return None
    vocab = model.get_output_embeddings().weight.shape[0]
    examples = probe_examples(vocab)
    device = next(model.parameters()).device
    to = lambda b: {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()}  # noqa: E731
    was_training, original = model.training, model.config._attn_implementation
    model.eval()
    try:
        # ``forward``, not ``__call__``: the probe must not compile the layers (``engine.compile``)
        # before the reference copies the policy.
        padded = PreferenceCollator(0)(examples)
        want = PaddedEngine().forward(model, as_engine_batch(to(padded)), None).logps
        packed = engine.collator(0)(examples)
        got = engine.forward(model, as_engine_batch(to(packed)), None).logps
    finally:
        model.train(was_training)
    low = next(model.parameters()).dtype in (torch.float16, torch.bfloat16)
    atol, rtol = (0.1, 2e-2) if low else (1e-3, 1e-4)
    if torch.allclose(got.float(), want.float(), atol=atol, rtol=rtol):
        return None
    if model.config._attn_implementation != original:
        model.set_attn_implementation(original)  # back to what the padded engine will run
    gap = (got.float() - want.float()).abs().max().item()
    return (
        f"on a probe batch the packed log-probs differ from the padded ones by {gap:.3g} "
        f"({type(model).__name__}'s attention or head is not one the packed engine reproduces)"
    )
