"""Rewards for online training, one interface (``online.reward._target_``).

``reward.score(prompts, completions) -> (N, K)`` scores K decoded completions of each of N
decoded prompts, higher is better, in batched calls (never one Python call per sample):

* :class:`TextReward` — any callable on full texts (prompt + completion), e.g. the sentiment
  experiment's VADER: ``{_target_: ...TextReward, fn: {_target_: ...VaderReward}}``;
* :class:`SequenceClassifierReward` — an ``AutoModelForSequenceClassification`` folder, such as
  ``stage=reward_model``'s ``hf_model/``, fed the rows exactly as that stage trained on them;
* :class:`RoundRobinReward` — a :class:`PairwiseJudge` (an LLM judge, ...) asked about every
  pair of a prompt's K completions in one call; a completion's score is its number of wins.

``calls(num_prompts, k)`` is what one ``score`` costs in reward-function evaluations (texts
scored, or comparisons judged): the budget an online run is compared on.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from dpo_lightning.data.tokenize import dedup_bos, with_eos
from dpo_lightning.engine.logps import position_ids_from_mask


class Reward:
    """Interface (see the module docstring)."""

    #: Axis label of plots and logs.
    name: str = "reward"

    def prepare(self, device: torch.device) -> None:
        """Called once the run's device is known (a reward model moves there)."""

    def calls(self, num_prompts: int, k: int) -> int:
        """Reward-function evaluations one :meth:`score` of ``num_prompts`` × ``k`` costs."""
        return num_prompts * k

    def score(self, prompts: list[str], completions: list[list[str]]) -> Tensor:
        """(N, K) float scores of ``completions[i][j]`` given ``prompts[i]``."""
        raise NotImplementedError


def checked_scores(scores: Tensor, n: int, k: int, name: str) -> Tensor:
    """``scores`` as a finite float (N, K) tensor, else one line naming the reward."""
    scores = torch.as_tensor(scores).float().cpu()
    if scores.numel() != n * k:
        raise ValueError(f"reward {name} returned {scores.numel()} scores for {n} prompts × {k} completions")
    scores = scores.reshape(n, k)
    if not torch.isfinite(scores).all():
        bad = int((~torch.isfinite(scores)).sum())
        raise ValueError(f"reward {name} returned {bad} non-finite score(s): rewards must be finite numbers")
    return scores


class TextReward(Reward):
    """A callable ``texts -> (M,) scores`` on prompt + completion texts, called once per batch.

    Args:
        fn: the scorer (``VaderReward()``, a function, ...); its ``name`` labels plots.
        separator: put between prompt and completion (``""``: the completion continues the
            prompt, as sampled).
    """

    def __init__(self, fn: Callable[[list[str]], Tensor], separator: str = "") -> None:
        self.fn, self.separator = fn, separator
        self.name = getattr(fn, "name", getattr(fn, "__name__", type(fn).__name__))

    def score(self, prompts: list[str], completions: list[list[str]]) -> Tensor:
        k = len(completions[0]) if completions else 0
        texts = [p + self.separator + c for p, cs in zip(prompts, completions, strict=True) for c in cs]
        return checked_scores(self.fn(texts), len(prompts), k, self.name)


class SequenceClassifierReward(Reward):
    """The scalar head of a sequence-classification model (``num_labels=1``, or a ``label``).

    Rows are built as ``stage=reward_model`` builds its training rows: the prompt tokenised with
    special tokens, the completion without, one EOS at its end, the head read at the last real
    token (right padding, :func:`last_token_logits`). A reward model trained there scores
    exactly what it learnt on.

    Args:
        path: the model folder (or hub id), with its tokenizer.
        label: which logit is the reward (default 0, the only one of a reward model); for a
            classifier with several labels, a label name from ``config.id2label``.
        batch_size: rows per forward.
        max_length: longest row (longer rows keep their first tokens).
    """

    def __init__(self, path: str, label: str | int = 0, batch_size: int = 64, max_length: int = 1024) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path).eval().requires_grad_(False)
        labels = {v: int(k) for k, v in (self.model.config.id2label or {}).items()}
        if isinstance(label, str) and label not in labels:
            raise ValueError(f"online.reward.label={label!r} is not a label of {path}: {sorted(labels)}")
        self.index = labels[label] if isinstance(label, str) else int(label)
        self.batch_size, self.max_length = batch_size, max_length
        self.name = f"reward model {path}"

    def prepare(self, device: torch.device) -> None:
        self.model.to(device)

    def rows(self, prompts: list[str], completions: list[list[str]]) -> list[list[int]]:
        """Token ids ``prompt + completion + EOS`` per completion (two tokenizer calls)."""
        tok = self.tokenizer
        prompt_ids = tok(prompts, add_special_tokens=True)["input_ids"]
        flat = tok([c for cs in completions for c in cs], add_special_tokens=False)["input_ids"]
        k = len(completions[0]) if completions else 0
        prompt_ids = [dedup_bos(p, tok.bos_token_id) for p in prompt_ids]
        rows = [prompt_ids[i // k] + with_eos(c, tok.eos_token_id) for i, c in enumerate(flat)]
        return [r[: self.max_length] for r in rows]

    @torch.no_grad()
    def score(self, prompts: list[str], completions: list[list[str]]) -> Tensor:
        rows = self.rows(prompts, completions)
        device = next(self.model.parameters()).device
        pad = self.model.config.pad_token_id
        pad = pad if pad is not None else self.tokenizer.eos_token_id
        out = []
        for s in range(0, len(rows), self.batch_size):
            chunk = rows[s : s + self.batch_size]
            width = max(len(r) for r in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, r in enumerate(chunk):
                ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
            logits = last_token_logits(self.model, ids.to(device), mask.to(device))  # (b, labels)
            out.append(logits[:, self.index].float().cpu())
        k = len(completions[0]) if completions else 0
        return checked_scores(torch.cat(out), len(prompts), k, self.name)


def last_token_logits(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """(B, labels) logits of right-padded rows (B, T), read at each row's last real token.

    A decoder with a linear ``score`` head (what ``stage=reward_model`` exports) is read at the
    mask's last position, as that stage trains it: HF's own forward looks for the last token
    that is not ``pad_token_id``, which skips a real final EOS whenever pad = EOS. Other
    classifiers (encoders reading a CLS token) use their own forward.
    """
    if not isinstance(getattr(model, "score", None), nn.Linear):
        return model(input_ids=input_ids, attention_mask=attention_mask).logits
    hidden = model.base_model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    ).last_hidden_state  # (B, T, H)
    last = attention_mask.sum(dim=1) - 1
    return model.score(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])


class PairwiseJudge:
    """Interface for judges that compare two completions (an LLM judge, a human queue, ...).

    ``judge(prompts, first, second) -> (P,)``: the probability (or 0 / 0.5 / 1 verdict) that
    ``first[i]`` is better than ``second[i]`` as an answer to ``prompts[i]``; one call for all P
    comparisons of a batch.
    """

    def judge(self, prompts: list[str], first: list[str], second: list[str]) -> Tensor:
        raise NotImplementedError


class RoundRobinReward(Reward):
    """Scores from a :class:`PairwiseJudge`: every pair (i, j) of a prompt's K completions is
    judged once (K(K-1)/2 comparisons), a win counts 1, a draw (0.5) half each; the score of a
    completion is its wins. With a consistent judge the ordering is the judge's ordering.

    Args:
        judge: the pairwise judge.
        threshold: ``p > 0.5 + threshold`` is a win of the first, ``p < 0.5 - threshold`` a win
            of the second, anything between a draw.
    """

    def __init__(self, judge: PairwiseJudge, threshold: float = 0.0) -> None:
        self.pairwise, self.threshold = judge, threshold
        self.name = f"round-robin {type(judge).__name__}"

    def calls(self, num_prompts: int, k: int) -> int:
        return num_prompts * k * (k - 1) // 2

    def score(self, prompts: list[str], completions: list[list[str]]) -> Tensor:
        n, k = len(prompts), len(completions[0]) if completions else 0
        first, second = torch.triu_indices(k, k, offset=1)  # (C,) each: every pair once
        p = self.pairwise.judge(
            [prompts[i] for i in range(n) for _ in range(first.numel())],
            [completions[i][j] for i in range(n) for j in first.tolist()],
            [completions[i][j] for i in range(n) for j in second.tolist()],
        )
        p = torch.as_tensor(p).float().cpu().view(n, -1)  # (N, C)
        first_wins = (p > 0.5 + self.threshold).float() + 0.5 * ((p - 0.5).abs() <= self.threshold).float()
        wins = torch.zeros(n, k)
        wins.index_add_(1, first, first_wins)
        wins.index_add_(1, second, 1.0 - first_wins)
        return checked_scores(wins, n, k, self.name)
