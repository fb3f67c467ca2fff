"""Checkpoint triggers: steps, wall time (decided at log steps), epoch ends and kept copies; atomic writes."""
import os
import time

import pytest
import torch

from util.checkpointer import Checkpointer, NonFiniteCheckpoint


def _checkpointer(tmp_path, **kw):
    saved = []

    def build_state(epoch, step_in_epoch, global_step):
        saved.append((epoch, step_in_epoch, global_step))
        return {"epoch": epoch, "global_step": global_step, "model": {"w": torch.ones(2)}}

    return Checkpointer(str(tmp_path), build_state, torch.device("cpu"), **kw), saved


def test_time_trigger_fires_only_at_log_steps_once_due(tmp_path):
    ck, saved = _checkpointer(tmp_path, save_every_minutes=0.5 / 60)  # due after half a second
    ck.after_step(0, 1, 1, is_log_step=True)
    assert saved == []  # not due yet
    time.sleep(0.6)
    ck.after_step(0, 2, 2, is_log_step=False)
    assert saved == []  # due, but only log steps decide (so every rank agrees on the same step)
    ck.after_step(0, 3, 3, is_log_step=True)
    assert saved == [(0, 3, 3)]
    ck.after_step(0, 4, 4, is_log_step=True)
    assert saved == [(0, 3, 3)]  # the clock restarted at the save
    assert torch.load(tmp_path / "checkpoint-latest.pth", weights_only=True)["global_step"] == 3


def test_step_and_epoch_triggers_and_kept_copies(tmp_path):
    ck, saved = _checkpointer(tmp_path, save_every_steps=2, save_per_epochs=2)
    for step in range(1, 5):
        ck.after_step(0, step, step, is_log_step=False)
    assert [s[2] for s in saved] == [2, 4]
    ck.end_of_epoch(0, 3, 4)   # epoch 1 of 3: latest only
    ck.end_of_epoch(1, 3, 8)   # epoch 2: kept copy (every 2)
    ck.end_of_epoch(2, 3, 12)  # last epoch: kept copy
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2.pth", "checkpoint-3.pth", "checkpoint-latest.pth"]  # epochs from 1
    assert torch.load(tmp_path / "checkpoint-latest.pth", weights_only=True)["epoch"] == 3


def test_no_checkpoint_after_a_nonfinite_step(tmp_path):
    ck, saved = _checkpointer(tmp_path, save_every_steps=1)
    ck.after_step(0, 1, 1, is_log_step=False)
    ck.nonfinite |= torch.tensor(True)
    with pytest.raises(NonFiniteCheckpoint, match="non-finite"):
        ck.after_step(0, 2, 2, is_log_step=False)
    assert saved == [(0, 1, 1)]
    assert torch.load(tmp_path / "checkpoint-latest.pth", weights_only=True)["global_step"] == 1
