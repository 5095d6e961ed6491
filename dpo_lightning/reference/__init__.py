"""Where reference log-probs come from (``conf/reference/*.yaml``).

==============  ====================  ==============================================================
config name     class                 reference log-probs
==============  ====================  ==============================================================
auto            AutoReference         copy for reference-based losses, none for reference-free (default)
copy            CopyReference         a frozen copy of the initial policy
none            NoReference           none: reference-free losses only (simpo, orpo, sft)
precomputed     PrecomputedReference  one pass before training, cached on disk, looked up per batch
adapter         AdapterReference      the LoRA policy with its adapter disabled (``model.lora``)
sync            SyncReference         TR-DPO: a copy moved toward the policy every N steps
model           ModelReference        a separate frozen checkpoint (``reference.name_or_path``)
==============  ====================  ==============================================================

Strategies read batches through the stage's forward engine and the data layer's conventions;
they import no stage (a stage holds a strategy, never the other way round).
"""

from dpo_lightning.reference.adapter import AdapterReference
from dpo_lightning.reference.base import (
    AutoReference,
    CopyReference,
    NoReference,
    ReferenceStrategy,
    check_pairing,
    frozen_copy,
)
from dpo_lightning.reference.model import ModelReference
from dpo_lightning.reference.precomputed import PrecomputedReference
from dpo_lightning.reference.sync import ReferenceSync, SyncReference, soft_update

__all__ = [
    "AdapterReference",
    "AutoReference",
    "CopyReference",
    "ModelReference",
    "NoReference",
    "PrecomputedReference",
    "ReferenceStrategy",
    "ReferenceSync",
    "SyncReference",
    "check_pairing",
    "frozen_copy",
    "soft_update",
]
