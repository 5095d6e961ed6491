"""LM-head kernels side by side: ``python -m dpo_lightning.bench.head``.

    python -m dpo_lightning.bench.head --shape smollm2-135m --tokens 512,4096 --repeat 3

Forward + backward of per-token log-probs ``log softmax(h @ W.T)[target]`` for (M, H) hidden
states and the shape's (V, H) head, with a random upstream gradient per token (as a DPO loss gives
each completion its own weight), for each kernel:

* ``dpo_lightning``: the project's chunked head (:mod:`dpo_lightning.engine.chunked_head`);
* ``dpo_lightning+metrics``: the same, also giving entropy, argmax hits and mean logits;
* ``torch``: ``torch.nn.functional.linear_cross_entropy(reduction="none")`` with its chunked
  path (``LinearCrossEntropyOptions(batch_chunk_size=chunk)``, torch ≥ 2.13);
* ``full``: the full (M, V) logits and ``log_softmax`` (what the padded engine does).

Each kernel runs in its own subprocess (clean peak memory), kernels alternate over ``--repeat``
rounds; every line is the median wall and process CPU time of ``--iters`` calls and the peak
memory above the inputs (RSS on CPU, allocated on CUDA).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from dpo_lightning.bench.workload import SHAPES
from dpo_lightning.engine.chunked_head import linear_token_stats


def _ours(metrics: bool) -> Callable:
    def run(h, w, t, chunk):
        return linear_token_stats(h, w, None, t, chunk, metrics=metrics).logps

    return run


def _torch(h, w, t, chunk):
    options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=chunk, chunking_method=None)
    return -F.linear_cross_entropy(h, w, t, reduction="none", options=options)


def _full(h, w, t, chunk):
    return torch.log_softmax((h @ w.t()).float(), -1).gather(-1, t[:, None]).squeeze(-1)


KERNELS: dict[str, Callable] = {
    "dpo_lightning": _ours(False),
    "dpo_lightning+metrics": _ours(True),
    "full": _full,
}
if hasattr(F, "linear_cross_entropy"):  # torch >= 2.13; older torch: the other kernels only
    KERNELS["torch"] = _torch


def measure(kernel: str, tokens: int, shape: str, chunk: int, iters: int) -> dict:
    """Median seconds of forward + backward and peak memory above the inputs, in this process."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cfg = SHAPES[shape]["config"]
    vocab, hidden = cfg["vocab_size"], cfg["hidden_size"]
    torch.manual_seed(0)
    h = torch.randn(tokens, hidden, device=device, dtype=dtype, requires_grad=True)
    w = (torch.randn(vocab, hidden, device=device, dtype=dtype) * 0.04).requires_grad_()
    t = torch.randint(0, vocab, (tokens,), device=device)
    g = torch.randn(tokens, device=device)
    fn = KERNELS[kernel]

    def step() -> None:
        (fn(h, w, t, chunk).float() * g).sum().backward()
        h.grad = w.grad = None
        if device == "cuda":
            torch.cuda.synchronize()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    step()  # warm-up (and the first peak)
    times, cpu = [], []
    for _ in range(iters):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    peak = (
        torch.cuda.max_memory_allocated()
        if device == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return {
        "kernel": kernel,
        "tokens": tokens,
        "shape": f"{shape} (V={vocab}, H={hidden}, {str(dtype).removeprefix('torch.')})",
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu x{torch.get_num_threads()}",
        "sec": round(statistics.median(times), 4),
        "cpu_sec": round(statistics.median(cpu), 4),
        "peak_extra_mib": round((peak - base) / 2**20),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    p.add_argument("--tokens", default="512,4096", help="comma list of M (predicted tokens)")
    p.add_argument("--kernels", default=",".join(KERNELS), help="comma list of: " + ", ".join(KERNELS))
    p.add_argument("--chunk", type=int, default=1024, help="rows per chunk (both chunked kernels)")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--repeat", type=int, default=1, help="rounds; kernels alternate within each")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = set(args.kernels.split(",")) - set(KERNELS)
    if unknown:
        have = ", ".join(KERNELS)
        p.error(f"--kernels: {sorted(unknown)} not available with torch {torch.__version__}; have {have}")
    if args.worker:
        if args.threads:
            torch.set_num_threads(args.threads)
        kernel, tokens = args.worker.split("@")
        print("HEAD_RESULT " + json.dumps(measure(kernel, int(tokens), args.shape, args.chunk, args.iters)))
        return
    rows: dict[tuple[str, int], list[dict]] = {}
    for _ in range(args.repeat):
        for tokens in (int(x) for x in args.tokens.split(",")):
            for kernel in args.kernels.split(","):
                row = _run(argv or sys.argv[1:], f"{kernel}@{tokens}")
                rows.setdefault((kernel, tokens), []).append(row)
                print(json.dumps(row), flush=True)
    for (kernel, tokens), runs in rows.items():
        summary = {
            "summary": kernel,
            "tokens": tokens,
            "sec_median": statistics.median(r["sec"] for r in runs),
            "cpu_sec_median": statistics.median(r["cpu_sec"] for r in runs),
            "peak_extra_mib_max": max(r["peak_extra_mib"] for r in runs),
        }
        print(json.dumps(summary), flush=True)


def _run(argv: list[str], worker: str) -> dict:
    cmd = [sys.executable, "-m", "dpo_lightning.bench.head", *argv, "--worker", worker]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("HEAD_RESULT ")), None)
    if proc.returncode != 0 or line is None:
        sys.exit(f"bench.head: {worker} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(line.removeprefix("HEAD_RESULT "))


if __name__ == "__main__":
    main()
