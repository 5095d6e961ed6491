"""Throughput benchmark: dpo_lightning vs TRL's ``DPOTrainer`` on identical data, one invocation.

    python -m dpo_lightning.bench --shape tiny                          # CPU, both engines
    python -m dpo_lightning.bench --shape llama-1b --steps 30 --warmup 8  # one GPU (bf16)
    python -m dpo_lightning.bench --shape tiny --no-prefix-sharing --chunk-size 0  # what each buys

The workload is ``shared/bench/trl_anchor.py``'s: random token ids, prompts 64–384 and completions
32–384 tokens (8–32 / 4–32 for ``tiny``), ``--pairs`` pairs per optimizer step, AdamW (lr 1e-6),
β = 0.1, an inline frozen reference model, grad-norm clipping at 1.0 (TRL's default), bf16 weights
on GPU, fp32 on CPU. The ``dpo_lightning`` engine is what users run: :class:`PreferenceDataModule`
(tokenising the same text rows TRL gets), :class:`DPOModule` and Lightning's ``Trainer``.

Each engine runs in its own subprocess (clean peak memory, no shared allocator state) and prints
one JSON line; a last line gives the ratio (of the medians over ``--repeat`` alternating runs).
Step time = wall time between consecutive step ends (data loading, collation, forward, backward,
optimizer, logging: everything), median over the timed steps. ``real_tok_per_s`` counts the
workload's real tokens (prompt once per completion, as TRL computes them) for both engines;
``mfu`` = model FLOPs of those tokens (6N + attention per policy token, 2N + attention per
reference token) / time / ``--peak-tflops`` (default: 989 on CUDA, the bf16 dense peak of
H100/H200; a measured fp32 matmul peak on CPU).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from typing import Any

import torch

from dpo_lightning.bench.engines import ENGINES
from dpo_lightning.bench.workload import SHAPES, make_examples, make_model

# --- figures -------------------------------------------------------------------------------------


def cpu_peak_tflops(seconds: float = 1.0) -> float:
    """Measured fp32 matmul rate of this CPU (current thread count), in TFLOP/s."""
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return 2 * 512**3 * n / (time.perf_counter() - t0) / 1e12


def step_flops(shape: str, params: int, examples: list[dict], pairs: int) -> tuple[float, float]:
    """(real tokens, model FLOPs) per step of the workload, as trl_anchor.py counts them."""
    cfg = SHAPES[shape]["config"]
    per_pair = statistics.mean(2 * len(e["prompt"]) + len(e["chosen"]) + len(e["rejected"]) for e in examples)
    tokens = per_pair * pairs
    seq = per_pair / 2
    attn = 12 * cfg["num_hidden_layers"] * cfg["hidden_size"] * seq  # per token, fwd+bwd
    return tokens, (6 * params + attn) * tokens + (2 * params + attn / 3) * tokens


def worker(args: argparse.Namespace) -> dict[str, Any]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    examples = make_examples(args.shape, args.pairs, args.steps, args.warmup)
    params = sum(p.numel() for p in make_model(args.shape, "meta").parameters())  # no memory
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, cpu_times = ENGINES[args.worker](args, examples, device)
    peak = (
        torch.cuda.max_memory_allocated() / 2**30
        if device == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (peak RSS)
    )
    med = statistics.median(times)
    tokens, flops = step_flops(args.shape, params, examples, args.pairs)
    peak_tflops = args.peak_tflops or (989.0 if device == "cuda" else cpu_peak_tflops())
    return {
        "engine": args.worker,
        "device": torch.cuda.get_device_name()
        if device == "cuda"
        else f"cpu x{torch.get_num_threads()} threads",
        "params": params,
        "sec_per_step": round(med, 4),
        "cpu_sec_per_step": round(statistics.median(cpu_times), 4),
        "pairs_per_s": round(args.pairs / med, 2),
        "real_tok_per_s": round(tokens / med),
        "peak_mem_gib": round(peak, 3),
        "mfu": round(flops / med / (peak_tflops * 1e12), 4),
        "tflops_per_s": round(flops / med / 1e12, 3),
        "peak_tflops": round(peak_tflops, 3),
        "steps_timed": len(times),
        "options": _options(args) if args.worker == "dpo_lightning" else {},
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _options(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("packing", "prefix_sharing", "chunk_size", "attn", "compile", "group_by_length")
    return {k: getattr(args, k) for k in keys}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--engines", default="dpo_lightning,trl", help="comma list of: " + ", ".join(ENGINES))
    p.add_argument("--pairs", type=int, default=8, help="preference pairs per optimizer step")
    p.add_argument("--steps", type=int, default=30, help="timed steps")
    p.add_argument("--warmup", type=int, default=8, help="untimed first steps")
    p.add_argument("--repeat", type=int, default=1, help="runs per engine, alternating; ratio of medians")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--peak-tflops", type=float, default=None, help="MFU denominator")
    bool_opt = argparse.BooleanOptionalAction
    p.add_argument("--packing", action=bool_opt, default=True, help="padding-free packed rows")
    p.add_argument("--prefix-sharing", action=bool_opt, default=True, help="prompt once per pair")
    p.add_argument("--chunk-size", type=int, default=1024, help="LM-head chunk rows (0: unchunked)")
    p.add_argument(
        "--attn",
        default="auto",
        help="auto (flex_attention on GPU, per_document on CPU) | per_document | sdpa | eager",
    )
    p.add_argument("--compile", action=bool_opt, default=False, help="torch.compile decoder layers")
    p.add_argument("--group-by-length", action=bool_opt, default=False, help="length-grouped batches")
    p.add_argument("--worker", choices=sorted(ENGINES), default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = set(args.engines.split(",")) - set(ENGINES)
    if unknown:
        p.error(f"--engines: unknown {sorted(unknown)}; choose from {sorted(ENGINES)}")
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        print("BENCH_RESULT " + json.dumps(worker(args)), flush=True)
        return
    runs: dict[str, list[dict[str, Any]]] = {}
    # Engines alternate (A B A B ...) so a shared machine's load drifts over both alike.
    for _ in range(args.repeat):
        for engine in args.engines.split(","):
            runs.setdefault(engine, []).append(_run_worker(argv, engine))
            print(json.dumps(runs[engine][-1]), flush=True)
    if {"dpo_lightning", "trl"} <= runs.keys():
        ours, trl = (statistics.median(r["pairs_per_s"] for r in runs[e]) for e in ("dpo_lightning", "trl"))
        mem = (max(r["peak_mem_gib"] for r in runs[e]) for e in ("dpo_lightning", "trl"))
        cpu_ours, cpu_trl = (
            statistics.median(r["cpu_sec_per_step"] for r in runs[e]) for e in ("dpo_lightning", "trl")
        )
        print(
            json.dumps(
                {
                    "ratio": "dpo_lightning/trl",
                    "pairs_per_s": round(ours / trl, 3),
                    "peak_mem": round(next(mem) / next(mem), 3),
                    "cpu_time_trl_over_ours": round(cpu_trl / cpu_ours, 3),
                    "repeats": args.repeat,
                }
            ),
            flush=True,
        )


def _run_worker(argv: list[str], engine: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "dpo_lightning.bench", *argv, "--worker", engine],
        capture_output=True,
        text=True,
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_RESULT ")), None)
    if proc.returncode != 0 or line is None:
        sys.exit(
            f"bench: engine {engine} failed ({proc.returncode}):\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return json.loads(line.removeprefix("BENCH_RESULT "))
