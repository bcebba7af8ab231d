"""Snapshots: save, lookup, resume state, official layouts (engine.snapshots, models.weights)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from engine.snapshots import latest_snapshot, list_snapshots, load_snapshot, save_snapshot
from models import load_model_weights
from utils import capture_rng_state, restore_rng_state, set_seed


def _tiny_training_state():
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[2], gamma=0.5)
    return model, optimizer, scheduler


def _train_steps(model, optimizer, scheduler, n):
    losses = []
    for _ in range(n):
        # Consumes every global generator a training step may touch.
        x = torch.randn(5, 3) + float(np.random.rand()) + random.random()  # noqa: NPY002 (global state under test)
        loss = model(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    return losses


class TestSnapshots:
    def test_resume_reproduces_the_trajectory(self, tmp_path):
        set_seed(0)
        model, optimizer, scheduler = _tiny_training_state()
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        rng = capture_rng_state()
        reference = _train_steps(model, optimizer, scheduler, 4)

        model, optimizer, scheduler = _tiny_training_state()
        model.load_state_dict(initial)
        restore_rng_state(rng)
        first = _train_steps(model, optimizer, scheduler, 2)
        save_snapshot(
            tmp_path / "2.pth", step=2, model=model, optimizer=optimizer, scheduler=scheduler, config={"a": 1}
        )
        _train_steps(model, optimizer, scheduler, 3)  # state drifts away before the "crash"

        payload = load_snapshot(latest_snapshot(tmp_path))
        model, optimizer, scheduler = _tiny_training_state()
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        restore_rng_state(payload["rng"])
        assert payload["step"] == 2 and payload["config"] == {"a": 1}
        second = _train_steps(model, optimizer, scheduler, 2)
        assert first + second == reference

    def test_latest_is_by_step_not_by_name(self, tmp_path):
        for step in (2, 10, 9):
            (tmp_path / f"{step}.pth").write_bytes(b"")
        (tmp_path / "notes.txt").write_text("x")
        assert [s for s, _ in list_snapshots(tmp_path)] == [2, 9, 10]
        assert latest_snapshot(tmp_path).name == "10.pth"
        assert latest_snapshot(tmp_path / "missing") is None

    def test_save_leaves_no_temporary_file(self, tmp_path):
        model, optimizer, scheduler = _tiny_training_state()
        save_snapshot(
            tmp_path / "1.pth", step=1, model=model, optimizer=optimizer, scheduler=scheduler, config={}
        )
        assert sorted(p.name for p in tmp_path.iterdir()) == ["1.pth"]

    def test_official_layout_and_prefixed_state_dicts_load(self, tmp_path):
        model, _, _ = _tiny_training_state()
        torch.save(model.state_dict(), tmp_path / "official.pth")
        torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "ddp.pth")
        for name in ("official.pth", "ddp.pth"):
            fresh, _, _ = _tiny_training_state()
            load_model_weights(fresh, tmp_path / name)
            for key, value in model.state_dict().items():
                torch.testing.assert_close(fresh.state_dict()[key], value, rtol=0, atol=0)

    def test_bad_checkpoints(self, tmp_path):
        model, _, _ = _tiny_training_state()
        with pytest.raises(FileNotFoundError, match="reload_model_path"):
            load_model_weights(model, tmp_path / "missing.pth")
        torch.save([1, 2], tmp_path / "list.pth")
        with pytest.raises(ValueError, match="state_dict"):
            load_model_weights(model, tmp_path / "list.pth")
        torch.save({"0.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
        with pytest.raises(ValueError, match="cannot load"):
            load_model_weights(model, tmp_path / "wrong.pth")
        with pytest.raises(ValueError, match="not a snapshot of this project"):
            load_snapshot(tmp_path / "wrong.pth")
