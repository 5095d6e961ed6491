"""Sampling completions from the current policy: the generation-backend interface and the HF one.

A backend turns N prompts (token ids) into K sampled completions each, drawing only from the
``seed`` it is given, so a step's samples are a pure function of (policy weights, prompts, seed):
reproducible, and the same after a resume. :class:`HFGeneration` runs the policy's own
``generate`` in one batched call: prompts left-padded, the KV cache on, each row stopping at its
first EOS. Settings left ``None`` come from the policy's ``generation_config`` (its EOS ids,
repetition penalty, ...), then transformers' defaults; the ones given here override them.

A vLLM backend would implement :meth:`GenerationBackend.generate` with the policy's weights
loaded into a vLLM engine (refreshed after every optimizer step) and one request per prompt with
``n=K`` and the given seed; nothing else in the stage changes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class Samples:
    """K completions for each of N prompts.

    Attributes:
        completion_ids: ``[N][K]`` id lists, each ending at (and including) its first EOS, or
            at ``max_new_tokens`` without one.
        num_tokens: real tokens generated (the EOS counted, the padding after it not).
        clipped: completions that reached ``max_new_tokens`` without an EOS.
        seconds: wall time of the generation.
    """

    completion_ids: list[list[list[int]]]
    num_tokens: int
    clipped: int
    seconds: float


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """(N, T) ids and attention mask, padded on the left (generation appends on the right)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s) :] = 1
    return ids, mask


def split_at_eos(new_tokens: Tensor, eos_ids: list[int], k: int) -> tuple[list[list[list[int]]], int, int]:
    """Generated ids (N·K, T) cut after each row's first EOS, grouped K per prompt.

    Returns ``(completions [N][K], real tokens, rows without an EOS)``; the first EOS is found
    for all rows at once.
    """
    is_eos = torch.isin(new_tokens, torch.tensor(eos_ids, dtype=new_tokens.dtype, device=new_tokens.device))
    ended = is_eos.any(dim=1)
    lengths = torch.where(ended, is_eos.int().argmax(dim=1) + 1, new_tokens.shape[1]).tolist()
    rows = new_tokens.tolist()
    flat = [row[:n] for row, n in zip(rows, lengths, strict=True)]
    grouped = [flat[i : i + k] for i in range(0, len(flat), k)]
    return grouped, sum(lengths), int((~ended).sum())


def eos_token_ids(model: nn.Module, tokenizer_eos: int | None) -> list[int]:
    """The tokenizer's EOS and every EOS the policy's generation config names (chat models
    often end a turn with a token other than the tokenizer's EOS)."""
    config = getattr(model, "generation_config", None)
    configured = getattr(config, "eos_token_id", None)
    ids = configured if isinstance(configured, list) else [configured]
    return sorted({i for i in [tokenizer_eos, *ids] if i is not None})


class GenerationBackend:
    """Interface: ``generate(model, prompt_ids, k, seed, pad_token_id, eos_token_ids) -> Samples``."""

    #: Most new tokens per completion (the length of a training row is prompt + this at most).
    max_new_tokens: int

    def generate(
        self,
        model: nn.Module,
        prompt_ids: list[list[int]],
        k: int,
        seed: int,
        pad_token_id: int,
        eos_token_ids: list[int],
        synced_gpus: bool = False,
    ) -> Samples:
        """K samples per prompt, drawn from ``seed`` only (the caller's RNG streams untouched).

        ``synced_gpus``: keep stepping until every rank is done (sharded models run collectives
        in every forward, so ranks must make the same number of them).
        """
        raise NotImplementedError


class HFGeneration(GenerationBackend):
    """The policy's own ``generate``: batched, left-padded, KV cache, stop at EOS.

    Args:
        max_new_tokens: most tokens per completion.
        temperature, top_p, top_k: sampling settings; ``None`` keeps the policy's
            ``generation_config`` value (transformers' default when it has none: top_k=50!).
            The defaults (1, 1, 0) sample from π itself, which the KL estimate and on-policy
            DPO assume.
        **generate_kwargs: any other ``generate`` argument (``repetition_penalty``, ...).
    """

    def __init__(
        self,
        max_new_tokens: int = 64,
        temperature: float | None = 1.0,
        top_p: float | None = 1.0,
        top_k: int | None = 0,
        **generate_kwargs: Any,
    ) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"online.generation.max_new_tokens must be >= 1, got {max_new_tokens}")
        self.max_new_tokens = max_new_tokens
        given = {"temperature": temperature, "top_p": top_p, "top_k": top_k, **generate_kwargs}
        self.settings = {k: v for k, v in given.items() if v is not None}

    @torch.no_grad()
    def generate(
        self,
        model: nn.Module,
        prompt_ids: list[list[int]],
        k: int,
        seed: int,
        pad_token_id: int,
        eos_token_ids: list[int],
        synced_gpus: bool = False,
    ) -> Samples:
        device = next(model.parameters()).device
        ids, mask = left_pad(prompt_ids, pad_token_id)
        was_training = model.training
        model.eval()  # no dropout while sampling: the samples come from π itself
        start = time.perf_counter()
        try:
            # A private stream: sampling neither reads nor advances the run's RNG (dropout,
            # shuffling), so resuming and validating never shift it.
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed)
                out = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    do_sample=True,
                    num_return_sequences=k,  # the K rows of a prompt are adjacent
                    max_new_tokens=self.max_new_tokens,
                    pad_token_id=pad_token_id,
                    eos_token_id=eos_token_ids,
                    use_cache=True,
                    synced_gpus=synced_gpus,
                    **self.settings,
                )
        finally:
            model.train(was_training)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        completions, tokens, clipped = split_at_eos(out[:, ids.shape[1] :].cpu(), eos_token_ids, k)
        return Samples(completions, tokens, clipped, seconds)
