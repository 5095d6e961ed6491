"""The LightningModules, one per training stage (``conf/stage/``), and their metrics.

``base`` (what every stage shares: policy, optimizer, schedule, engine, logging), ``dpo`` (policy +
reference strategy + preference loss), ``inputs`` (the optional loss inputs the DPO stage builds),
``unpaired`` (its side for labelled completions: KTO, BCO), ``online_dpo`` (DPO on pairs sampled
from the policy each step), ``sft``, ``reward_model``, ``metrics``. Stages compose the
lower rooms (engine, losses, reference, models); nothing below imports a stage.
"""

from dpo_lightning.stages.base import PolicyModule
from dpo_lightning.stages.dpo import DPOModule
from dpo_lightning.stages.online_dpo import OnlineDPOModule
from dpo_lightning.stages.reward_model import RewardModelModule
from dpo_lightning.stages.sft import SFTModule

__all__ = ["DPOModule", "OnlineDPOModule", "PolicyModule", "RewardModelModule", "SFTModule"]
