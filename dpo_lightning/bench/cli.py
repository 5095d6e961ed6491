"""Throughput benchmark: dpo_lightning vs TRL's ``DPOTrainer`` on identical data, one invocation.

    python -m dpo_lightning.bench --shape tiny --threads 1 --repeat 3     # CPU, both engines
    python -m dpo_lightning.bench --shape smollm2-135m --repeat 3         # CPU, SmolLM2-135M shape
    python -m dpo_lightning.bench --model ./my_model --shape smollm2-135m # a local HF model
    python -m dpo_lightning.bench --shape llama-1b --steps 30 --warmup 8  # one GPU (bf16)
    python -m dpo_lightning.bench --shape tiny --no-prefix-sharing --chunk-size 0  # what each buys
    python -m dpo_lightning.bench --shape smollm2-135m --engines dpo_lightning --no-packing \
        --reference precomputed

The workload is ``shared/bench/trl_anchor.py``'s: random token ids, the shape's prompt and
completion length distributions (1B: prompts 64–384, completions 32–384; SmolLM2: a quarter of
those; tiny: 8–32 / 4–32), ``--pairs`` pairs per optimizer step, AdamW (lr 1e-6), β = 0.1, an
inline frozen reference model, grad-norm clipping at 1.0 (TRL's default), bf16 weights on GPU,
fp32 on CPU. ``--model DIR`` benchmarks a local HF causal LM (its config and weights) on the
shape's lengths, with token ids drawn from its vocabulary. The ``dpo_lightning`` engine is what
users run: :class:`PreferenceDataModule` (tokenising the same text rows TRL gets),
:class:`DPOModule` and Lightning's ``Trainer``; ``--reference`` (``copy`` like TRL, or
``precomputed`` / ``adapter`` with ``--lora`` / ``none`` with SimPO) measures what each reference
strategy costs.

Each engine runs in its own subprocess (clean peak memory, no shared allocator state) and prints
one JSON line; engines alternate over ``--repeat`` runs and a last line gives the ratios of the
medians. Step time = wall time between consecutive step ends (data loading, collation, forward,
backward, optimizer, logging: everything), median over the timed steps; ``cpu_sec_per_step`` is
the process CPU time over the same spans (steadier on a shared machine). ``real_tok_per_s``
counts the workload's real tokens (prompt once per completion, as TRL computes them) for both
engines; ``mfu`` = model FLOPs of those tokens (6N + attention per policy token, 2N + attention
per reference token) / time / peak, the same numerator for both engines. ``mfu_executed``
(dpo_lightning) counts the FLOPs the engine computes instead (packed tokens, head on completion
tokens only, counted from its batches). The peak is ``--peak-tflops`` (default: 989 on CUDA, the
bf16 dense peak of H100/H200) or, on CPU, the fp32 matmul rate this process measures just before
the run. ``peak_mem_gib`` is peak RSS (CPU) or peak allocated (CUDA); ``start_mem_gib`` the
memory when training starts (weights and reference, before gradients and optimizer state).
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

from dpo_lightning.bench.engines import ENGINES, REFERENCES
from dpo_lightning.bench.workload import SHAPES, count_params, make_examples, model_config

# Per shape unless given: pairs per step, timed steps, warm-up steps.
DEFAULT_RUN = {"pairs": 8, "steps": 30, "warmup": 8}

# --- figures -------------------------------------------------------------------------------------


def cpu_peak_tflops(windows: int = 6, seconds: float = 0.25, sizes: tuple[int, ...] = (1024, 2048)) -> float:
    """Measured fp32 matmul rate of this CPU (current thread count), in TFLOP/s: the best of
    ``windows`` windows of ``seconds`` for square matmuls of each size. A peak is a best case:
    on a shared machine a neighbour's burst slows some windows, not the hardware."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        for _ in range(windows):
            k, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                a @ b
                k += 1
            best = max(best, 2 * n**3 * k / (time.perf_counter() - t0) / 1e12)
    return best


def step_flops(config, params: int, examples: list[dict], pairs: int) -> tuple[float, float]:
    """(real tokens, model FLOPs) per step of the workload, as trl_anchor.py counts them."""
    text = config.get_text_config()
    per_pair = statistics.mean(2 * len(e["prompt"]) + len(e["chosen"]) + len(e["rejected"]) for e in examples)
    tokens = per_pair * pairs
    seq = per_pair / 2
    attn = 12 * text.num_hidden_layers * text.hidden_size * seq  # per token, fwd+bwd
    return tokens, (6 * params + attn) * tokens + (2 * params + attn / 3) * tokens


def worker(args: argparse.Namespace) -> dict[str, Any]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    config = model_config(args.shape, args.model)
    vocab = config.get_text_config().vocab_size
    examples = make_examples(args.shape, args.pairs, args.steps, args.warmup, vocab)
    params = count_params(config)
    peak_tflops = args.peak_tflops or (989.0 if device == "cuda" else cpu_peak_tflops())
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    run = ENGINES[args.worker](args, examples, device)
    peak = (
        torch.cuda.max_memory_allocated() / 2**30
        if device == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (peak RSS)
    )
    med = statistics.median(run.times)
    tokens, flops = step_flops(config, params, examples, args.pairs)
    row = {
        "engine": args.worker,
        "model": args.model or args.shape,
        "device": torch.cuda.get_device_name()
        if device == "cuda"
        else f"cpu x{torch.get_num_threads()} threads",
        "params": params,
        "sec_per_step": round(med, 4),
        "cpu_sec_per_step": round(statistics.median(run.cpu_times), 4),
        "pairs_per_s": round(args.pairs / med, 3),
        "real_tok_per_s": round(tokens / med, 1),
        "peak_mem_gib": round(peak, 3),
        "start_mem_gib": None if run.start_mem is None else round(run.start_mem, 3),
        "mfu": round(flops / med / (peak_tflops * 1e12), 4),
        "mfu_executed": None
        if run.executed_flops is None
        else round(run.executed_flops / med / (peak_tflops * 1e12), 4),
        "tflops_per_s": round(flops / med / 1e12, 4),
        "peak_tflops": round(peak_tflops, 4),
        "steps_timed": len(run.times),
        "options": _options(args) if args.worker == "dpo_lightning" else {},
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    return row


def _options(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("packing", "prefix_sharing", "chunk_size", "attn", "compile", "group_by_length")
    keys += ("reference", "lora")
    return {k: getattr(args, k) for k in keys}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--model", default=None, help="a local HF causal LM folder (instead of the shape's)")
    p.add_argument("--engines", default="dpo_lightning,trl", help="comma list of: " + ", ".join(ENGINES))
    p.add_argument("--pairs", type=int, default=None, help="preference pairs per optimizer step")
    p.add_argument("--steps", type=int, default=None, help="timed steps")
    p.add_argument("--warmup", type=int, default=None, help="untimed first steps")
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
    p.add_argument("--reference", choices=sorted(REFERENCES), default="copy", help="dpo_lightning only")
    p.add_argument("--lora", type=int, default=0, help="LoRA rank of the policy (dpo_lightning; 0: full)")
    p.add_argument("--worker", choices=sorted(ENGINES), default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = set(args.engines.split(",")) - set(ENGINES)
    if unknown:
        p.error(f"--engines: unknown {sorted(unknown)}; choose from {sorted(ENGINES)}")
    if (args.reference != "copy" or args.lora) and "trl" in args.engines.split(","):
        p.error("--reference / --lora change dpo_lightning's run only: add --engines dpo_lightning")
    if args.reference == "adapter" and not args.lora:
        p.error("--reference adapter needs a LoRA policy: add --lora 16 (say)")
    for key, value in DEFAULT_RUN.items():
        if getattr(args, key) is None:
            setattr(args, key, SHAPES[args.shape].get(key, value))
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
        print(json.dumps(ratios(runs["dpo_lightning"], runs["trl"])), flush=True)


def ratios(ours: list[dict[str, Any]], trl: list[dict[str, Any]]) -> dict[str, Any]:
    """dpo_lightning / TRL: pairs/s and peak memory (medians over the runs), CPU time TRL / ours."""

    def med(rows: list[dict[str, Any]], key: str) -> float:
        return statistics.median(r[key] for r in rows)

    return {
        "ratio": "dpo_lightning/trl",
        "pairs_per_s": round(med(ours, "pairs_per_s") / med(trl, "pairs_per_s"), 3),
        "peak_mem": round(med(ours, "peak_mem_gib") / med(trl, "peak_mem_gib"), 3),
        "cpu_time_trl_over_ours": round(med(trl, "cpu_sec_per_step") / med(ours, "cpu_sec_per_step"), 3),
        "mfu_executed_ours": med(ours, "mfu_executed"),
        "repeats": len(ours),
    }


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
