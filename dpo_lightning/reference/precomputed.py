"""Reference log-probs computed once before training, cached on disk, then looked up per batch.

Before any optimizer step the policy *is* the reference, so the pass runs the policy itself (no
grads, eval mode, the trainer's precision): no second copy of the weights is ever built, and
training runs one forward per step instead of two. The table maps each completion row (its token
ids and which of them are labels) to its summed reference log-prob, so it serves train and
validation, pairs and K-wise rankings, any batch size and shuffling alike.

The cache file is named by a hash of (model fingerprint, tokenizer fingerprint, data fingerprint,
tokenization settings, precision): a second run — or another job of a sweep — with the same
four loads it and calls the model zero times. Under DDP every rank computes a disjoint shard of
the batches once, rank 0 merges the shards into the cache file, and all ranks load it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from tqdm.auto import tqdm

from dpo_lightning.logps import IGNORE_INDEX, CompletionStats, concatenated_forward
from dpo_lightning.reference.base import ReferenceStrategy

DEFAULT_CACHE = Path("~/.cache/dpo_lightning/reference_logps")
# Datamodule attributes that change the tokens (also covered by the data fingerprint; listed so a
# cache file's key says what it was made with).
TOKENIZATION_KEYS = (
    "max_length",
    "max_prompt_length",
    "truncation_mode",
    "add_eos",
    "chat_template",
)


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


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of the tokenizer class, vocabulary, special tokens and chat template."""
    if tokenizer is None:
        return "none"
    state = {
        "class": type(tokenizer).__name__,
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
        "chat_template": getattr(tokenizer, "chat_template", None),
        "padding_side": getattr(tokenizer, "padding_side", None),
    }
    return hashlib.sha256(json.dumps(state, sort_keys=True, default=str).encode()).hexdigest()


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
        self.cache_dir = Path(cache_dir or DEFAULT_CACHE).expanduser()
        self.table: dict[int, float] | None = None
        self.cache_path: Path | None = None
        self.forward_calls = 0  # model calls made by the pass (0 on a cache hit)

    def prepare(self, module: nn.Module, trainer: L.Trainer) -> None:
        if self.table is not None:
            return
        datamodule = trainer.datamodule
        if datamodule is None:
            raise ValueError("reference=precomputed needs trainer.fit(..., datamodule=...)")
        if not getattr(module.engine, "row_per_completion", True):
            raise ValueError(
                "reference=precomputed keys its cache by padded completion rows: use it with "
                "engine=padded (the packed engine fuses the reference forward instead)"
            )
        # Iterating the (shuffled) loaders draws from the global RNG: fork it, so training sees
        # the same batches in the same order as with reference=copy.
        device = trainer.strategy.root_device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            key = self.cache_key(module, trainer, datamodule)
            self.cache_path = self.cache_dir / f"{key}.pt"
            hit = self.cache_path.exists()
            if not hit:
                self._compute_shard(module, trainer, datamodule, key)
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

    def cache_key(self, module: nn.Module, trainer: L.Trainer, datamodule: Any) -> str:
        parts = {
            "model": model_fingerprint(module.policy),
            "tokenizer": tokenizer_fingerprint(getattr(datamodule, "tokenizer", None)),
            "data": data_fingerprint(datamodule),
            "tokenization": {k: _plain(getattr(datamodule, k, None)) for k in TOKENIZATION_KEYS},
            "precision": str(trainer.precision),
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]

    @torch.no_grad()
    def _compute_shard(self, module: nn.Module, trainer: L.Trainer, datamodule: Any, key: str) -> None:
        rank, world = trainer.global_rank, trainer.world_size
        policy = module.policy
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
        _atomic_save(shard, self._shard_path(key, rank, world))

    def _shard_path(self, key: str, rank: int, world: int) -> Path:
        return self.cache_dir / f"{key}.shard{rank}-of-{world}.pt"

    def _merge_shards(self, key: str, world: int) -> None:
        paths = [self._shard_path(key, r, world) for r in range(world)]
        shards = [torch.load(p, map_location="cpu", weights_only=True) for p in paths]
        merged = {k: torch.cat([s[k] for s in shards]) for k in ("keys", "logps")}
        _atomic_save(merged, self.cache_path)
        for p in paths:
            p.unlink()

    def completion_logps(self, module: nn.Module, batch: dict[str, Any]) -> CompletionStats:
        if self.table is None:
            raise RuntimeError("reference=precomputed: the table is built in DPOModule.setup (fit/validate)")
        keys = row_keys(batch["input_ids"], batch["attention_mask"], batch["labels"])
        try:
            values = [self.table[k] for k in keys]
        except KeyError:
            raise KeyError(
                f"a batch row is not in the reference cache {self.cache_path}: the data changed "
                "after the pass; delete that file or use reference=copy"
            ) from None
        logps = torch.tensor(values, device=batch["input_ids"].device)
        lengths = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(-1).float()
        return CompletionStats(logps=logps, lengths=lengths, mean_logits=torch.zeros_like(logps))


def _plain(value: Any) -> Any:
    """JSON-stable form of a setting: primitives as they are, anything else by its type name
    (an object's default repr holds a memory address, which would change the key every run)."""
    return value if isinstance(value, str | int | float | bool | None) else type(value).__name__


def _atomic_save(obj: Any, path: Path) -> None:
    """Write to a temporary name, then rename: readers never see a half-written file."""
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)
