"""Config-only refusals found by trying the merged features as a hostile user: each is one line,
exit 2, before the tokenizer or the model (``train()`` in-process, no traceback)."""

from __future__ import annotations

import pytest

from tests.test_errors import _assert_before_training, _error
from tests.test_streaming import write_shards


@pytest.fixture
def shards(tmp_path):
    folder = tmp_path / "shards"
    write_shards(folder)
    return folder


def test_streaming_with_a_precomputed_reference_is_refused(tmp_path, capsys, shards):
    args = ["data=file", f"data.path={shards}", "data.streaming=true", "reference=precomputed"]
    line = _error(args, tmp_path, capsys)
    assert "reads the whole data set before training: not with data.streaming=true" in line
    _assert_before_training(tmp_path)


def test_streaming_without_max_steps_is_refused(tmp_path, capsys, shards):
    args = [
        "data=file",
        f"data.path={shards}",
        "data.streaming=true",
        "trainer.max_steps=-1",
        "trainer.max_epochs=1",
    ]
    line = _error(args, tmp_path, capsys)
    assert "trainer.max_steps=-1: must be an integer ≥ 1 with data.streaming=true" in line


def test_streaming_an_empty_folder_names_the_path(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    line = _error(["data=file", f"data.path={tmp_path / 'empty'}", "data.streaming=true"], tmp_path, capsys)
    assert f"{tmp_path / 'empty'}" in line


@pytest.mark.parametrize(
    ("override", "says"),
    [
        (
            "preemption.signals=[SIGKILL]",
            "preemption.signals=['SIGKILL']: must be signals a process can catch",
        ),
        ("preemption.signals=null", "preemption.signals=None: must be a list of signal names"),
        ("preemption.signals=SIGUSR1", "preemption.signals='SIGUSR1': must be a list of signal names"),
    ],
)
def test_bad_preemption_values_are_one_line(tmp_path, capsys, override, says):
    assert says in _error([override, "preemption.requeue_on=[]"], tmp_path, capsys)
    _assert_before_training(tmp_path)


@pytest.mark.parametrize("key", ["data.foo", "engine.chunksize", "model.foo"])
def test_an_added_key_no_class_takes_is_one_line(tmp_path, capsys, key):
    line = _error([f"+{key}=1"], tmp_path, capsys)
    assert f"{key}: not a setting of {key.split('.')[0]}; remove it" in line
