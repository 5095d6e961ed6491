"""The engines the benchmark compares, each run in its own subprocess by ``__main__``.

``dpo_lightning`` is what users run (:class:`PreferenceDataModule`, :class:`DPOModule`,
Lightning's ``Trainer``); ``trl`` is TRL 1.16's ``DPOTrainer`` on the same rows and model.
"""

from __future__ import annotations

import argparse
import copy
from functools import partial

import torch

from dpo_lightning.bench.workload import SHAPES, StepClock, make_model, text_rows, word_tokenizer


def run_dpo_lightning(
    args: argparse.Namespace, examples: list[dict], device: str
) -> tuple[list[float], list[float]]:
    import datasets
    import lightning as L

    from dpo_lightning.data.datamodule import PreferenceDataModule
    from dpo_lightning.engine import PackedEngine, PaddedEngine
    from dpo_lightning.losses import DPOLoss
    from dpo_lightning.stages import DPOModule

    vocab = SHAPES[args.shape]["config"]["vocab_size"]
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
    module = DPOModule(
        make_model(args.shape, device),
        DPOLoss(beta=0.1),
        optimizer=partial(torch.optim.AdamW, lr=1e-6, fused=device == "cuda"),
        engine=engine,
    )
    clock = StepClock(device)

    class Clock(L.Callback):
        def on_train_start(self, trainer, pl_module):
            clock.tick()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            clock.tick()

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
    return clock.times[args.warmup :], clock.cpu_times[args.warmup :]


def run_trl(args: argparse.Namespace, examples: list[dict], device: str) -> tuple[list[float], list[float]]:
    import datasets
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    vocab = SHAPES[args.shape]["config"]["vocab_size"]
    policy = make_model(args.shape, device)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    clock = StepClock(device)

    class Clock(TrainerCallback):
        def on_train_begin(self, a, s, c, **k):
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
    return clock.times[args.warmup :], clock.cpu_times[args.warmup :]


ENGINES = {"dpo_lightning": run_dpo_lightning, "trl": run_trl}
