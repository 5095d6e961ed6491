"""Unit tests: resumable loader, atomic checkpoint writes, RNG state, non-finite guard, metrics."""

from __future__ import annotations

import errno
import random

import lightning as L
import numpy as np
import pytest
import torch

from dpo_lightning.data.resumable import ResumableDataLoader, ResumableSampler
from dpo_lightning.run.checkpointing import (
    AtomicCheckpointIO,
    CheckpointWriteError,
    rng_states,
    set_rng_states,
)
from dpo_lightning.run.errors import UserError
from dpo_lightning.run.guards import NonFiniteError, NonFiniteGuard, first_nonfinite
from dpo_lightning.run.integrity import problem
from dpo_lightning.run.resume import config_diff


# -- resumable loader ---------------------------------------------------------------------------
def _loader(n: int = 23, batch_size: int = 4, seed: int = 3) -> ResumableDataLoader:
    return ResumableDataLoader(list(range(n)), ResumableSampler(range(n), batch_size, seed=seed))


@pytest.mark.parametrize("epoch,consumed", [(0, 2), (1, 3), (1, 0), (0, 5)])
def test_resumed_loader_yields_exactly_the_remaining_batches(epoch, consumed):
    full = _loader()
    full.sampler.set_epoch(epoch)
    expected = [b.tolist() for b in full]
    assert sorted(i for batch in expected for i in batch) == list(range(23))  # a permutation, every row once

    interrupted = _loader()
    interrupted.sampler.set_epoch(epoch)
    it = iter(interrupted)
    seen = [next(it).tolist() for _ in range(consumed)]
    state = interrupted.state_dict()
    assert state == {"epoch": epoch, "batches": consumed}

    resumed = _loader()  # a fresh process: new loader, state from the checkpoint
    resumed.load_state_dict(state)
    rest = [b.tolist() for b in resumed]
    assert seen + rest == expected
    assert resumed.state_dict() == {"epoch": epoch + 1, "batches": 0}  # epoch finished
    assert len(resumed) == 6  # the full epoch, so Lightning's counters keep their meaning


def test_loader_order_depends_on_epoch_and_seed():
    a, b, c = _loader(), _loader(), _loader(seed=4)
    b.sampler.set_epoch(1)
    first = [x.tolist() for x in a]
    assert first != [x.tolist() for x in b]
    assert first != [x.tolist() for x in c]
    assert first == [x.tolist() for x in _loader()]


# -- atomic writes ------------------------------------------------------------------------------
def test_atomic_write_and_weights_only_load(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "ckpt" / "a.ckpt"
    io.save_checkpoint({"w": torch.arange(3), "step": 1}, path)
    loaded = io.load_checkpoint(path)
    assert torch.equal(loaded["w"], torch.arange(3)) and loaded["step"] == 1
    # no temp file left; the digest record beside it
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.ckpt", "a.ckpt.sha256.json"]


def test_weights_only_load_refuses_pickled_code(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"obj": random.Random(0)}, path)  # an arbitrary class instance
    with pytest.raises(Exception, match=r"[Ww]eights only"):
        AtomicCheckpointIO().load_checkpoint(path)


def test_disk_full_mid_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 4, "w": torch.ones(2)}, path)

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"partial bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointWriteError, match=r"disk full.*previous checkpoints kept: \['last.ckpt'\]"):
        io.save_checkpoint({"step": 8, "w": torch.zeros(2)}, path)
    monkeypatch.undo()
    assert io.load_checkpoint(path)["step"] == 4  # the old file, intact
    # temp file removed; the digest record still describes the old file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "last.ckpt.sha256.json"]
    assert problem(path) is None


# -- RNG state ----------------------------------------------------------------------------------
def test_rng_states_round_trip_through_weights_only_save(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    path = tmp_path / "rng.pt"
    torch.save(rng_states(), path)
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    set_rng_states(torch.load(path, weights_only=True))
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_config_diff_names_changed_added_and_removed_keys():
    diff = config_diff({"a": 1, "b": 2, "c": 3}, {"a": 1, "b": 5, "d": 4})
    assert diff == ["b: 2 -> 5", "c: 3 -> '<unset>'", "d: '<unset>' -> 4"]


# -- non-finite guard ---------------------------------------------------------------------------
def test_first_nonfinite_finds_loss_then_gradients():
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.tensor([1.0, float("inf")])
    assert first_nonfinite(torch.tensor(float("nan")), [p]).startswith("loss")
    assert first_nonfinite(torch.tensor(0.5), [p]).startswith("gradient (parameter #0")
    p.grad = torch.zeros(2)
    assert first_nonfinite(torch.tensor(0.5), [p]) is None


class _Regression(L.LightningModule):
    """A linear model whose loss is NaN at the chosen steps (as a diverged batch would be)."""

    def __init__(self, nan_at: set[int]) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.nan_at = nan_at

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch["x"]).pow(2).mean()
        return loss * float("nan") if self.global_step in self.nan_at else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        data = [{"x": torch.ones(2), "pair_row_ids": torch.tensor(i)} for i in range(8)]
        return torch.utils.data.DataLoader(data, batch_size=2)


def _fit(module: L.LightningModule, guard: NonFiniteGuard, steps: int) -> None:
    L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        callbacks=[guard],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(module)


def test_skip_policy_skips_and_counts_nonfinite_steps():
    torch.manual_seed(0)
    module = _Regression(nan_at={1})
    reference = _Regression(nan_at=set())
    reference.load_state_dict(module.state_dict())
    guard = NonFiniteGuard("skip")
    _fit(module, guard, steps=3)
    assert guard.skipped == 1
    assert all(torch.isfinite(p).all() for p in module.parameters())
    # Two real SGD steps happened (steps 0 and 2): the same as two clean steps.
    _fit(reference, NonFiniteGuard("skip"), steps=2)
    for a, b in zip(module.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_stop_policy_names_step_and_rows():
    guard = NonFiniteGuard("stop")
    with pytest.raises(NonFiniteError, match=r"non-finite loss .* at step 2 .*batch 1\), data rows \[2, 3\]"):
        _fit(_Regression(nan_at={1}), guard, steps=3)


def test_unknown_policy_is_rejected():
    with pytest.raises(UserError, match=r"train\.on_nonfinite must be one of"):
        NonFiniteGuard("ignore")


# -- metrics with an empty completion mask ------------------------------------------------------
def test_empty_completion_mask_gives_finite_metrics(tiny_model):
    from dpo_lightning.engine.logps import concatenated_forward

    ids = torch.randint(3, 50, (2, 6))
    labels = ids.clone()
    labels[0, 3:] = ids[0, 3:]
    labels[0, :3] = -100
    labels[1] = -100  # a completion truncated to nothing
    stats = concatenated_forward(tiny_model, ids, torch.ones_like(ids), labels)
    assert stats.lengths.tolist() == [3.0, 0.0]
    assert torch.isfinite(stats.logps).all() and torch.isfinite(stats.mean_logits).all()
    assert stats.logps[1] == 0 and stats.mean_logits[1] == 0


# -- metric history across a resume --------------------------------------------------------------
def test_metrics_history_keeps_rows_before_the_checkpoint(tmp_path, capsys):
    from lightning.pytorch.loggers import CSVLogger

    from dpo_lightning.run.resume import csv_histories

    killed = CSVLogger(tmp_path, name="csv", version="")
    for step in range(6):  # the killed run flushed steps 0..5; its checkpoint is after 4 steps
        killed.log_metrics({"train/loss": 1.0 / (step + 1)}, step=step)
    killed.log_metrics({"train/lr": 0.5}, step=4)
    killed.save()

    resumed = CSVLogger(tmp_path, name="csv", version="")
    (history,) = csv_histories([resumed], step=4)
    resumed.log_hyperparams({"a": 1})  # creates the writer, which deletes metrics.csv
    history.restore([resumed])
    resumed.log_metrics({"train/loss": 0.2}, step=4)
    resumed.save()
    text = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()
    assert text[0] == "step,train/loss"
    assert text[1:] == ["0,1.0", "1,0.5", "2,0.3333333333333333", "3,0.25", "4,0.2"]
    assert "lost in the crash" not in capsys.readouterr().out

    (gap,) = csv_histories([CSVLogger(tmp_path, name="csv", version="")], step=7)
    assert len(gap.rows) == 5 and "no rows for step 7 (lost in the crash)" in capsys.readouterr().out


def test_fast_forward_is_dropped_when_lightning_moves_to_the_next_epoch():
    # e.g. an epoch cut short by trainer.limit_train_batches: the resumed run starts epoch 1.
    loader = _loader()
    loader.load_state_dict({"epoch": 0, "batches": 3})
    loader.sampler.set_epoch(1)
    fresh = _loader()
    fresh.sampler.set_epoch(1)
    assert [b.tolist() for b in loader] == [b.tolist() for b in fresh]
    assert loader.state_dict() == {"epoch": 2, "batches": 0}
