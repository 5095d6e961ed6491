"""Every ``conf/data`` preset trains a few steps from its local fixture through the real CLI."""

from __future__ import annotations

import json

import pytest

from tests.conftest import CONF_DIR, run_cli
from tests.test_data_module import BAD, BAD_LINES, FIXTURES

PRESETS = [
    "hh_rlhf",
    "ultrafeedback_binarized",
    "ultrafeedback",
    "shp",
    "tldr",
    "imdb",
    "when2call",
    "kto_mix",
]
# What a preset needs besides itself: unpaired rows train with an unpaired loss.
PRESET_ARGS = {"kto_mix": ["loss=kto"]}
SMALL = [
    "debug=fast",
    "trainer.max_steps=2",
    "data.max_length=128",
    "data.max_prompt_length=96",
    "data.batch_size=4",
    "data.eval_batch_size=4",
]


def test_every_preset_has_a_fixture():
    # sentiment (generated), file (any path), text (plain text for stage=sft, tested in
    # test_sft.py) and the prompt-only prompts / sentiment_prompts (stage=online_dpo, tested in
    # test_online_cli.py on fixtures/prompts.jsonl) are not public preference sets
    other = {"sentiment", "file", "text", "prompts", "sentiment_prompts"}
    presets = {p.stem for p in (CONF_DIR / "data").glob("*.yaml")} - other
    assert presets == set(PRESETS)
    assert all((FIXTURES / f"{p}.jsonl").exists() for p in PRESETS)


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_preset_trains_from_its_fixture(preset, tmp_path):
    fixture = FIXTURES / f"{preset}.jsonl"
    run_cli(
        [
            f"data={preset}",
            f"data.path={fixture}",
            *PRESET_ARGS.get(preset, []),
            *SMALL,
            f"data.cache_dir={tmp_path}/cache",
            f"hydra.run.dir={tmp_path}/run",
        ],
        tmp_path,
    )
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    report = summary["data"][str(fixture)]
    assert summary["steps"] == 2 and summary["rows_dropped"] == 0
    assert report["rows_in"] == 24 and report["rows_kept"] == 24


@pytest.mark.slow
def test_bad_file_with_skip_trains_and_lists_every_kind(tmp_path):
    proc = run_cli(
        [
            "data=file",
            f"data.path={BAD}",
            "data.format={_target_:dpo_lightning.data.ranked.RankedFormat,chat:true}",
            "data.on_invalid=skip",
            *SMALL,
            "data.max_length=256",
            "data.max_prompt_length=null",
            f"data.cache_dir={tmp_path}/cache",
            f"hydra.run.dir={tmp_path}/run",
        ],
        tmp_path,
    )
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["rows_dropped"] == len(BAD_LINES)
    assert summary["data"][str(BAD)]["dropped"] == dict.fromkeys(BAD_LINES, 1)
    log = proc.stdout + proc.stderr
    assert all(f"'{kind}': 1" in log for kind in BAD_LINES)
