"""Memory a separate reference (``reference=model``) costs on the policy's device, by placement.

    python scripts/reference_memory.py                # CPU: the meta device stands in for a GPU
    python scripts/reference_memory.py --device cuda  # a GPU: peak CUDA memory of 5 steps

Builds a Llama (``--hidden``, ``--layers``) as policy and another as the SFT reference, saved to a
temporary folder, then for each placement (``with_policy``: the default; ``cpu``:
``reference.device=cpu``) builds the DPO stage with ``ModelReference`` and moves it as Lightning
does (``module.to(device)``). Reported: parameter bytes of the reference resident on the policy's
device and on the CPU, and with ``--device cuda`` the peak CUDA memory of a few training steps.
Each placement runs in a fresh process (clean peaks).
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

import lightning as L
import torch

from dpo_lightning.data.datamodule import PreferenceDataModule
from dpo_lightning.data.synthetic import sentiment_pairs
from dpo_lightning.losses import DPOLoss
from dpo_lightning.models.loading import load_causal_lm
from dpo_lightning.models.tokenizers import offline_sentiment_tokenizer
from dpo_lightning.reference import ModelReference
from dpo_lightning.stages.dpo import DPOModule


def config(args: argparse.Namespace) -> dict:
    return dict(
        model_type="llama",
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )


def bytes_on(model: torch.nn.Module, device_type: str) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type == device_type)


def run_one(args: argparse.Namespace) -> dict:
    tokenizer = offline_sentiment_tokenizer()
    folder = os.path.join(args.workdir, "sft")
    if not os.path.exists(folder):
        load_causal_lm(config=config(args), vocab_size=len(tokenizer), seed=1).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    policy = load_causal_lm(config=config(args), vocab_size=len(tokenizer), seed=0)
    reference = ModelReference(folder, device="cpu" if args.placement == "cpu" else None)
    module = DPOModule(
        policy=policy,
        loss=DPOLoss(0.1),
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-5),
        reference=reference,
        tokenizer=tokenizer,
    )
    target = "meta" if args.device == "cpu" else args.device  # meta: a stand-in accelerator
    out = {"placement": args.placement, "policy_device": target}
    out["reference_params"] = sum(p.numel() for p in module.reference.model.parameters())
    if args.device == "cpu":
        module.to(target)  # what Lightning's strategy does with the stage
    else:
        dm = PreferenceDataModule(
            tokenizer, generator=functools.partial(sentiment_pairs, n=200), batch_size=8, max_length=96
        )
        torch.cuda.reset_peak_memory_stats()
        trainer = L.Trainer(
            accelerator="gpu",
            devices=1,
            max_steps=5,
            limit_val_batches=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(module, datamodule=dm)
        out["peak_cuda_MB"] = torch.cuda.max_memory_allocated() / 2**20
    dev = torch.device(target).type
    out["reference_MB_on_policy_device"] = bytes_on(module.reference.model, dev) / 2**20
    out["reference_MB_on_cpu"] = bytes_on(module.reference.model, "cpu") / 2**20
    out["policy_MB_on_policy_device"] = bytes_on(module.policy, dev) / 2**20
    out["peak_rss_MB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--placement", choices=["with_policy", "cpu"])
    parser.add_argument("--device", default="cpu", help="cpu (meta stand-in) or cuda")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    if args.placement:
        print("RESULT " + json.dumps(run_one(args)))
        return
    workdir = args.workdir or tempfile.mkdtemp()
    for placement in ("with_policy", "cpu"):  # fresh process each: clean peak memory
        argv = [*sys.argv[1:], "--placement", placement, "--workdir", workdir]
        out = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, check=True)
        print(next(line for line in out.stdout.splitlines() if line.startswith("RESULT")))


if __name__ == "__main__":
    main()
