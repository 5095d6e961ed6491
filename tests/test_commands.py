"""Every command in the README and in the package's module docstrings runs (issue 12 §1).

Commands are collected, not listed (:mod:`tests.commands`): one added later is picked up. Hub ids
and file names get local stand-ins; step counts are tiny. Where a model folder is given, the
exported ``hf_model/`` must carry **that model's own tokenizer**. What this machine cannot run (a
GPU, a cluster, the hub, a multi-GB model) is composed through Hydra with the same overrides and
must be refused only for the missing hardware, in one line; where a CPU stand-in exists
(``trainer=gpu`` → ``trainer=cpu``, ``trainer=ddp`` → ``trainer=ddp_cpu``) that runs as well.
The reasons are in :data:`tests.commands.HARDWARE` and printed by
:func:`test_hardware_commands_compose_and_are_refused_only_for_the_hardware`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf, open_dict

from tests.commands import HARDWARE, HUB_ONLY, STAGE_TINY, STEPS, Command, StandIns, collect, needs, rewrite
from tests.conftest import REPO, compose
from tests.standins import (
    FIXTURES,
    make_model_folder,
    make_reward_model_folder,
    make_tiny_default_folder,
    same_tokenizer,
    write_pairs,
    write_texts,
)

COMMANDS = collect()
SHRINK = {  # in-process runs: set after composing, where the key exists
    "trainer.max_steps": STEPS,
    "trainer.val_check_interval": STEPS,
    "trainer.limit_val_batches": 1,
    "trainer.log_every_n_steps": 1,
    "callbacks.progress_bar": None,
    "data.generator.n": 64,
}
TINY_ARGS = [
    f"trainer.max_steps={STEPS}",
    f"trainer.val_check_interval={STEPS}",
    "trainer.limit_val_batches=1",
]
SENTIMENT_TINY = [
    "corpus.n=400",
    "prompts.n_train=16",
    "prompts.n_eval=8",
    "sample.max_new_tokens=8",
    "sample.batch_size=16",
    "evaluate.best_of_n=2",
    "evaluate.samples_per_prompt=1",
]


def _kind(cmd: Command) -> str:
    if cmd.program in ("python3 -m venv", ".", "pip", "pytest"):
        return "setup"
    if needs(cmd):
        return "hardware"
    return _run_kind(cmd.argv)


MULTIPROCESS_TRAINERS = {"trainer=ddp_cpu", "trainer=fsdp_cpu", "trainer=tp_fsdp_cpu"}


def _run_kind(argv: list[str]) -> str:
    multi = {"-m", "--multirun"} & set(argv) or any(a.startswith("hparams_search=") for a in argv)
    # Lightning re-executes the command line for every extra rank: inside pytest that would re-run
    # the whole session, so a multi-process run goes through a subprocess of the CLI.
    processes = any(a in MULTIPROCESS_TRAINERS for a in argv) or any(
        a.startswith("trainer.devices=") and a.split("=", 1)[1] not in ("1", "auto") for a in argv
    )
    if argv[0] == "dpo-train" and not multi and not processes:
        return "inprocess"
    return "subprocess"


def _cpu_standin(cmd: Command) -> list[str] | None:
    """The command with its hardware arguments swapped for CPU ones, or None (no stand-in)."""
    if any(swap is None for _, swap in needs(cmd)):
        return None
    out = [HARDWARE[a][1] if a in HARDWARE else a for a in cmd.argv]
    out = ["trainer.devices=2" if a.startswith("trainer.devices=") else a for a in out]
    if "dpo_lightning.bench" in out:  # TRL absent: the dpo_lightning engine alone
        out = [a for i, a in enumerate(out) if a != "--engines" and (i == 0 or out[i - 1] != "--engines")]
        out += ["--engines", "dpo_lightning"]
    return out


RUNS = [c for c in COMMANDS if _kind(c) in ("inprocess", "subprocess")]
STANDIN_RUNS = [(c, a) for c in COMMANDS if _kind(c) == "hardware" and (a := _cpu_standin(c)) is not None]


def _id(cmd: Command) -> str:
    return f"{Path(cmd.source).name}: {cmd.text}"[:110]


# -- the shared work dir and stand-ins ----------------------------------------------------------------
@pytest.fixture(scope="module")
def stand(tmp_path_factory) -> StandIns:
    root = tmp_path_factory.mktemp("standins")
    for k in range(2):  # data.streaming=true: a folder of shards, more rows than streaming_val_rows
        write_pairs(root / "shards" / f"part-{k:02d}.jsonl", n=96)
    files = {
        "shards": root / "shards",
        "pairs": root / "shards",
        "pairs.jsonl": write_pairs(root / "pairs.jsonl"),
        "data.jsonl": write_pairs(root / "data.jsonl"),
        "qa.jsonl": write_pairs(
            root / "qa.jsonl", columns={"prompt": "question", "chosen": "good", "rejected": "bad"}
        ),
        "reviews.jsonl": write_texts(root / "reviews.jsonl"),
        "hh_local.jsonl": Path(shutil.copy(FIXTURES / "hh_rlhf.jsonl", root / "hh_local.jsonl")),
        "tool_pairs.jsonl": Path(
            shutil.copy(FIXTURES / "tool_conversations.jsonl", root / "tool_pairs.jsonl")
        ),
        "unpaired.jsonl": Path(shutil.copy(FIXTURES / "unpaired.jsonl", root / "unpaired.jsonl")),
        "feedback.jsonl": Path(shutil.copy(FIXTURES / "unpaired.jsonl", root / "feedback.jsonl")),
        "prompts.jsonl": Path(shutil.copy(FIXTURES / "prompts.jsonl", root / "prompts.jsonl")),
    }
    model = make_model_folder(root / "model")
    tiny = make_tiny_default_folder(root / "tiny_model")
    return StandIns(root, model, files, tiny, make_reward_model_folder(root / "reward_model", model))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """Where the commands run (their relative ``runs/...`` paths land here), in README order."""
    return tmp_path_factory.mktemp("workdir")


def _run_dir(argv: list[str], workdir: Path, name: str) -> Path:
    given = next((a.split("=", 1)[1] for a in argv if a.startswith("hydra.run.dir=")), None)
    return (workdir / given) if given else workdir / "runs" / name


def _inprocess(argv: list[str], workdir: Path, name: str) -> Path:
    """``dpo-train <argv>`` composed like the CLI, tiny steps set, run by ``train()``."""
    from dpo_lightning.train import train

    run_dir = _run_dir(argv, workdir, name)
    cfg = compose([a for a in argv if not a.startswith("hydra.run.dir=")], run_dir)
    with open_dict(cfg):
        del cfg["hydra"]
        cfg.paths.output_dir = str(run_dir)
        for key, value in SHRINK.items():
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(cfg, parent)
            if OmegaConf.is_dict(node) and leaf in node:
                node[leaf] = value
    train(cfg)
    return run_dir


def _subprocess(argv: list[str], workdir: Path, name: str) -> subprocess.CompletedProcess:
    program, args = argv[0], argv[1:]
    if program == "dpo-train":
        cmd = [sys.executable, "-m", "dpo_lightning.train", *args, *TINY_ARGS, "callbacks.progress_bar=null"]
        if "data=" not in " ".join(args):
            cmd.append("data.generator.n=64")
        if {"-m", "--multirun"} & set(args) or any(a.startswith("hparams_search=") for a in args):
            cmd += [f"hydra.sweep.dir={workdir / 'multirun' / name}"]
            cmd += ["hydra.sweeper.n_trials=2"] if any(a.startswith("hparams_search=") for a in args) else []
        else:
            cmd.append(f"hydra.run.dir={_run_dir(args, workdir, name)}")
    elif program == "dpo-sentiment":
        extra = [
            f"{k}={_tiny(k)}"
            for k in ("sft.extra", "dpo.extra")
            if not any(a.startswith(f"{k}=") for a in args)
        ]
        cmd = [sys.executable, "-m", "dpo_lightning.sentiment.pipeline", *args, *SENTIMENT_TINY, *extra]
    else:  # python -m dpo_lightning.bench ...
        cmd = [sys.executable, *argv[1:], "--steps", str(STEPS), "--warmup", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_DIR": str(workdir / "wandb")}
    return subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=1200, env=env)


def _tiny(key: str) -> str:
    return "[" + ",".join(f'"{e}"' for e in STAGE_TINY) + "]"


def _check_tokenizer(argv: list[str], run_dir: Path) -> None:
    """A model folder given: the export carries that model's own tokenizer."""
    model = next((a.split("=", 1)[1] for a in argv if a.startswith("model.name_or_path=")), None)
    if model is not None:
        assert same_tokenizer(run_dir / "hf_model", model), (
            f"{run_dir}/hf_model: not the tokenizer of {model}"
        )


# -- the tests -------------------------------------------------------------------------------------------
def test_commands_are_collected_and_each_is_handled():
    """Nothing is dropped: every collected command is run, stood in for, or a set-up step."""
    readme = [c for c in COMMANDS if c.source == "README.md"]
    docs = [c for c in COMMANDS if c.source != "README.md"]
    assert len(readme) >= 40 and len(docs) >= 15, (len(readme), len(docs))
    kinds = {c.text: _kind(c) for c in COMMANDS}
    assert set(kinds.values()) == {"setup", "hardware", "inprocess", "subprocess"}
    assert [c.text for c in COMMANDS if kinds[c.text] == "setup"] == [
        "python3 -m venv .venv",
        ". .venv/bin/activate",
        "pip install torch==2.13.0",
        "pip install -e .[dev]",
        "pytest",
    ]  # .ci/run runs the README's two set-up commands verbatim on a clean clone


@pytest.mark.parametrize("cmd", [c for c in RUNS if _kind(c) == "inprocess"], ids=_id)
def test_inprocess_command_runs(cmd, stand, workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    argv = rewrite(cmd, stand, workdir)
    name = f"{COMMANDS.index(cmd)}"
    if "resume=true" in argv and not (_run_dir(argv, workdir, name) / "checkpoints" / "last.ckpt").exists():
        _inprocess([a for a in argv if a != "resume=true"], workdir, name)  # the run it continues
    run_dir = _inprocess(argv, workdir, name)
    assert (run_dir / "summary.json").exists() and (run_dir / "hf_model").is_dir()
    _check_tokenizer(argv, run_dir)


@pytest.mark.parametrize(
    ("cmd", "argv"),
    [s for s in STANDIN_RUNS if _run_kind(s[1]) == "inprocess"],
    ids=lambda v: _id(v) if isinstance(v, Command) else "cpu",
)
def test_gpu_command_runs_with_its_cpu_standin(cmd, argv, stand, workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    args = rewrite(Command(cmd.source, " ".join(argv), argv), stand, workdir)
    run_dir = _inprocess(args, workdir, f"cpu{COMMANDS.index(cmd)}")
    assert (run_dir / "summary.json").exists()
    _check_tokenizer(args, run_dir)


def _unique(argvs: list[list[str]]) -> list[list[str]]:
    return list({" ".join(a): a for a in argvs}.values())


SUBPROCESS_RUNS = _unique(
    [c.argv for c in RUNS if _kind(c) == "subprocess"]
    + [a for _, a in STANDIN_RUNS if _run_kind(a) == "subprocess"]
)


@pytest.mark.slow
@pytest.mark.parametrize("argv", SUBPROCESS_RUNS, ids=lambda a: " ".join(a)[:100])
def test_multiprocess_sweep_sentiment_and_bench_commands_run(argv, stand, workdir):
    cmd = Command("", " ".join(argv), argv)
    full = [*argv[: 3 if argv[0] == "python" else 1], *rewrite(cmd, stand, workdir)]
    proc = _subprocess(full, workdir, f"sp{len(cmd.text)}-{sum(map(ord, cmd.text)) % 10**6}")
    assert proc.returncode == 0, f"{cmd.text}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


def _dpo_train_overrides(cmd: Command, stand: StandIns, workdir: Path) -> list[str]:
    """The Hydra overrides of a dpo-train / torchrun command, one job of a sweep."""
    args = rewrite(cmd, stand, workdir)
    if cmd.program == "torchrun":
        args = args[args.index("dpo_lightning.train") + 1 :]
    parsed = OverridesParser.create().parse_overrides([a for a in args if a not in ("-m", "--multirun")])
    return [
        f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}"
        if o.is_sweep_override()
        else o.input_line
        for o in parsed
    ]


@pytest.mark.parametrize("cmd", [c for c in COMMANDS if _kind(c) == "hardware"], ids=_id)
def test_hardware_commands_compose_and_are_refused_only_for_the_hardware(cmd, stand, workdir, tmp_path):
    from dpo_lightning.run.errors import UserError, one_line

    reasons = "; ".join(reason for reason, _ in needs(cmd))
    print(f"{cmd.text}\n  not run here: needs {reasons}")
    if cmd.program == "python -m dpo_lightning":
        from dpo_lightning.bench.cli import parse_args

        parse_args(cmd.argv[3:])  # the benchmark's own argument parser accepts it
        return
    if cmd.program == "dpo-sentiment":
        from hydra import compose as hcompose
        from hydra import initialize_config_dir

        from dpo_lightning.sentiment.pipeline import check_pipeline

        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = hcompose("sentiment", overrides=[*cmd.argv[1:], f"paths.output_dir={tmp_path}"])
        check = lambda: check_pipeline(cfg, tmp_path)  # noqa: E731
    else:
        from dpo_lightning.run.settings import check_settings

        cfg = compose(_dpo_train_overrides(cmd, stand, workdir), tmp_path)
        check = lambda: check_settings(cfg)  # noqa: E731
    if {reason for reason, _ in needs(cmd)} <= HUB_ONLY:
        check()  # every pre-model check passes; the upload is refused offline (test_model_card)
        return
    if torch.cuda.is_available():
        return  # composed; the refusal below is for machines without a GPU
    with pytest.raises(UserError) as err:
        check()
    line = one_line(err.value)
    assert any(word in line for word in ("accelerator", "quantization")), line
