"""The model card written into every ``hf_model/`` export (``README.md``, YAML front matter).

Built with ``huggingface_hub``'s :class:`~huggingface_hub.ModelCard` API, so the hub reads its
metadata. The front matter holds the hub's own keys where the values are hub ids (``base_model``,
``datasets``: a local path there would make the hub refuse the card) and, under
``dpo_lightning``, everything about the run whatever its sources: base model and reference, data,
stage, loss and β, steps, the final train / validation metrics and the command that produced it.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData
from omegaconf import DictConfig, OmegaConf

#: ``name`` or ``org/name``, and not a path that exists here.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

{{ summary }}

## Training

| | |
|---|---|
| stage | `{{ stage }}` |
| base model | `{{ base_model }}` |
| reference | `{{ reference }}` |
| data | `{{ data }}` |
| loss | `{{ loss }}`{% if beta is not none %} (β = {{ beta }}){% endif %} |
| optimizer steps | {{ steps }} |

Produced by:

```bash
{{ command }}
```

## Final metrics

| metric | train | validation |
|---|---|---|
{% for key in metric_keys -%}
| `{{ key }}` | {{ train.get(key, "") }} | {{ val.get(key, "") }} |
{% endfor %}
## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{{ where }}")
tokenizer = AutoTokenizer.from_pretrained("{{ where }}")
```
"""


def is_hub_id(name: str | None) -> bool:
    return bool(name) and HUB_ID.match(str(name)) is not None and not Path(str(name)).expanduser().exists()


def job_command(prog: str = "dpo-train") -> str:
    """The command line of this job: ``prog`` and its Hydra overrides (a sweep job's own values)."""
    from hydra.core.hydra_config import HydraConfig

    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    return " ".join([prog, *(shlex.quote(o) for o in overrides)])


def _target_name(node: Any) -> str | None:
    target = node.get("_target_") if isinstance(node, DictConfig) else None
    return None if target is None else str(target).rsplit(".", 1)[-1]


def run_facts(cfg: DictConfig, summary: dict[str, Any]) -> dict[str, Any]:
    """What the card says about the run, from the composed config and ``summary.json``'s content."""
    model, data = cfg.model, cfg.data
    base = model.get("name_or_path") or f"built from config ({model.config.model_type}, random init)"
    reference = cfg.get("reference")
    ref_source = reference.get("name_or_path") if isinstance(reference, DictConfig) else None
    uses_loss = "loss" in cfg.stage.module  # the DPO stage; SFT / reward model have their own
    loss = cfg.get("loss") if uses_loss else None
    data_source = data.get("path") or _target_name(data.get("generator")) or "generator"
    return {
        "stage": _target_name(cfg.stage.module),
        "base_model": str(base),
        "reference": str(ref_source or (_target_name(reference) if uses_loss else "none")),
        "data": str(data_source),
        "loss": _target_name(loss) if loss is not None else None,
        "beta": loss.get("beta") if loss is not None else None,
        "steps": summary.get("steps"),
        "metrics": {k: summary.get(k, {}) for k in ("train", "val")},
        "command": job_command(),
    }


def build_model_card(cfg: DictConfig, summary: dict[str, Any], repo_id: str | None = None) -> ModelCard:
    """The card of one run's export (``repo_id``: where it will be pushed, for the usage snippet)."""
    facts = run_facts(cfg, summary)
    base = cfg.model.get("name_or_path")
    card_data = ModelCardData(
        base_model=base if is_hub_id(base) else None,
        datasets=[facts["data"]] if is_hub_id(cfg.data.get("path")) else None,
        library_name="transformers",
        tags=[t for t in ("dpo-lightning", facts["stage"], facts["loss"]) if t],
        dpo_lightning=OmegaConf.to_container(OmegaConf.create(facts), resolve=True),
    )
    metric_keys = sorted(set(facts["metrics"]["train"]) | set(facts["metrics"]["val"]))
    rounded = {k: {m: _fmt(v) for m, v in d.items()} for k, d in facts["metrics"].items()}
    title = repo_id.split("/")[-1] if repo_id else "dpo_lightning export"
    summary_line = (
        f"Trained with dpo_lightning (stage `{facts['stage']}`) from "
        f"`{facts['base_model']}` for {facts['steps']} optimizer steps."
    )
    return ModelCard.from_template(
        card_data,
        template_str=TEMPLATE,
        title=title,
        summary=summary_line,
        metric_keys=metric_keys,
        train=rounded["train"],
        val=rounded["val"],
        where=repo_id or "path/to/hf_model",
        **{k: v for k, v in facts.items() if k != "metrics"},
    )


def write_model_card(export_dir: Path, cfg: DictConfig, summary: dict[str, Any]) -> Path:
    """``export_dir/README.md``; returns its path."""
    export = cfg.get("export") or {}
    card = build_model_card(cfg, summary, export.get("repo_id"))
    path = Path(export_dir) / "README.md"
    card.save(path)
    return path


def _fmt(value: Any) -> str:
    return "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)
