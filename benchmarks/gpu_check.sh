#!/usr/bin/env bash
# One device call for issue 6: dpo_lightning vs TRL on the Llama-3.2-1B shape, same process
# tree, same card. Expected wall time ≈ 4–6 min (two model inits per engine run, TRL's
# tokenisation of 320 rows, a first torch.compile of the decoder layers and of FlexAttention).
#
# The device image has torch, transformers, lightning, accelerate but not trl / datasets /
# hydra-core: download their wheels here first (see /work/.library/device/README.md, "wheels"),
# e.g. trl==1.16.0 datasets==5.2.0 dill multiprocess hydra-core omegaconf antlr4-python3-runtime,
# and call `run` with carry [".whl"] and this file as the command:
#     bash benchmarks/gpu_check.sh
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline \
    TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site" || exit 1
fi
out="${OUT:-/tmp}"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
# Headline: all techniques incl. FlexAttention + compiled layers, then TRL, alternating.
python3 -m dpo_lightning.bench --shape llama-1b --steps 30 --warmup 8 --compile 2>&1 \
    | tee "$out/bench_llama1b_compiled.jsonl"
# What compilation buys (dpo_lightning only).
python3 -m dpo_lightning.bench --shape llama-1b --steps 30 --warmup 8 --engines dpo_lightning \
    --no-compile 2>&1 | tee "$out/bench_llama1b_eager.jsonl"
