"""Reference log-probs computed once before training, cached on disk, then looked up per batch.

Before any optimizer step the policy *is* the reference, so the pass runs the policy itself (no
grads, eval mode, the trainer's precision): no second copy of the weights is ever built, and
training runs one forward per step instead of two. The table maps each completion row (its token
ids and which of them are labels) to its summed reference log-prob, so it serves train and
validation, pairs and K-wise rankings, any batch size and shuffling alike.

The cache file is named by a hash of (model fingerprint, tokenizer fingerprint, data fingerprint,
the DataModule's length limits, precision): a second run — or another job of a sweep — with the
same five loads it and calls the model zero times. Under DDP every rank computes a disjoint shard of
the batches once, rank 0 merges the shards into the cache file, and all ranks load it.

Supports / assumptions: the padded engine (the table is keyed by padded completion rows); the
pass runs before the first step with the policy as given (unsharded under FSDP2).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from tqdm.auto import tqdm

from dpo_lightning.data.cache import tokenizer_fingerprint
from dpo_lightning.data.collate import IGNORE_INDEX
from dpo_lightning.engine import CompletionStats, EngineBatch, ForwardEngine
from dpo_lightning.engine.logps import concatenated_forward
from dpo_lightning.reference.base import ReferenceStrategy
from dpo_lightning.run.files import atomic_torch_save

DEFAULT_CACHE = Path("~/.cache/dpo_lightning/reference_logps")


def row_keys(input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> list[int]:
    """One 64-bit key per completion row from its real tokens and label mask: (B, T) ×3 -> [B].

    Padding side and width do not change a key; the prompt/completion split does.
    """
    ids, mask, labels = input_ids.cpu(), attention_mask.cpu().bool(), labels.cpu()
    keys = []
    for row_ids, row_mask, row_labels in zip(ids, mask, labels, strict=True):
        h = hashlib.blake2b(digest_size=8)
        h.update(row_ids[row_mask].numpy().astype("int64").tobytes())
        h.update((row_labels[row_mask] != IGNORE_INDEX).numpy().tobytes())
        keys.append(int.from_bytes(h.digest(), "little", signed=True))
    return keys


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
            keys = sorted(row_keys(batch["input_ids"], batch["attention_mask"], batch["labels"]))
            h.update(torch.tensor(keys).numpy().tobytes())
    return h.hexdigest()


class PrecomputedReference(ReferenceStrategy):
    """Reference log-probs from a one-off pass over train + validation data, cached on disk.

    Args:
        cache_dir: where cache files go (default ``~/.cache/dpo_lightning/reference_logps``);
            put it on a filesystem every rank sees.

    The pass uses the datamodule's own train and validation loaders (their batch sizes).
    """

    def __init__(self, cache_dir: str | None = None) -> None:
        super().__init__()
        self.cache_dir = Path(cache_dir or DEFAULT_CACHE).expanduser()
        self.table: dict[int, float] | None = None
        self.cache_path: Path | None = None
        self.forward_calls = 0  # model calls made by the pass (0 on a cache hit)

    def padded_rows_reason(self) -> str:
        return "reference=precomputed keys its cache by padded completion rows"

    def prepare(self, trainer: L.Trainer, policy: nn.Module, engine: ForwardEngine) -> None:
        if self.table is not None:
            return
        datamodule = trainer.datamodule
        if datamodule is None:
            raise ValueError("reference=precomputed needs trainer.fit(..., datamodule=...)")
        if not engine.row_per_completion:
            raise ValueError(
                "reference=precomputed keys its cache by padded completion rows: use it with "
                "engine=padded (the packed engine fuses the reference forward instead)"
            )
        # Iterating the (shuffled) loaders draws from the global RNG: fork it, so training sees
        # the same batches in the same order as with reference=copy.
        device = trainer.strategy.root_device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            key = self.cache_key(policy, trainer, datamodule)
            self.cache_path = self.cache_dir / f"{key}.pt"
            hit = self.cache_path.exists()
            if not hit:
                self._compute_shard(policy, trainer, datamodule, key)
                trainer.strategy.barrier("reference_logps_shards")
                if trainer.is_global_zero:
                    self._merge_shards(key, trainer.world_size)
                trainer.strategy.barrier("reference_logps_merged")
        saved = torch.load(self.cache_path, map_location="cpu", weights_only=True)
        self.table = dict(zip(saved["keys"].tolist(), saved["logps"].tolist(), strict=True))
        verb = "loaded" if hit else "computed"
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
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]

    @torch.inference_mode()
    def _compute_shard(self, policy: nn.Module, trainer: L.Trainer, datamodule: Any, key: str) -> None:
        rank, world = trainer.global_rank, trainer.world_size
        was_training = policy.training
        device = trainer.strategy.root_device
        policy.to(device).eval()
        # Unsharded loaders (the ranks split batches below); any other DataModule: its own.
        full = getattr(datamodule, "full_dataloaders", None)
        loaders = full() if full else [datamodule.train_dataloader(), datamodule.val_dataloader()]
        total = sum(len(loader) for loader in loaders)
        keys: list[int] = []
        logps: list[Tensor] = []
        bar = tqdm(total=total, desc="reference log-probs", disable=rank != 0)
        index = 0
        for loader in loaders:
            for batch in loader:
                if index % world == rank:  # each rank computes a disjoint shard of the batches
                    keys += row_keys(batch["input_ids"], batch["attention_mask"], batch["labels"])
                    with trainer.precision_plugin.forward_context():
                        stats = concatenated_forward(
                            policy,
                            *(batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")),
                        )
                    self.forward_calls += 1
                    logps.append(stats.logps.float().cpu())
                index += 1
                bar.update(1)
        bar.close()
        policy.train(was_training)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        shard = {
            "keys": torch.tensor(keys, dtype=torch.long),
            "logps": torch.cat(logps) if logps else torch.zeros(0),
        }
        atomic_torch_save(shard, self._shard_path(key, rank, world))

    def _shard_path(self, key: str, rank: int, world: int) -> Path:
        return self.cache_dir / f"{key}.shard{rank}-of-{world}.pt"

    def _merge_shards(self, key: str, world: int) -> None:
        paths = [self._shard_path(key, r, world) for r in range(world)]
        shards = [torch.load(p, map_location="cpu", weights_only=True) for p in paths]
        merged = {k: torch.cat([s[k] for s in shards]) for k in ("keys", "logps")}
        atomic_torch_save(merged, self.cache_path)
        for p in paths:
            p.unlink()

    def completion_logps(
        self, batch: EngineBatch, policy: nn.Module, engine: ForwardEngine
    ) -> CompletionStats:
        if self.table is None:
            raise RuntimeError("reference=precomputed: the table is built in DPOModule.setup (fit/validate)")
        data = batch.data
        keys = row_keys(data["input_ids"], data["attention_mask"], data["labels"])
        try:
            values = [self.table[k] for k in keys]
        except KeyError:
            raise KeyError(
                f"a batch row is not in the reference cache {self.cache_path}: the data changed "
                "after the pass; delete that file or use reference=copy"
            ) from None
        logps = torch.tensor(values, device=data["input_ids"].device)
        lengths = (data["labels"][:, 1:] != IGNORE_INDEX).sum(-1).float()
        return CompletionStats(logps=logps, lengths=lengths, mean_logits=torch.zeros_like(logps))
