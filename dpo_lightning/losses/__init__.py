"""Preference losses: one small ``nn.Module`` per loss, one ``conf/loss/<name>.yaml`` each.

Every pairwise loss takes per-*pair* summed log-probs ``policy_chosen_logps,
policy_rejected_logps, reference_chosen_logps, reference_rejected_logps`` (P,) plus the keyword
arguments ``chosen_lengths``/``rejected_lengths`` (P,), ``mean_chosen_length`` (0-d: the global
batch's mean chosen length, which the token-level NLL terms of RPO/ORPO/SFT divide by so the loss
does not depend on how the batch is split across ranks) and the optional inputs it names in
``extra_inputs``, and returns ``(losses, chosen_rewards, rejected_rewards)``, each (P,). Unpaired
losses (:mod:`~dpo_lightning.losses.unpaired`) take labelled rows instead. The training loop
reduces and logs; it never checks a loss by name, it reads the attributes the losses declare
(``is_reference_free``, ``unpaired``, ``needs_mismatched``, ``extra_inputs``). Pure torch:
imports no Lightning and nothing else of the package but the leaf :mod:`dpo_lightning.run.errors`
(constructors refuse out-of-range settings with its ``SettingError``: β > 0 and finite for every
loss with a β).

Files by family: ``base`` (index-API functions, base classes, helpers), ``margin`` (DPO and the
losses that reshape its margin Δ or its log-probs), ``logratio`` (losses on the chosen and
rejected log-ratios separately, or on batch-sorted margins), ``reference_free``, ``mix``,
``unpaired`` (KTO, BCO on labelled completions), ``weighting`` (WPO, a wrapper of any pairwise
loss).

==================  =========================  ==================================
config name         class                      TRL 1.16 equivalent
==================  =========================  ==================================
dpo                 DPOLoss                    sigmoid
cdpo                ConservativeDPOLoss        none (TRL 1.16 sigmoid ignores label_smoothing)
robust              RobustDPOLoss              robust
hinge               HingeLoss                  hinge
ipo                 IPOLoss                    ipo (length-averaged)
exo_pair            ExoPairLoss                exo_pair
nca_pair            NCAPairLoss                nca_pair
bco_pair            BCOPairLoss                none (TRL 1.16 bco_pair has no running-mean shift)
sppo_hard           SPPOHardLoss               sppo_hard
aot                 AOTLoss                    aot
aot_unpaired        AOTUnpairedLoss            aot_unpaired (aot_pair)
apo_zero            APOZeroLoss                apo_zero
apo_down            APODownLoss                apo_down
discopop            DiscoPOPLoss               discopop
sigmoid_norm        SigmoidNormLoss            sigmoid_norm
f_dpo               FDivergenceDPOLoss         sigmoid + f_divergence_type / f_alpha_divergence_coef
ld_dpo              LDDPOLoss                  sigmoid + ld_alpha
rpo                 RPOLoss                    [sigmoid, sft], loss_weights [1, α]
simpo               SimPOLoss                  experimental CPOTrainer simpo, cpo_alpha=0
orpo                ORPOLoss                   experimental ORPOTrainer
sft                 SFTLoss                    sft (reference-free)
mix                 MixLoss                    loss_type list + loss_weights
kto                 KTOLoss                    KTOTrainer loss_type="kto" (unpaired)
bco                 BCOLoss                    none in 1.16 (BCOTrainer removed; unpaired)
(weighting=wpo)     WPOWeighting(any loss)     use_weighting=True
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
    FDivergenceDPOLoss,
    HingeLoss,
    IPOLoss,
    LDDPOLoss,
    RobustDPOLoss,
    RPOLoss,
    SigmoidNormLoss,
)
from dpo_lightning.losses.mix import MixLoss
from dpo_lightning.losses.reference_free import ORPOLoss, SFTLoss, SimPOLoss
from dpo_lightning.losses.unpaired import BCOLoss, KTOLoss, UnpairedLoss
from dpo_lightning.losses.weighting import WPOWeighting

__all__ = [
    "AOTLoss",
    "AOTUnpairedLoss",
    "APODownLoss",
    "APOZeroLoss",
    "BCOLoss",
    "BCOPairLoss",
    "ConservativeDPOLoss",
    "DPOLoss",
    "DiscoPOPLoss",
    "ExoPairLoss",
    "FDivergenceDPOLoss",
    "HingeLoss",
    "IPOLoss",
    "KTOLoss",
    "LDDPOLoss",
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
    "UnpairedLoss",
    "WPOWeighting",
    "dpo_loss",
    "implicit_rewards",
    "reward_model_loss",
]
