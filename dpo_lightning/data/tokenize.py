"""Tokenization of one preference example, with an explicit truncation policy.

Prompt and completions are tokenised **separately** and concatenated as ids, so no token merges
across the prompt/completion boundary and the completion mask is exact. The prompt keeps the
tokenizer's special tokens (BOS where the model uses one) — once: a BOS already present in the
text (chat templates write it) is not doubled. Completions get no special tokens and end with
exactly one EOS.

Truncation, in order (as in the DPO authors' ``tokenize_batch_element``):
1. the prompt is cut to ``max_prompt_length`` (``keep_end`` keeps its last tokens, ``keep_start``
   its first; a leading BOS is kept either way);
2. a prompt that still fills ``max_length`` on its own is a fault, not something to cut silently:
   the example is dropped with reason ``prompt_fills_max_length`` (set ``max_prompt_length`` below
   ``max_length`` to have such prompts cut instead);
3. if prompt + longest completion exceeds ``max_length``, the prompt is cut further, but not
   below ``min(len(prompt), max(1, max_length // 2))`` tokens;
4. completions are then cut from the end to fit, never to zero tokens (the rule above leaves at
   least one position for them);
5. a pair whose two completions are then the same ids — or, once cut, the same text up to
   whitespace — carries no preference (its loss is ln 2 with zero gradient whatever the model):
   it is removed (:func:`drop_signal_free_pairs`). In a K-wise row only such pairs go, with the
   completions no pair uses any more (one note of that reason per pair); a row left
   with no pair is dropped (``identical_after_truncation``, or ``identical_after_tokenization``
   when nothing was cut: texts the tokenizer maps to the same ids).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase

from dpo_lightning.run.errors import check_choice, check_number

TRUNCATION_MODES = ("keep_end", "keep_start")


@dataclass
class TokenizedExample:
    """Token ids of a prompt and its K completions, plus what truncation did."""

    prompt_ids: list[int]
    completion_ids: list[list[int]]
    truncated_prompt: bool = False
    truncated_completion: bool = False
    drop_reason: str | None = None
    notes: list[str] = field(default_factory=list)


def _cut(ids: list[int], n: int, mode: str, keep_first: bool) -> list[int]:
    """Keep ``n`` tokens of ``ids`` by ``mode``; ``keep_first`` pins ids[0] (a BOS)."""
    if len(ids) <= n:
        return ids
    if mode == "keep_start":
        return ids[:n]
    if mode != "keep_end":
        raise ValueError(f"truncation_mode must be 'keep_start' or 'keep_end', got {mode!r}")
    return ids[:1] + ids[len(ids) - n + 1 :] if keep_first and n > 1 else ids[len(ids) - n :]


def dedup_bos(ids: list[int], bos: int | None) -> list[int]:
    """Drop a second leading BOS (text that already starts with one, plus the tokenizer's)."""
    if bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
        return ids[1:]
    return ids


def with_eos(ids: list[int], eos: int | None) -> list[int]:
    """``ids`` ending in exactly one EOS (none added when it already ends with one)."""
    if eos is not None and (not ids or ids[-1] != eos):
        return [*ids, eos]
    return ids


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Prompt ids with the tokenizer's special tokens, without a doubled BOS."""
    return dedup_bos(tokenizer(text, add_special_tokens=True)["input_ids"], tokenizer.bos_token_id)


def truncate(
    prompt: list[int],
    completions: list[list[int]],
    max_length: int,
    max_prompt_length: int | None = None,
    truncation_mode: str = "keep_end",
    has_bos: bool = False,
) -> TokenizedExample:
    """Apply the module's truncation policy to ids; see the module docstring."""
    out = TokenizedExample(prompt_ids=prompt, completion_ids=completions)
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        out.prompt_ids = _cut(prompt, max_prompt_length, truncation_mode, has_bos)
    if len(out.prompt_ids) >= max_length:
        out.drop_reason = "prompt_fills_max_length"
        return out
    longest = max(len(c) for c in completions)
    if len(out.prompt_ids) + longest > max_length:
        # The prompt keeps at least one token: the first completion token needs a context.
        floor = min(len(out.prompt_ids), max(1, max_length // 2))
        budget = max(max_length - longest, floor)
        out.prompt_ids = _cut(out.prompt_ids, budget, truncation_mode, has_bos)
    out.truncated_prompt = len(out.prompt_ids) < len(prompt)
    room = max_length - len(out.prompt_ids)  # >= 1: the prompt is shorter than max_length
    out.completion_ids = [c[:room] for c in completions]
    out.truncated_completion = any(len(c) > room for c in completions)
    return out


@dataclass(frozen=True)
class Limits:
    """Length limits and truncation policy (``data.max_length`` ...), see the module docstring."""

    max_length: int
    max_prompt_length: int | None = None
    truncation_mode: str = "keep_end"
    add_eos: bool = True

    def __post_init__(self) -> None:
        hint = "room for a prompt token and a completion token"
        check_number("max_length", self.max_length, minimum=2, integer=True, hint=hint)
        if self.max_prompt_length is not None:
            check_number(
                "max_prompt_length",
                self.max_prompt_length,
                minimum=1,
                below=self.max_length,
                integer=True,
                hint=f"below data.max_length={self.max_length}, so completions keep a token (null: no cut)",
            )
        check_choice("truncation_mode", self.truncation_mode, TRUNCATION_MODES)

    def apply(self, prompt_ids: list[int], completions: list[list[int]], bos: int | None) -> TokenizedExample:
        """:func:`truncate` under these limits; a leading ``bos`` of the prompt is kept."""
        has_bos = bool(prompt_ids) and prompt_ids[0] == bos
        return truncate(
            prompt_ids, completions, self.max_length, self.max_prompt_length, self.truncation_mode, has_bos
        )


def squash(text: str) -> str:
    """``text`` without its whitespace (to compare two texts up to whitespace)."""
    return "".join(text.split())


def drop_signal_free_pairs(
    ex: TokenizedExample, pairs: list[list[int]], decode: Callable[[list[int]], str]
) -> list[list[int]]:
    """The pairs of ``ex`` that still carry a preference after truncation (rule 5 above).

    Removes from ``ex`` the completions no kept pair uses (pairs re-indexed to match), notes each
    removed pair, and sets ``ex.drop_reason`` when none is left. ``decode`` (ids -> text) is only
    called for pairs of a cut row whose ids differ.
    """
    if ex.drop_reason is not None or not pairs:
        return pairs
    comps = ex.completion_ids

    def same(w: int, lose: int) -> bool:
        if comps[w] == comps[lose]:
            return True
        return ex.truncated_completion and squash(decode(comps[w])) == squash(decode(comps[lose]))

    kept = [p for p in pairs if not same(*p)]
    if len(kept) == len(pairs):
        return pairs
    reason = "identical_after_truncation" if ex.truncated_completion else "identical_after_tokenization"
    if not kept:
        ex.drop_reason = reason
        return pairs
    used = sorted({i for p in kept for i in p})
    index = {old: new for new, old in enumerate(used)}
    ex.completion_ids = [comps[i] for i in used]
    ex.notes += [reason] * (len(pairs) - len(kept))
    return [[index[w], index[lose]] for w, lose in kept]


def example_record(row_id: int, pairs: list[list[int]], ex: TokenizedExample) -> dict[str, Any]:
    """One tokenised row as stored in the cached data set (``length``: longest padded row)."""
    longest = max((len(c) for c in ex.completion_ids), default=0)
    return {
        "row_id": row_id,
        "prompt_ids": ex.prompt_ids,
        "completion_ids": ex.completion_ids,
        "pairs": pairs,
        "length": len(ex.prompt_ids) + longest,
        "truncated_prompt": ex.truncated_prompt,
        "truncated_completion": ex.truncated_completion,
        "drop_reason": ex.drop_reason,
        "notes": ex.notes,
    }


def tokenize_text_batch(
    batch: dict[str, list], tokenizer: PreTrainedTokenizerBase, limits: Limits
) -> dict[str, list]:
    """``datasets.map(batched=True)`` function for string prompts / completions.

    One tokenizer call for all prompts and one for all completions of the batch (the fast
    tokenizer parallelises inside a call), then the per-row policy above.
    """
    prompts = tokenizer(batch["prompt"], add_special_tokens=True)["input_ids"]
    flat = [c for cs in batch["completions"] for c in cs]
    flat_ids = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    out: dict[str, list] = {}
    at = 0
    for i, prompt_ids in enumerate(prompts):
        k = len(batch["completions"][i])
        comps = flat_ids[at : at + k]
        at += k
        if limits.add_eos:
            comps = [with_eos(c, eos) for c in comps]
        prompt_ids = dedup_bos(prompt_ids, bos)
        ex = limits.apply(prompt_ids, comps, bos)
        pairs = drop_signal_free_pairs(ex, batch["pairs"][i], tokenizer.decode)
        for key, value in example_record(batch["row_id"][i], pairs, ex).items():
            out.setdefault(key, []).append(value)
    return out


#: Columns of a tokenised batch that say what happened to each row (read by :func:`count_tokenized`).
ACCOUNTING_COLUMNS = ["row_id", "drop_reason", "truncated_prompt", "truncated_completion", "notes"]


def count_tokenized(cols: dict[str, list], locate: Callable[[int], tuple[Any, int]]) -> list[int]:
    """Record each tokenised row's fate in its own report: dropped (with its location), truncated,
    notes, kept; returns the indices of the rows kept. ``locate(row_id) -> (DataReport, 1-based
    location)`` (the in-memory path: its file's ledger; streaming: the stream's report). The one
    accounting rule for both paths."""
    keep = []
    reports: dict[int, Any] = {}
    for i, (row_id, reason) in enumerate(zip(cols["row_id"], cols["drop_reason"], strict=True)):
        report, location = locate(row_id)
        reports[id(report)] = report
        if reason:
            report.drop(reason, location)
            continue
        keep.append(i)
        report.rows_kept += 1
        report.truncate("prompt", int(cols["truncated_prompt"][i]))
        report.truncate("completion", int(cols["truncated_completion"][i]))
        for note in cols["notes"][i] or ():
            report.note(note)
    for report in reports.values():
        report.truncated = +report.truncated  # drop zero counts
    return keep
