"""Batched sampling of K completions per prompt, and sequence log-probs of given completions.

Sampling is ancestral at temperature 1 with no top-k / top-p truncation by default, so samples
come from π itself and ``log π(y|x) − log π_ref(y|x)`` averaged over them is an unbiased
estimate of the sequence-level KL(π‖π_ref).
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dpo_lightning.data.collate import PreferenceCollator
from dpo_lightning.data.tokenize import encode_prompt
from dpo_lightning.engine.logps import concatenated_forward
from dpo_lightning.online.generation import left_pad

__all__ = ["completion_logps", "cut_at_eos", "encode_prompts", "left_pad", "sample_completions"]


def cut_at_eos(ids: list[int], eos_id: int | None) -> list[int]:
    """Generated ids up to and including the first EOS (what follows is padding)."""
    if eos_id is not None and eos_id in ids:
        return ids[: ids.index(eos_id) + 1]
    return ids


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[str]) -> list[list[int]]:
    """Prompt ids as training sees them (BOS where the model uses one)."""
    return [encode_prompt(tokenizer, p) for p in prompts]


@torch.no_grad()
def sample_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: list[list[int]],
    k: int,
    max_new_tokens: int,
    batch_size: int = 64,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
) -> list[list[list[int]]]:
    """``k`` sampled completions (token ids, ending at EOS when one was drawn) per prompt.

    Args:
        prompt_ids: N prompts as ids; ``batch_size`` of them go through ``generate`` at once
            (each expanded ``k`` times).

    Returns:
        ``[N][k]`` lists of completion ids.
    """
    torch.manual_seed(seed)
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    out: list[list[list[int]]] = []
    for start in range(0, len(prompt_ids), batch_size):
        chunk = prompt_ids[start : start + batch_size]
        ids, mask = left_pad(chunk, pad)
        generated = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            do_sample=True,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            num_return_sequences=k,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )[:, ids.shape[1] :].tolist()  # (len(chunk) * k, new), each prompt's k rows adjacent
        for i in range(len(chunk)):
            out.append([cut_at_eos(generated[i * k + j], tokenizer.eos_token_id) for j in range(k)])
    return out


@torch.no_grad()
def completion_logps(
    model: PreTrainedModel,
    prompt_ids: list[list[int]],
    completion_ids: list[list[list[int]]],
    pad_id: int,
    batch_size: int = 64,
) -> Tensor:
    """Summed log-probs of each completion given its prompt: (N, k).

    Uses the training path (:class:`PreferenceCollator` + :func:`concatenated_forward`), so the
    numbers are exactly the log-probs DPO optimises.
    """
    model.eval()
    device = next(model.parameters()).device
    collate = PreferenceCollator(pad_id)
    k = len(completion_ids[0])
    rows = []
    for start in range(0, len(prompt_ids), batch_size):
        batch = collate(
            [
                {"prompt_ids": p, "completion_ids": c, "pairs": []}
                for p, c in zip(
                    prompt_ids[start : start + batch_size],
                    completion_ids[start : start + batch_size],
                    strict=True,
                )
            ]
        )
        stats = concatenated_forward(
            model,
            batch["input_ids"].to(device),
            batch["attention_mask"].to(device),
            batch["labels"].to(device),
        )
        rows.append(stats.logps.float().cpu())
    return torch.cat(rows).view(len(prompt_ids), k)
