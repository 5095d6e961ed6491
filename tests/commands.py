"""The commands the README and the package's module docstrings show, and how the tests run them.

:func:`collect` reads every fenced ``bash`` block of the README and every module docstring under
``dpo_lightning/`` (lines starting with a program of :data:`PROGRAMS`), so a command added later
is picked up without touching the tests. :func:`plan` decides, per command, with local stand-ins
for hub ids and files (:class:`StandIns`) and tiny step counts:

* ``inprocess``: a single ``dpo-train`` run, composed like the CLI and run by ``train()``;
* ``subprocess``: sweeps, several processes, ``dpo-sentiment``, the benchmark (slow tests);
* ``hardware``: the command needs what this machine lacks (a GPU, a cluster, the hub); it is
  composed with the same overrides, must be refused only for that (one line), and where a CPU
  stand-in exists (``trainer=gpu`` → ``trainer=cpu``) that runs too;
* ``setup``: the README's install / test commands, which ``.ci/run`` runs verbatim.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tests.conftest import REPO

PROGRAMS = ("dpo-train", "dpo-sentiment", "python -m dpo_lightning", "torchrun")
SETUP = ("python3 -m venv", ".", "pip", "pytest")
# Placeholders written in docstrings / the README, and what stands in for them.
PLACEHOLDERS = {
    "<sft dir>": "{model}",
    "<SFT>": "runs/sft/hf_model",  # what the SFT command exports (model=tiny's tokenizer by default)
    "<policy>": "{model}",
    "<sft>": "{model}",
    "<stage=reward_model run>/hf_model": "{reward_model}",
    "data.path=...": "data.path={pairs}",
}
TORCHRUN = {"N": "2", "G": "8", "HOST:PORT": "localhost:29500"}
STEPS = 2  # optimizer steps of every stand-in run


@dataclass
class Command:
    source: str  # README.md or the module's path
    text: str  # as written (continuations joined, comment stripped)
    argv: list[str]

    @property
    def program(self) -> str:
        return next((p for p in (*PROGRAMS, *SETUP) if " ".join(self.argv).startswith(p)), self.argv[0])


def _split(line: str, source: str) -> list[Command]:
    """One shell line: its ``&&`` segments, and ``cmd a | b | c`` as three commands (README
    shorthand for alternatives)."""
    out = []
    for segment in re.split(r"\s&&\s", line):
        parts = [p.strip() for p in re.split(r"\s\|\s", segment)]
        head = shlex.split(parts[0], comments=True)
        if not head:
            continue
        program = head[: 3 if head[:2] == ["python", "-m"] else 1]
        for i, part in enumerate(parts):
            argv = head if i == 0 else [*program, *shlex.split(part, comments=True)]
            out.append(Command(source, " ".join(argv), argv))
    return out


def readme_commands(readme: Path = REPO / "README.md") -> list[Command]:
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", readme.read_text(), re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            if line.strip() and not line.strip().startswith("#"):
                commands += _split(line.strip(), "README.md")
    return commands


def docstring_commands(package: Path = REPO / "dpo_lightning") -> list[Command]:
    commands = []
    for path in sorted(package.rglob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        for line in re.sub(r"\\\n\s*", " ", doc).splitlines():
            text = line.strip()
            if text.startswith(PROGRAMS):
                for key, value in PLACEHOLDERS.items():
                    text = text.replace(key, value)
                commands += _split(text, str(path.relative_to(REPO)))
    return commands


def collect() -> list[Command]:
    """README first, then docstrings; a command shown twice runs once."""
    seen, out = set(), []
    for cmd in [*readme_commands(), *docstring_commands()]:
        if cmd.text not in seen:
            seen.add(cmd.text)
            out.append(cmd)
    return out


# -- what each command needs ---------------------------------------------------------------------------
#: an argument -> (what this machine lacks, its CPU stand-in or None).
HARDWARE = {
    "trainer=gpu": ("a CUDA GPU", "trainer=cpu"),
    "trainer=ddp": ("CUDA GPUs (DDP)", "trainer=ddp_cpu"),
    "trainer=fsdp": ("CUDA GPUs (FSDP2, bf16)", "trainer=fsdp_cpu"),
    "trainer=tp_fsdp": ("CUDA GPUs (tensor parallel + FSDP2)", "trainer=tp_fsdp_cpu"),
    "trainer=deepspeed_zero2": ("CUDA GPUs and deepspeed", None),
    "trainer=deepspeed_zero3": ("CUDA GPUs and deepspeed", None),
    "engine=fast_gpu": ("a CUDA GPU (FlexAttention + torch.compile)", "engine=packed"),
    "experiment=qlora": ("a CUDA GPU and bitsandbytes (4-bit weights)", None),
    "launcher=slurm": ("a SLURM cluster", None),
    "pipeline=paper": ("a GPU and the hub (gpt2-large, IMDb, siebert)", None),
    "export.push_to_hub=true": ("the hub (the upload after the export)", "export.push_to_hub=false"),
}
#: Needs met by the hub alone: the command composes and passes every pre-model check here (the
#: upload itself fails offline in one line, after the export: test_model_card).
HUB_ONLY = {"the hub (the upload after the export)"}


def needs(cmd: Command) -> list[tuple[str, str | None]]:
    """(what this machine lacks, the CPU stand-in argument or None) for each such need."""
    args = cmd.argv
    found = [HARDWARE[a] for a in args if a in HARDWARE]
    if _option(args, "--shape") == "llama-1b":
        found.append(("a GPU (a 1B model in bf16)", None))
    if cmd.program == "torchrun":
        found.append(("several nodes (torchrun --nnodes N)", None))
    bench = cmd.program == "python -m dpo_lightning" and "dpo_lightning.bench" in args
    engines = _option(args, "--engines") or "dpo_lightning,trl"
    if bench and "trl" in engines.split(",") and importlib.util.find_spec("trl") is None:
        found.append(("TRL (pip install -e '.[bench]'), not installed here", "--engines dpo_lightning"))
    return found


def _option(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args and args.index(name) + 1 < len(args) else None


@dataclass
class StandIns:
    """Local files for what the commands name (hub models, data files), made once per session."""

    root: Path
    model: Path
    files: dict[str, Path] = field(default_factory=dict)
    #: model=tiny's architecture and tokenizer (what a default SFT run exports).
    tiny_model: Path | None = None
    #: a stage=reward_model export (a sequence classifier).
    reward_model: Path | None = None

    def data(self, value: str) -> str:
        name = Path(value).name
        if name in self.files:
            return str(self.files[name])
        raise KeyError(f"no stand-in for data.path={value!r}: add one to test_commands.py's stand fixture")

    def model_path(self, value: str, workdir: Path, default_policy: bool = False) -> str:
        """A path the commands make (kept, under the work dir), else the stand-in model
        (``default_policy``: a reference next to model=tiny gets model=tiny's tokenizer)."""
        if Path(value).is_dir():  # a stand-in already
            return value
        if value.startswith("/tmp/"):  # made by an earlier command (dpo-train ... hydra.run.dir=/tmp/sft)
            return str(workdir / value.lstrip("/"))
        if value.startswith("runs/") and (workdir / value).is_dir():  # made by an earlier command
            return value
        return str(self.tiny_model if default_policy and self.tiny_model else self.model)


def rewrite(cmd: Command, stand: StandIns, workdir: Path) -> list[str]:
    """The command's arguments with stand-ins, paths under ``workdir`` and tiny step counts."""
    out = []
    presets = {p.stem for p in (REPO / "conf" / "data").glob("*.yaml")} - {"sentiment", "file", "text"}
    for arg in cmd.argv[_program_len(cmd) :]:
        arg = arg.replace("{model}", str(stand.model)).replace("{pairs}", str(stand.files["pairs.jsonl"]))
        arg = arg.replace("{reward_model}", str(stand.reward_model))
        arg = re.sub(r"trainer\.max_steps=\d+", f"trainer.max_steps={STEPS}", arg)
        arg = re.sub(r"step\d+\.ckpt", f"step{STEPS}.ckpt", arg)
        arg = re.sub(r"every_n_train_steps=\d+", "every_n_train_steps=1", arg)
        if out and out[-1] == "--model" and not Path(arg).is_dir():  # the benchmark's local model
            arg = str(stand.model)
        key, _, value = arg.partition("=")
        if key == "model.name_or_path":
            arg = f"{key}={stand.model_path(value, workdir)}"
        elif key == "reference.name_or_path":  # it must share the policy's tokenizer
            policy = next((a.split("=", 1)[1] for a in out if a.startswith("model.name_or_path=")), None)
            arg = f"{key}={policy or stand.model_path(value, workdir, default_policy=True)}"
        elif key == "online.reward.path" and not Path(value).is_dir():
            arg = f"{key}={stand.reward_model}"
        elif key == "data.path":
            arg = f"{key}={stand.data(value)}"
        elif key == "hydra.run.dir" and value.startswith("/"):
            arg = f"{key}={workdir / value.lstrip('/')}"
        elif key in ("dpo.extra", "sft.extra"):
            arg = f"{key}={_tiny_stage(yaml.safe_load(value))}"
        if value in TORCHRUN:
            arg = f"{key}={TORCHRUN[value]}"
        out.append(TORCHRUN.get(arg, arg))
    data = [a.split("=", 1)[1] for a in out if a.startswith("data=")]
    if data and data[0] in presets and not any(a.startswith("data.path=") for a in out):
        out.append(f"data.path={REPO / 'tests' / 'fixtures' / f'{data[0]}.jsonl'}")  # the hub set, locally
    if "data.streaming=true" in out and not any(a.startswith("data.streaming_val_rows=") for a in out):
        out.append("data.streaming_val_rows=8")  # the fixtures stand in for the hub with 24 rows
    return out


def _program_len(cmd: Command) -> int:
    return 3 if cmd.argv[:2] == ["python", "-m"] else 1


STAGE_TINY = [
    f"trainer.max_steps={STEPS}",
    f"trainer.val_check_interval={STEPS}",
    "trainer.limit_val_batches=1",
]


def _tiny_stage(extra: list[str] | None) -> str:
    """A ``dpo-sentiment`` stage's extra overrides, with tiny step counts added."""
    kept = [e for e in extra or [] if not e.startswith(tuple(s.split("=")[0] for s in STAGE_TINY))]
    return "[" + ",".join(f'"{e}"' for e in [*kept, *STAGE_TINY]) + "]"
