"""Every ``hf_model/`` export carries a model card; ``export.push_to_hub`` uploads it (tested up to
the network call: offline the push fails in one line after the export is complete)."""

from __future__ import annotations

import json

import pytest
from huggingface_hub import HfApi, ModelCard

from dpo_lightning.reporting.hub import PushError, push_export
from dpo_lightning.reporting.model_card import build_model_card
from tests.conftest import compose, run_cli

SUMMARY = {"steps": 7, "train": {"loss": 0.61, "rewards/accuracies": 0.75}, "val": {"loss": 0.64}}


def card_for(overrides, tmp_path, summary=SUMMARY, repo_id=None):
    cfg = compose(overrides, tmp_path)
    return build_model_card(cfg, summary, repo_id).data.to_dict()


def test_card_front_matter_names_base_model_data_loss_beta_steps_metrics_and_command(tmp_path):
    meta = card_for(
        ["model=hf", "model.name_or_path=Qwen/Qwen2.5-0.5B", "data=hh_rlhf", "loss.beta=0.25"], tmp_path
    )
    run = meta["dpo_lightning"]
    assert meta["base_model"] == "Qwen/Qwen2.5-0.5B" and meta["datasets"] == ["Anthropic/hh-rlhf"]
    assert run["base_model"] == "Qwen/Qwen2.5-0.5B" and run["data"] == "Anthropic/hh-rlhf"
    assert (run["loss"], run["beta"], run["steps"]) == ("DPOLoss", 0.25, 7)
    assert run["metrics"] == {"train": SUMMARY["train"], "val": SUMMARY["val"]}
    assert run["command"].startswith("dpo-train ") and "loss.beta=0.25" in run["command"]
    assert "dpo-lightning" in meta["tags"] and "DPOLoss" in meta["tags"]


def test_local_sources_stay_out_of_the_hub_keys(tmp_path):
    folder = tmp_path / "sft"
    folder.mkdir()
    meta = card_for(["model=hf", f"model.name_or_path={folder}", "loss=ipo"], tmp_path)
    assert "base_model" not in meta and "datasets" not in meta  # the hub refuses paths there
    assert meta["dpo_lightning"]["base_model"] == str(folder)
    assert meta["dpo_lightning"]["loss"] == "IPOLoss"
    sft = card_for(["stage=sft"], tmp_path)["dpo_lightning"]
    assert sft["stage"] == "SFTModule" and sft["loss"] is None and sft["beta"] is None
    assert sft["reference"] == "none"


def test_push_uploads_the_complete_export_private_by_default(tmp_path, monkeypatch):
    export = tmp_path / "hf_model"
    export.mkdir()
    (export / "README.md").write_text("card")
    (export / "model.safetensors").write_bytes(b"w")
    calls = {}

    def create_repo(self, repo_id, private=None, exist_ok=False, repo_type=None, **kw):
        calls["create"] = (repo_id, private, exist_ok, repo_type)

    def upload_folder(self, repo_id, folder_path, revision=None, commit_message=None, **kw):
        calls["upload"] = (repo_id, folder_path, revision, sorted(p.name for p in export.iterdir()))
        return "https://huggingface.co/me/tiny/commit/abc"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    url = push_export(export, "me/tiny")
    assert url.endswith("/commit/abc")
    assert calls["create"] == ("me/tiny", True, True, "model")
    assert calls["upload"] == ("me/tiny", str(export), None, ["README.md", "model.safetensors"])

    def refused(self, *args, **kwargs):
        raise OSError("401 Client Error: Unauthorized\nmore detail")

    monkeypatch.setattr(HfApi, "create_repo", refused)
    with pytest.raises(PushError, match=r"could not push .*Unauthorized.*hf upload me/tiny") as err:
        push_export(export, "me/tiny")
    assert "\n" not in str(err.value)


def test_cli_offline_push_fails_in_one_line_after_a_complete_export(tmp_path):
    run = tmp_path / "run"
    proc = run_cli(
        ["debug=fast", "export.push_to_hub=true", "export.repo_id=me/tiny-dpo", f"hydra.run.dir={run}"],
        tmp_path,
        check=False,
        env={"HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("dpo-train: error:")]
    assert len(errors) == 1 and "offline mode is enabled" in errors[0] and str(run / "hf_model") in errors[0]
    summary = json.loads((run / "summary.json").read_text())
    export = run / "hf_model"
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in export.iterdir()
    }
    card = ModelCard.load(export / "README.md")
    run_meta = card.data.to_dict()["dpo_lightning"]
    assert run_meta["steps"] == summary["steps"] == 3
    assert run_meta["metrics"]["val"]["loss"] == pytest.approx(summary["val"]["loss"])
    assert run_meta["command"] == "dpo-train debug=fast export.push_to_hub=true export.repo_id=me/tiny-dpo"
    assert 'from_pretrained("me/tiny-dpo")' in card.text


def test_push_without_a_repo_id_is_refused_before_training(tmp_path):
    proc = run_cli(
        ["debug=fast", "export.push_to_hub=true", f"hydra.run.dir={tmp_path / 'r'}"], tmp_path, check=False
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "dpo-train: error: export.push_to_hub=true needs export.repo_id=<user or org>/<name>"
    )
    assert not (tmp_path / "r" / "csv").exists()  # nothing trained
