"""Test-only rewards and judges for online DPO (importable by CLI subprocesses: ``tests.online_fakes``)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
from torch import Tensor

from dpo_lightning.online.rewards import PairwiseJudge, Reward


def length_score(texts: list[str]) -> Tensor:
    """Characters per text: a reward that depends on the sample and nothing else."""
    return torch.tensor([float(len(t)) for t in texts])


def negative_length_score(texts: list[str]) -> Tensor:
    return -length_score(texts)


def constant_score(texts: list[str]) -> Tensor:
    """Every sample ties: no pair can form."""
    return torch.zeros(len(texts))


class FixedScores(Reward):
    """Returns the given (N, K) scores and records what it was asked to score."""

    def __init__(self, scores: list[list[float]]) -> None:
        self.scores = torch.tensor(scores)
        self.seen: list[tuple[list[str], list[list[str]]]] = []

    def score(self, prompts: list[str], completions: list[list[str]]) -> Tensor:
        self.seen.append((prompts, completions))
        return self.scores[: len(prompts)].clone()


class RankTies(Reward):
    """Completion length, except: every sample ties on rank 1, and on rank 0 at train call
    number ``tie_call`` (0-based) — so some steps have pairs on one rank only and one step has
    none on any rank."""

    def __init__(self, tie_call: int = 2) -> None:
        self.tie_call, self.calls_made = tie_call, 0

    def score(self, prompts: list[str], completions: list[list[str]]) -> Tensor:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        call, self.calls_made = self.calls_made, self.calls_made + 1
        scores = torch.tensor([[float(len(c)) for c in cs] for cs in completions])
        return torch.zeros_like(scores) if rank == 1 or call == self.tie_call else scores


class LengthJudge(PairwiseJudge):
    """Prefers the longer completion (0.5 on equal length): consistent with ``length_score``."""

    def __init__(self) -> None:
        self.calls = 0

    def judge(self, prompts: list[str], first: list[str], second: list[str]) -> Tensor:
        self.calls += 1
        a, b = length_score(first), length_score(second)
        return (a > b).float() + 0.5 * (a == b).float()


class RolloutRecorder(L.Callback):
    """Each rank writes ``<dirpath>/rank{r}.json``: per training batch, the prompt rows it
    sampled for and its own counts and sums, and a checksum of its final weights."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)
        self.batches: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        r = batch["rollout"]
        self.batches.append(
            {
                "step": trainer.global_step - 1,
                "prompt_rows": r.prompt_rows,
                "pairs": int(r.pairs.chosen.numel()),
                "ties": r.pairs.ties,
                "completions": r.scores.numel(),
                "reward_sum": float(r.scores.double().sum()),
                "batch_pairs": int(batch["num_pairs"]),
            }
        )

    def on_train_end(self, trainer, pl_module) -> None:
        checksum = sum(float(p.detach().double().sum()) for p in pl_module.policy.parameters())
        self.dirpath.mkdir(parents=True, exist_ok=True)
        out = {"batches": self.batches, "weights": checksum}
        (self.dirpath / f"rank{trainer.global_rank}.json").write_text(json.dumps(out))
