"""The benchmark's shapes, FLOP counts, head kernels and the GPU script's commands."""

from __future__ import annotations

import json
import re
import shlex

import pytest
import torch

from dpo_lightning.bench.cli import parse_args
from dpo_lightning.bench.engines import ExecutedFlops
from dpo_lightning.bench.workload import count_params, make_examples, model_config
from tests.conftest import REPO


def test_smollm2_shape_is_the_real_model():
    """SmolLM2-135M: 30 layers, hidden 576, 9/3 heads, vocab 49 152, tied: 134 515 008 parameters
    (the released checkpoint's count), a quarter of the 1B workload's lengths, 4 pairs per step."""
    config = model_config("smollm2-135m")
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert config.tie_word_embeddings and config.rope_parameters["rope_theta"] == 100000.0
    assert count_params(config) == 134_515_008
    args = parse_args(["--shape", "smollm2-135m"])
    assert (args.pairs, args.steps, args.warmup) == (4, 3, 1)
    ex = make_examples("smollm2-135m", 4, 3, 1)
    assert len(ex) == (3 + 1 + 2) * 4
    assert all(16 <= len(e["prompt"]) <= 96 and 9 <= len(e["chosen"]) <= 97 for e in ex)


def test_executed_flops_hand_worked():
    """Packed batch: 10 body tokens, 6 predicted; policy fwd+bwd (3 passes) + reference (1),
    2 FLOPs per multiply-add: 8 · (100·10 + 7·6) = 8 336. Padded: every position, head included."""
    flops = ExecutedFlops(body_params=100, head_params=7, with_reference=True)
    flops.add({"num_tokens": 10, "logit_index": torch.zeros(6)})
    flops.add({"input_ids": torch.zeros(2, 5)})
    assert flops.per_step == [8 * (100 * 10 + 7 * 6), 8 * (100 * 10 + 7 * 10)]


def test_head_kernels_agree():
    """Every kernel the head benchmark times computes the same log-probs and gradients."""
    from dpo_lightning.bench.head import KERNELS

    torch.manual_seed(0)
    h = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(101, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 101, (37,))
    g = torch.randn(37, dtype=torch.float64)
    results = {}
    for name, fn in KERNELS.items():
        lp = fn(h, w, t, 8)
        results[name] = (lp.double(), *torch.autograd.grad((lp.double() * g).sum(), [h, w]))
    want = results.pop("full")
    for name, got in results.items():
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)


def test_gpu_check_commands_parse():
    """benchmarks/gpu_check.sh runs unchanged on the device: its bench commands are valid."""
    from dpo_lightning.bench import head

    script = (REPO / "benchmarks" / "gpu_check.sh").read_text().replace("\\\n", " ")
    commands = re.findall(r"^python3 -m (dpo_lightning\.bench(?:\.head)?) ([^|]*)\|", script, re.M)
    assert [m for m, _ in commands] == ["dpo_lightning.bench"] * 2 + ["dpo_lightning.bench.head"]
    for module, args in commands:
        argv = [a for a in shlex.split(args) if a != "2>&1"]
        if module == "dpo_lightning.bench":
            parsed = parse_args(argv)
            assert parsed.shape == "llama-1b" and parsed.engines == "dpo_lightning,trl"
        else:
            with pytest.raises(SystemExit):  # parses, then --help-free dry run: bad kernel list
                head.main([*argv, "--kernels", "none"])


@pytest.mark.slow
def test_bench_runs_a_local_model_folder_with_both_engines(tmp_path, capsys):
    """``--model DIR --shape smollm2-135m``: a save_pretrained'd tiny Llama on the SmolLM2
    workload's lengths, both engines, one step each."""
    from dpo_lightning.bench import main
    from tests.conftest import make_tiny_model

    make_tiny_model(300).save_pretrained(tmp_path / "m")
    main(["--model", str(tmp_path / "m"), "--shape", "smollm2-135m", "--steps", "1", "--warmup", "0"])
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r.get("engine") for r in rows[:2]] == ["dpo_lightning", "trl"] and rows[2]["ratio"]
    assert rows[0]["model"] == str(tmp_path / "m") and rows[0]["params"] == rows[1]["params"]
    assert rows[0]["mfu_executed"] > 0 and rows[0]["start_mem_gib"] <= rows[0]["peak_mem_gib"]


@pytest.mark.slow
def test_bench_smollm2_shape_with_a_precomputed_reference(capsys):
    """The SmolLM2-135M shape itself (random init), dpo_lightning only, ``--reference
    precomputed`` on packed rows (its cache is keyed by completion content): one step, and the
    executed FLOPs below the workload's (prompt once, no padding, no reference forward)."""
    from dpo_lightning.bench import main

    args = "--shape smollm2-135m --engines dpo_lightning --reference precomputed --steps 1"
    args += " --warmup 0"
    main(args.split())
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["params"] == 134_515_008 and row["options"]["reference"] == "precomputed"
    assert 0 < row["mfu_executed"] < row["mfu"]


@pytest.mark.slow
def test_head_bench_runs_every_kernel(capsys):
    from dpo_lightning.bench import head

    head.main(["--shape", "smollm2-135m", "--tokens", "64", "--iters", "1"])
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert {r["kernel"] for r in rows if "kernel" in r} == set(head.KERNELS)
    assert all(r["sec"] > 0 for r in rows if "kernel" in r)
