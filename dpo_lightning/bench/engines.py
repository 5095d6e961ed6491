"""The engines the benchmark compares, each run in its own subprocess by ``__main__``.

``dpo_lightning`` is what users run (:class:`PreferenceDataModule`, :class:`DPOModule`,
Lightning's ``Trainer``); ``trl`` is TRL 1.16's ``DPOTrainer`` on the same rows and model.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from dpo_lightning.bench.workload import (
    StepClock,
    current_rss_gib,
    head_params,
    make_model,
    model_config,
    text_rows,
    word_tokenizer,
)


@dataclass
class Run:
    """What one engine's run measured: per timed step wall and CPU seconds; memory when training
    starts (GiB); the FLOPs it executed per step (median; None where not counted)."""

    times: list[float]
    cpu_times: list[float]
    start_mem: float | None = None
    executed_flops: float | None = None


@dataclass
class ExecutedFlops:
    """FLOPs the engine computes for a batch: the body's matmuls on every token it runs (packed:
    prompt once, no padding; padded: every padded position), the head on every token it scores,
    forward + backward for the policy (×3) and a forward for the reference (×1); attention left
    out (a few % here), the chunked head's backward recompute too (it is not model work)."""

    body_params: int
    head_params: int
    with_reference: bool
    per_step: list[float] = field(default_factory=list)

    def add(self, batch: dict[str, Any]) -> None:
        if "logit_index" in batch:  # packed: real tokens once, the head on completion tokens
            body, head = int(batch["num_tokens"]), int(batch["logit_index"].numel())
        else:  # padded rows, full logits
            body = head = int(batch["input_ids"].numel())
        passes = 2 * (3 + (1 if self.with_reference else 0))
        self.per_step.append(passes * (self.body_params * body + self.head_params * head))


#: ``--reference`` -> (reference strategy, reference-free loss?) for the dpo_lightning engine.
REFERENCES = {"copy": False, "precomputed": False, "adapter": False, "none": True}


def _reference(name: str, cache_dir: str):
    from dpo_lightning.reference import AdapterReference, CopyReference, NoReference, PrecomputedReference

    builders = {
        "copy": CopyReference,
        "precomputed": lambda: PrecomputedReference(cache_dir=cache_dir),
        "adapter": AdapterReference,
        "none": NoReference,
    }
    return builders[name]()


def run_dpo_lightning(args: argparse.Namespace, examples: list[dict], device: str) -> Run:
    import datasets
    import lightning as L

    from dpo_lightning.data.datamodule import PreferenceDataModule
    from dpo_lightning.engine import PackedEngine, PaddedEngine
    from dpo_lightning.losses import DPOLoss, SimPOLoss
    from dpo_lightning.models.lora import apply_lora
    from dpo_lightning.stages import DPOModule

    config = model_config(args.shape, args.model)
    vocab = config.get_text_config().vocab_size
    rows = text_rows(examples, vocab)
    attn = args.attn if args.attn != "auto" else ("flex_attention" if device == "cuda" else "per_document")
    engine = (
        PackedEngine(
            prefix_sharing=args.prefix_sharing,
            chunk_size=args.chunk_size or None,
            attn_implementation=attn,
            compile=args.compile,
        )
        if args.packing
        else PaddedEngine(compile=args.compile)
    )
    datamodule = PreferenceDataModule(
        word_tokenizer(vocab),
        generator=lambda: datasets.Dataset.from_list(rows),
        val_split=None,
        val_fraction=0.05,
        batch_size=args.pairs,
        max_length=2048,
        seed=0,
        group_by_length=args.group_by_length,
        layout=engine,
    )
    datamodule.setup("fit")
    policy = make_model(args.shape, device, args.model)
    if args.lora:
        policy = apply_lora(policy, r=args.lora, alpha=2 * args.lora)
    reference_free = REFERENCES[args.reference]
    module = DPOModule(
        policy,
        SimPOLoss() if reference_free else DPOLoss(beta=0.1),
        optimizer=partial(torch.optim.AdamW, lr=1e-6, fused=device == "cuda"),
        reference=_reference(args.reference, tempfile.mkdtemp(prefix="dpo_bench_ref_")),
        engine=engine,
    )
    head = head_params(config)
    params = sum(p.numel() for n, p in module.policy.named_parameters() if "lora_" not in n)
    tied = bool(getattr(config.get_text_config(), "tie_word_embeddings", False))
    reference_forward = not reference_free and args.reference != "precomputed"
    flops = ExecutedFlops(params - head * (1 if tied else 2), head, reference_forward)
    clock = StepClock(device)
    run = Run(clock.times, clock.cpu_times)

    class Clock(L.Callback):
        def on_train_start(self, trainer, pl_module):
            run.start_mem = torch.cuda.memory_allocated() / 2**30 if device == "cuda" else current_rss_gib()
            clock.tick()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            clock.tick()
            flops.add(batch)

    trainer = L.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        max_steps=args.warmup + args.steps,
        precision="32-true",
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[Clock()],
    )
    trainer.fit(module, datamodule=datamodule)
    run.times[:], run.cpu_times[:] = run.times[args.warmup :], run.cpu_times[args.warmup :]
    timed = flops.per_step[args.warmup :]
    run.executed_flops = sorted(timed)[len(timed) // 2] if timed else None
    return run


def run_trl(args: argparse.Namespace, examples: list[dict], device: str) -> Run:
    import datasets
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    vocab = model_config(args.shape, args.model).get_text_config().vocab_size
    policy = make_model(args.shape, device, args.model)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    clock = StepClock(device)
    run = Run(clock.times, clock.cpu_times)

    class Clock(TrainerCallback):
        def on_train_begin(self, a, s, c, **k):
            run.start_mem = torch.cuda.memory_allocated() / 2**30 if device == "cuda" else current_rss_gib()
            clock.tick()

        def on_step_end(self, a, s, c, **k):
            clock.tick()

    conf = DPOConfig(
        output_dir="/tmp/dpo_lightning_bench_trl",
        per_device_train_batch_size=args.pairs,
        max_steps=args.warmup + args.steps,
        learning_rate=1e-6,
        beta=0.1,
        bf16=device == "cuda",
        logging_steps=1000,
        save_strategy="no",
        report_to=[],
        max_length=2048,
        dataloader_num_workers=0,
        seed=0,
        use_cpu=device == "cpu",
        gradient_checkpointing=False,
        disable_dropout=True,
        optim="adamw_torch_fused" if device == "cuda" else "adamw_torch",
    )
    trainer = DPOTrainer(
        model=policy,
        ref_model=ref,
        args=conf,
        processing_class=word_tokenizer(vocab),
        train_dataset=datasets.Dataset.from_list(text_rows(examples, vocab)),
        callbacks=[Clock()],
    )
    trainer.train()
    run.times[:], run.cpu_times[:] = run.times[args.warmup :], run.cpu_times[args.warmup :]
    return run


ENGINES = {"dpo_lightning": run_dpo_lightning, "trl": run_trl}
