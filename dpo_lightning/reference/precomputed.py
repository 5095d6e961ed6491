"""Reference log-probs computed once before training, cached on disk, then looked up per batch.

Before any optimizer step the policy *is* the reference, so the pass runs the policy itself (no
grads, eval mode, the trainer's precision): no second copy of the weights is ever built, and
training runs one forward per step instead of two. The table maps each completion row — keyed by
its content, the prompt ids and completion ids (:func:`~dpo_lightning.data.collate.content_key`,
which every collator puts in the batch as ``completion_keys``) — to its summed reference log-prob
and length, so it serves train and validation, pairs and K-wise rankings, any batch size and
shuffling, and both engines (padded rows or one packed row) alike: a cache written by a padded run
is read by a packed run and the other way round.

The cache file is named by a hash of (model fingerprint, tokenizer fingerprint, data fingerprint,
the DataModule's length limits, precision): a second run — or another job of a sweep — with the
same five loads it and calls the model zero times. Under DDP every rank computes a disjoint shard of
the batches once, rank 0 merges the shards into the cache file, and all ranks load it.

When the pass runs: the key (and a cache hit) is settled in the stage's ``setup``, from the
initial weights, before any sharding. A miss is computed

- in ``setup`` too, on the unsharded policy, when the strategy loads checkpoint weights before
  the models reach their devices (single device, DDP: a resumed run's weights arrive right after);
- otherwise after sharding (:meth:`PrecomputedReference.precompute`, the stage's
  ``on_fit_start``): under FSDP2 / TP+FSDP2 (and DeepSpeed) the pass runs the **sharded** policy on
  the accelerator, so a model that only fits sharded can precompute, and those strategies load
  checkpoint weights only after ``on_fit_start``, so the pass still sees the initial policy.
  Batches are split over the data-parallel ranks (the ranks of a tensor-parallel group forward the
  same batch) and every rank makes the same number of forward calls (each gathers weights
  collectively), repeating a batch where it has none left.

Supports / assumptions: every engine (the pass runs the stage's own engine on its own batches).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from tqdm.auto import tqdm

from dpo_lightning.data.cache import tokenizer_fingerprint
from dpo_lightning.data.sampler import data_parallel_position
from dpo_lightning.engine import CompletionStats, EngineBatch, ForwardEngine
from dpo_lightning.models.parallel import is_sharded
from dpo_lightning.reference.base import ReferenceStrategy
from dpo_lightning.run.files import atomic_torch_save

DEFAULT_CACHE = Path("~/.cache/dpo_lightning/reference_logps")
#: Part of every cache key: bump when the table's keys or values change meaning (2: rows keyed by
#: content, lengths stored), so an older file is never read with the wrong keys.
TABLE_VERSION = 2


def model_fingerprint(model: nn.Module, samples: int = 4096) -> str:
    """Hash of every tensor's name, shape, dtype, sum and a strided sample of its values.

    Cheap on multi-GB models (no full copy to the host) and changes when any weight tensor does
    in practice (a full-precision sum plus ~4k sampled values per tensor).
    """
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // samples)].float().cpu()
        h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|{flat.double().sum().item():.10e}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()


def data_fingerprint(datamodule: L.LightningDataModule) -> str:
    """The ``datasets`` fingerprints of the tokenized splits when available (they hash the source
    data and every transform), else a hash of every row key of the train and val loaders."""
    sets = [getattr(datamodule, name, None) for name in ("train_set", "val_set")]
    fingerprints = [getattr(ds, "_fingerprint", None) for ds in sets]
    if all(fingerprints):
        return "|".join(fingerprints)
    h = hashlib.sha256()
    for loader in (datamodule.train_dataloader(), datamodule.val_dataloader()):
        for batch in loader:
            h.update(torch.tensor(sorted(batch["completion_keys"])).numpy().tobytes())
    return h.hexdigest()


class PrecomputedReference(ReferenceStrategy):
    """Reference log-probs from a one-off pass over train + validation data, cached on disk.

    Args:
        cache_dir: where cache files go (default ``~/.cache/dpo_lightning/reference_logps``);
            put it on a filesystem every rank sees.

    The pass uses the datamodule's own train and validation loaders (their batch sizes).
    """

    live = False  # a lookup table of summed log-probs of the data set's rows

    def __init__(self, cache_dir: str | None = None) -> None:
        super().__init__()
        self.cache_dir = Path(cache_dir or DEFAULT_CACHE).expanduser()
        self.table: dict[int, tuple[float, float]] | None = None  # key -> (summed logp, length)
        self.cache_path: Path | None = None
        self.forward_calls = 0  # model calls made by the pass (0 on a cache hit)
        self.pass_placement = ""  # what the pass ran: the sharded or the unsharded policy

    def prepare(self, trainer: L.Trainer, policy: nn.Module, engine: ForwardEngine) -> None:
        """``setup``: the cache key from the initial weights; the table on a hit, or computed now
        when checkpoint weights would arrive before :meth:`precompute` (see the module docstring)."""
        if self.table is not None or self.cache_path is not None:
            return
        datamodule = trainer.datamodule
        if datamodule is None:
            raise ValueError("reference=precomputed needs trainer.fit(..., datamodule=...)")
        self.cache_path = self.cache_dir / f"{self.cache_key(policy, trainer, datamodule)}.pt"
        if self.cache_path.exists():
            self._load(hit=True)
        elif not trainer.strategy.restore_checkpoint_after_setup:
            self._compute(trainer, policy, engine)

    def precompute(self, trainer: L.Trainer, policy: nn.Module, engine: ForwardEngine) -> None:
        """After sharding, before checkpoint weights load: the pass, if ``setup`` left it."""
        if self.table is None:
            self._compute(trainer, policy, engine)

    def _compute(self, trainer: L.Trainer, policy: nn.Module, engine: ForwardEngine) -> None:
        # Iterating the (shuffled) loaders draws from the global RNG: fork it, so training sees
        # the same batches in the same order as with reference=copy.
        device = trainer.strategy.root_device
        key = self.cache_path.stem
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            replicas = self._compute_shard(policy, trainer, trainer.datamodule, engine, key)
            trainer.strategy.barrier("reference_logps_shards")
            if trainer.is_global_zero:
                self._merge_shards(key, replicas)
            trainer.strategy.barrier("reference_logps_merged")
        self._load(hit=False)

    def _load(self, hit: bool) -> None:
        saved = torch.load(self.cache_path, map_location="cpu", weights_only=True)
        values = zip(saved["logps"].tolist(), saved["lengths"].tolist(), strict=True)
        self.table = dict(zip(saved["keys"].tolist(), values, strict=True))
        verb = "loaded" if hit else f"computed ({self.pass_placement})"
        rank_zero_info(
            f"[dpo_lightning] reference log-probs {verb}: {len(self.table)} rows, {self.cache_path}"
        )

    def cache_key(self, policy: nn.Module, trainer: L.Trainer, datamodule: Any) -> str:
        tokenizer = getattr(datamodule, "tokenizer", None)
        parts = {
            "model": model_fingerprint(policy),
            "tokenizer": "none" if tokenizer is None else tokenizer_fingerprint(tokenizer),
            "data": data_fingerprint(datamodule),
            # What changes the tokens besides data and tokenizer: the length limits and policy.
            "limits": repr(getattr(datamodule, "limits", None)),
            "precision": str(trainer.precision),
            "table": TABLE_VERSION,
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]

    @torch.no_grad()
    def _compute_shard(
        self, policy: nn.Module, trainer: L.Trainer, datamodule: Any, engine: ForwardEngine, key: str
    ) -> int:
        """This data-parallel rank's share of the batches, saved as a shard; returns the number
        of shards (data-parallel ranks)."""
        rank, replicas = data_parallel_position(trainer)
        sharded = is_sharded(policy)
        self.pass_placement = "sharded policy" if sharded else "unsharded policy"
        was_training = policy.training
        device = trainer.strategy.root_device
        if not sharded:
            policy.to(device)
        policy.eval()
        # Unsharded loaders (the ranks split batches below); any other DataModule: its own.
        full = getattr(datamodule, "full_dataloaders", None)
        loaders = full() if full else [datamodule.train_dataloader(), datamodule.val_dataloader()]
        total = sum(len(loader) for loader in loaders)
        rounds = -(-total // replicas)  # forwards per rank: equal on every rank (collectives)
        keys: list[int] = []
        logps: list[Tensor] = []
        lengths: list[Tensor] = []
        bar = tqdm(total=rounds, desc="reference log-probs", disable=not trainer.is_global_zero)

        def forward(batch: dict[str, Any]) -> CompletionStats:
            with trainer.precision_plugin.forward_context():
                # The stage's engine on the collator's batch: padded or packed alike.
                stats = engine(policy, move_data_to_device(batch, device))
            bar.update(1)
            return stats

        done, last = 0, None
        for index, batch in enumerate(b for loader in loaders for b in loader):
            if index % replicas == rank:  # each data-parallel rank a disjoint share of the batches
                stats = forward(batch)
                self.forward_calls += 1
                keys += batch["completion_keys"]
                logps.append(stats.logps.float().cpu())
                lengths.append(stats.lengths.float().cpu())
                done, last = done + 1, batch
        while done < rounds:  # a rank with one batch fewer repeats one (result unused)
            forward(last if last is not None else next(iter(loaders[0])))
            done += 1
        bar.close()
        policy.train(was_training)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        shard = {
            "keys": torch.tensor(keys, dtype=torch.long),
            "logps": torch.cat(logps) if logps else torch.zeros(0),
            "lengths": torch.cat(lengths) if lengths else torch.zeros(0),
        }
        # The ranks of one tensor-parallel group write the same shard (atomic: either copy wins).
        atomic_torch_save(shard, self._shard_path(key, rank, replicas))
        return replicas

    def _shard_path(self, key: str, rank: int, world: int) -> Path:
        return self.cache_dir / f"{key}.shard{rank}-of-{world}.pt"

    def _merge_shards(self, key: str, world: int) -> None:
        paths = [self._shard_path(key, r, world) for r in range(world)]
        shards = [torch.load(p, map_location="cpu", weights_only=True) for p in paths]
        merged = {k: torch.cat([s[k] for s in shards]) for k in ("keys", "logps", "lengths")}
        atomic_torch_save(merged, self.cache_path)
        for p in paths:
            p.unlink()

    def completion_logps(
        self, batch: EngineBatch, policy: nn.Module, engine: ForwardEngine
    ) -> CompletionStats:
        if self.table is None:
            raise RuntimeError("reference=precomputed: the table is built in DPOModule.setup (fit/validate)")
        data = batch.data
        try:
            values = [self.table[k] for k in data["completion_keys"]]
        except KeyError:
            raise KeyError(
                f"a batch row is not in the reference cache {self.cache_path}: the data changed "
                "after the pass; delete that file or use reference=copy"
            ) from None
        device = data["input_ids"].device
        logps, lengths = torch.tensor(values, device=device).unbind(-1)  # (B,) each
        return CompletionStats(logps=logps, lengths=lengths, mean_logits=torch.zeros_like(logps))
