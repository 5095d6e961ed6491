"""The DPO stage's side for unpaired batches (labelled completions: KTO, BCO).

An unpaired batch holds B labelled completions (``completion_labels`` (B,)) and no pairs, plus
``mismatched``: each prompt with another example's completions, forwarded only when the loss reads
a KL estimate (``needs_mismatched``). Metrics keep TRL 1.16's KTO names: ``rewards/chosen`` /
``logps/chosen`` / ``logits/chosen`` are means over the desirable rows, ``…/rejected`` over the
undesirable ones, ``rewards/margins`` their difference, plus the loss's own (``kl``, ``delta``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from dpo_lightning.run.errors import UserError

#: Tensor -> its sum over data-parallel ranks (identity on one process).
ReduceSum = Callable[[Tensor], Tensor]


def check_data_matches_loss(loss: Any, datamodule: Any) -> None:
    """Pairs for a pairwise loss, labelled rows for an unpaired one, two prompts per batch for a
    KL estimate; one line naming the fix otherwise. A data module that does not say is trusted."""
    unpaired = getattr(datamodule, "unpaired", None)
    if unpaired is None:
        return
    name = type(loss).__name__
    if loss.unpaired and not unpaired:
        raise UserError(
            f"loss {name} trains on labelled completions {{prompt, completion, label}} but the data "
            "holds pairs: add data.unpair=true (each pair gives its chosen completion as desirable "
            "and its rejected one as undesirable)"
        )
    if unpaired and not loss.unpaired:
        raise UserError(
            f"loss {name} trains on pairs but the data holds unpaired rows {{prompt, completion, "
            "label}}: use an unpaired loss (loss=kto or loss=bco)"
        )
    if getattr(loss, "needs_mismatched", False):
        for key in ("batch_size", "eval_batch_size"):
            size = getattr(datamodule, key, 2)
            if size < 2:
                raise UserError(
                    f"loss {name} estimates its KL term from other prompts of the same batch: "
                    f"data.{key}={size} needs to be at least 2"
                )


def require_unpaired_batch(batch: dict[str, Any], loss: Any) -> None:
    if "completion_labels" not in batch:
        raise UserError(
            f"loss {type(loss).__name__} needs batches of labelled completions (completion_labels); "
            "this batch holds pairs: use data.unpair=true or unpaired data"
        )


def unpaired_metrics(
    losses: Tensor,
    rewards: Tensor,
    logps: Tensor,
    mean_logits: Tensor,
    labels: Tensor,
    extra: dict[str, Tensor],
    reduce_sum: ReduceSum,
) -> list[tuple[dict[str, Tensor], int]]:
    """Metric groups and the number of rows behind each, over all ranks (one collective).

    Every value is already the global mean, so every rank logs the same numbers and the same keys
    (a group with no rows anywhere is left out on every rank); the weight is for averaging over
    validation batches. Inputs are (B,) per labelled completion.
    """
    d, u = labels.float(), (~labels).float()
    parts = [x.detach().float() for x in (rewards, logps, mean_logits)]
    sums = torch.stack(
        [losses.detach().float().sum(), d.new_tensor(float(labels.numel()))]
        + [(x * d).sum() for x in parts]
        + [d.sum()]
        + [(x * u).sum() for x in parts]
        + [u.sum()]
    )
    sums = reduce_sum(sums)
    total_loss, n, rd, ld, gd, nd, ru, lu, gu, nu = sums.unbind()
    n_all, n_d, n_u = int(n.item()), int(nd.item()), int(nu.item())
    groups = [({"loss": total_loss / n.clamp(min=1), **extra}, n_all)]
    if n_d:
        groups.append(({"rewards/chosen": rd / nd, "logps/chosen": ld / nd, "logits/chosen": gd / nd}, n_d))
    if n_u:
        groups.append(
            ({"rewards/rejected": ru / nu, "logps/rejected": lu / nu, "logits/rejected": gu / nu}, n_u)
        )
    if n_d and n_u:
        groups.append(({"rewards/margins": rd / nd - ru / nu}, n_all))
    return groups
