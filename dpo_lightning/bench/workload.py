"""The benchmark's workload: model shapes, token-id examples, a word-level tokenizer, a clock.

Drawn exactly as ``shared/bench/trl_anchor.py`` draws them, so every engine sees the same data.
A shape gives a model config (random init) and the length distributions; ``--model DIR`` swaps
in any local HF causal LM (its own config and weights) on the shape's lengths.
"""

from __future__ import annotations

import random
import time

import torch

SHAPES = {
    "tiny": dict(
        config=dict(
            vocab_size=1000,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
        ),
        prompt=(8, 32),
        completion=(4, 32),
    ),
    "llama-1b": dict(
        config=dict(
            vocab_size=128256,
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
            rope_theta=500000.0,
        ),
        prompt=(64, 384),
        completion=(32, 384),
    ),
    # SmolLM2-135M's config (HuggingFaceTB/SmolLM2-135M, config.json), random init. The lengths
    # are the 1B workload's divided by 4, 4 pairs per step, 1 + 3 steps: three alternating repeats
    # of both engines fit in 15 minutes on 2 CPU cores (fp32); the matmuls and the 49k-vocab head
    # still dominate.
    "smollm2-135m": dict(
        config=dict(
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            max_position_embeddings=8192,
            tie_word_embeddings=True,
            rope_theta=100000.0,
            rms_norm_eps=1e-5,
        ),
        prompt=(16, 96),
        completion=(8, 96),
        pairs=4,
        steps=3,
        warmup=1,
    ),
}


def make_examples(
    shape: str, pairs: int, steps: int, warmup: int, vocab: int | None = None
) -> list[dict[str, list[int]]]:
    """Token-id examples, drawn exactly as ``trl_anchor.py`` draws them (``vocab``: the model's,
    when it is not the shape's)."""
    spec = SHAPES[shape]
    vocab = vocab or spec["config"]["vocab_size"]
    eos = vocab - 1
    rng = random.Random(0)
    out = []
    for _ in range((steps + warmup + 2) * pairs):
        pl = rng.randint(*spec["prompt"])
        out.append(
            {
                "prompt": [rng.randrange(0, vocab - 3) for _ in range(pl)],
                "chosen": [rng.randrange(0, vocab - 3) for _ in range(rng.randint(*spec["completion"]))]
                + [eos],
                "rejected": [rng.randrange(0, vocab - 3) for _ in range(rng.randint(*spec["completion"]))]
                + [eos],
            }
        )
    return out


def word_tokenizer(vocab: int):
    """A word-level tokenizer where ``w{i}`` is id i (the same one TRL gets in trl_anchor.py)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(vocab - 3)} | {
        "[UNK]": vocab - 3,
        "[PAD]": vocab - 2,
        "[EOS]": vocab - 1,
    }
    tk = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]"
    )


def text_rows(examples: list[dict[str, list[int]]], vocab: int) -> list[dict[str, str]]:
    """Prompt/chosen/rejected strings; the EOS is dropped here and re-added by each tokenisation."""

    def txt(ids: list[int]) -> str:
        return " ".join(f"w{i}" for i in ids if i < vocab - 3)

    return [
        {
            "prompt": txt(e["prompt"]),
            "chosen": " " + txt(e["chosen"]),
            "rejected": " " + txt(e["rejected"]),
        }
        for e in examples
    ]


def model_config(shape: str, model_dir: str | None = None):
    """The HF config of the benchmarked model: the shape's (a Llama), or the folder's."""
    from transformers import AutoConfig, LlamaConfig

    if model_dir:
        return AutoConfig.from_pretrained(model_dir)
    return LlamaConfig(**SHAPES[shape]["config"])


def make_model(shape: str, device: str, model_dir: str | None = None):
    """The model both engines train: the shape's config at random init (seed 0), or the weights
    of ``model_dir``; bf16 on CUDA, fp32 on CPU; SDPA attention where the model has it."""
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    if model_dir:
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    cfg = model_config(shape)
    cfg._attn_implementation = "sdpa"
    with torch.device(device):
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype)


def count_params(config) -> int:
    """Parameters of a model with this config (built on the meta device: no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())


def head_params(config) -> int:
    """Parameters of the LM head matmul (V·H), from a HF config."""
    text = config.get_text_config()
    return text.vocab_size * text.hidden_size


def current_rss_gib() -> float | None:
    """This process's resident memory now (Linux ``/proc``), in GiB; None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return None
    return kib / 2**20


class StepClock:
    """Wall time between consecutive optimizer-step ends (device synchronised), and the process's
    CPU time over the same spans (on a shared CPU with ``--threads 1``: the work, without the
    neighbours' load)."""

    def __init__(self, device: str) -> None:
        self.device, self.times, self.cpu_times, self._last = device, [], [], None

    def tick(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
        now = (time.perf_counter(), time.process_time())
        if self._last is not None:
            self.times.append(now[0] - self._last[0])
            self.cpu_times.append(now[1] - self._last[1])
        self._last = now
