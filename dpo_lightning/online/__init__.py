"""What online training needs besides a forward: sampling, rewards, pairing.

``generation`` (the generation-backend interface and the policy's own ``generate``),
``rewards`` (one interface: callables on texts, sequence-classification reward models, pairwise
judges), ``pairing`` (scores of K samples per prompt → index pairs, ties counted). Used by
``stages/online_dpo.py``; imports the data and engine layers only, never a stage.
"""

from dpo_lightning.online.generation import GenerationBackend, HFGeneration, Samples
from dpo_lightning.online.pairing import AllPairs, BestVsWorst, Pairing, PromptPairs
from dpo_lightning.online.rewards import (
    PairwiseJudge,
    Reward,
    RoundRobinReward,
    SequenceClassifierReward,
    TextReward,
)

__all__ = [
    "AllPairs",
    "BestVsWorst",
    "GenerationBackend",
    "HFGeneration",
    "Pairing",
    "PairwiseJudge",
    "PromptPairs",
    "Reward",
    "RoundRobinReward",
    "Samples",
    "SequenceClassifierReward",
    "TextReward",
]
