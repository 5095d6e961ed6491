"""Preference losses: one small ``nn.Module`` per loss, one ``conf/loss/<name>.yaml`` each.

Every loss takes per-*pair* summed log-probs ``policy_chosen_logps, policy_rejected_logps,
reference_chosen_logps, reference_rejected_logps`` (P,) plus the keyword arguments
``chosen_lengths``/``rejected_lengths`` (P,) and returns ``(losses, chosen_rewards,
rejected_rewards)``, each (P,). The training loop reduces and logs; it never checks a loss by
name, it reads :attr:`PreferenceLoss.is_reference_free`. Pure torch: imports no Lightning and
nothing else of the package but the leaf :mod:`dpo_lightning.run.errors` (constructors refuse
out-of-range settings with its ``SettingError``: β > 0 and finite for every loss with a β).

Files by family: ``base`` (index-API functions, base classes, helpers), ``margin`` (DPO and the
losses that reshape its margin Δ), ``logratio`` (losses on the chosen and rejected log-ratios
separately, or on batch-sorted margins), ``reference_free``, ``mix``.

==================  =========================  ==================================
config name         class                      TRL 1.16 equivalent
==================  =========================  ==================================
dpo                 DPOLoss                    sigmoid
cdpo                ConservativeDPOLoss        sigmoid + label_smoothing
robust              RobustDPOLoss              robust
hinge               HingeLoss                  hinge
ipo                 IPOLoss                    ipo (length-averaged)
exo_pair            ExoPairLoss                exo_pair
nca_pair            NCAPairLoss                nca_pair
bco_pair            BCOPairLoss                bco_pair
sppo_hard           SPPOHardLoss               sppo_hard
aot                 AOTLoss                    aot
aot_unpaired        AOTUnpairedLoss            aot_unpaired (aot_pair)
apo_zero            APOZeroLoss                apo_zero
apo_down            APODownLoss                apo_down
discopop            DiscoPOPLoss               discopop
sigmoid_norm        SigmoidNormLoss            sigmoid_norm
rpo                 RPOLoss                    sigmoid + rpo_alpha
simpo               SimPOLoss                  CPOTrainer simpo (reference-free)
orpo                ORPOLoss                   ORPOTrainer (reference-free)
sft                 SFTLoss                    sft (reference-free)
mix                 MixLoss                    loss_type list + loss_weights
==================  =========================  ==================================
"""

from dpo_lightning.losses.base import (
    PairLogps,
    PreferenceLoss,
    ReferenceFreeLoss,
    ReferenceLoss,
    dpo_loss,
    implicit_rewards,
    reward_model_loss,
)
from dpo_lightning.losses.logratio import (
    AOTLoss,
    AOTUnpairedLoss,
    APODownLoss,
    APOZeroLoss,
    BCOPairLoss,
    NCAPairLoss,
    SPPOHardLoss,
)
from dpo_lightning.losses.margin import (
    ConservativeDPOLoss,
    DiscoPOPLoss,
    DPOLoss,
    ExoPairLoss,
    HingeLoss,
    IPOLoss,
    RobustDPOLoss,
    RPOLoss,
    SigmoidNormLoss,
)
from dpo_lightning.losses.mix import MixLoss
from dpo_lightning.losses.reference_free import ORPOLoss, SFTLoss, SimPOLoss

__all__ = [
    "AOTLoss",
    "AOTUnpairedLoss",
    "APODownLoss",
    "APOZeroLoss",
    "BCOPairLoss",
    "ConservativeDPOLoss",
    "DPOLoss",
    "DiscoPOPLoss",
    "ExoPairLoss",
    "HingeLoss",
    "IPOLoss",
    "MixLoss",
    "NCAPairLoss",
    "ORPOLoss",
    "PairLogps",
    "PreferenceLoss",
    "RPOLoss",
    "ReferenceFreeLoss",
    "ReferenceLoss",
    "RobustDPOLoss",
    "SFTLoss",
    "SPPOHardLoss",
    "SigmoidNormLoss",
    "SimPOLoss",
    "dpo_loss",
    "implicit_rewards",
    "reward_model_loss",
]
