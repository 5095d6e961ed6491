"""Memory and step time of the reference strategies (copy / precomputed / adapter).

    python scripts/bench_reference.py                  # all three, each in a fresh process
    python scripts/bench_reference.py --strategy copy --steps 30 --device cuda

Each strategy trains the same Llama (hidden 256, 4 layers by default) on the built-in data.
Reported: parameter + buffer bytes held by the module, peak process RSS (CPU) or peak CUDA
memory, mean training-step time after warm-up, and the one-off precompute pass.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import lightning as L
import torch

from dpo_lightning.data.datamodule import PreferenceDataModule
from dpo_lightning.data.synthetic import sentiment_pairs
from dpo_lightning.losses import DPOLoss
from dpo_lightning.models.loading import load_causal_lm
from dpo_lightning.models.lora import apply_lora
from dpo_lightning.models.tokenizers import offline_sentiment_tokenizer
from dpo_lightning.reference import AdapterReference, CopyReference, PrecomputedReference
from dpo_lightning.stages.dpo import DPOModule


class StepTimer(L.Callback):
    """Wall time and process CPU time of every training batch (CUDA synchronised). On a shared
    CPU the CPU time is the steadier measure (other jobs stretch wall time, not CPU time)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.cpu_times: list[float] = []

    def _sync(self, module: L.LightningModule) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._sync(pl_module)
        self._t0, self._c0 = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync(pl_module)
        self.times.append(time.perf_counter() - self._t0)
        self.cpu_times.append(time.process_time() - self._c0)


def run_one(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    tokenizer = offline_sentiment_tokenizer()
    dm = PreferenceDataModule(
        tokenizer,
        generator=functools.partial(sentiment_pairs, n=args.rows),
        batch_size=args.batch_size,
        max_length=args.max_length,
    )
    dm.setup("fit")
    config = dict(
        model_type="llama",
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    policy = load_causal_lm(config=config, vocab_size=len(tokenizer), seed=0)
    base_params = sum(p.numel() for p in policy.parameters())
    strategies = {
        "copy": CopyReference,
        "precomputed": functools.partial(PrecomputedReference, cache_dir=tempfile.mkdtemp()),
        "adapter": AdapterReference,
    }
    if args.strategy == "adapter":
        policy = apply_lora(policy, r=16, alpha=32)
    module = DPOModule(
        policy=policy,
        loss=DPOLoss(0.1),
        reference=strategies[args.strategy](),
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-4),
    )
    held = sum(t.numel() * t.element_size() for t in module.state_dict(keep_vars=True).values())
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator=args.device,
        devices=1,
        max_steps=args.steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    total = time.perf_counter() - t0
    steps, cpu = timer.times[args.warmup :], timer.cpu_times[args.warmup :]
    return {
        "strategy": args.strategy,
        "device": args.device,
        "base_params": base_params,
        "module_state_MB": held / 2**20,
        "peak_rss_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_cuda_MB": torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else None,
        "step_ms": 1000 * sum(steps) / len(steps),
        "step_cpu_ms": 1000 * sum(cpu) / len(cpu),
        "fit_s": total,
        "precompute_s": total - sum(timer.times) if args.strategy == "precomputed" else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", choices=["copy", "precomputed", "adapter"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    if args.strategy:
        print("RESULT " + json.dumps(run_one(args)))
        return
    for strategy in ("copy", "precomputed", "adapter"):  # fresh process each: clean peak memory
        argv = [a for a in sys.argv[1:]] + ["--strategy", strategy]
        out = subprocess.run(
            [sys.executable, __file__, *argv],
            capture_output=True,
            text=True,
            env=os.environ.copy(),
            check=True,
        ).stdout
        print(next(line for line in out.splitlines() if line.startswith("RESULT")))


if __name__ == "__main__":
    main()
