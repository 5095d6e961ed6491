#!/usr/bin/env bash
# One device call (issues 6 and 15): dpo_lightning vs TRL 1.16 on the Llama-3.2-1B shape on one
# H100/H200, compiled and eager, each in one invocation with the engines alternating, then the
# LM-head kernels (the project's chunked head, torch's linear_cross_entropy where the image's
# torch has it (>= 2.13), full logits) at that shape. Expected wall time ≈ 7–9 min: four engine
# runs (model init, TRL's tokenisation of 320 rows, 38 steps each), a first torch.compile of the
# decoder layers and of FlexAttention, ~1 min of head kernels. Everything lands in $OUT.
#
# The device image has torch, transformers, lightning, accelerate, peft, pyarrow but not trl /
# datasets (nor dill / multiprocess). Download their wheels here first, into the ignored .whl/
# (see /work/.library/device/README.md, "wheels"), with transformers pinned to the version the
# CPU figures were taken with:
#     echo /.whl/ >> .git/info/exclude
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#         --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#         --platform manylinux2014_x86_64 -d .whl \
#         trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 transformers==5.24.0
#     (datasets 5.2 needs pyarrow >= 24: add pyarrow to that list if versions.txt shows older)
# and call `run` with carry [".whl"], timeout_s 600, and this file as the command:
#     bash benchmarks/gpu_check.sh
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline \
    TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site:$PYTHONPATH" || exit 1
fi
out="${OUT:-/tmp}"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
python3 - <<'EOF' 2>&1 | tee "$out/versions.txt"
import importlib
for name in ("torch", "transformers", "trl", "datasets", "pyarrow", "lightning", "peft"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as err:  # noqa: BLE001 - a version report, not a check
        print(name, "MISSING:", err)
EOF
# Headline: every technique (packed rows, prefix sharing, chunked head, FlexAttention block mask,
# compiled decoder layers), then TRL, in one invocation (ratio line last).
python3 -m dpo_lightning.bench --shape llama-1b --steps 30 --warmup 8 --compile 2>&1 \
    | tee "$out/bench_llama1b_compiled.jsonl"
# Eager (no torch.compile), both engines again, so each figure has its TRL run beside it.
python3 -m dpo_lightning.bench --shape llama-1b --steps 30 --warmup 8 --no-compile 2>&1 \
    | tee "$out/bench_llama1b_eager.jsonl"
# The LM head alone at the 1B shape (V 128 256, H 2048, bf16): which kernel to keep on GPU.
python3 -m dpo_lightning.bench.head --shape llama-1b --tokens 4096,16384 --iters 5 --repeat 2 2>&1 \
    | tee "$out/head_llama1b.jsonl"
