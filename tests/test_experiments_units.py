"""Unit tests of the experiment plumbing: metrics, snapshots (save, lookup, resume state, official layout)."""

from __future__ import annotations

import ast
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from engine.metrics import confusion_counts, dice_iou
from engine.snapshots import latest_snapshot, list_snapshots, load_snapshot, save_snapshot
from models import load_model_weights
from utils import capture_rng_state, restore_rng_state, set_seed

REPO = Path(__file__).resolve().parent.parent


class TestMetrics:
    def test_known_values(self):
        pred = np.zeros((2, 4, 4), dtype=np.uint8)
        gt = np.zeros((2, 4, 4), dtype=np.uint8)
        pred[0, :2, :2] = 1  # 4 pixels
        gt[0, :2, :] = 1  # 8 pixels, 4 shared
        assert confusion_counts(pred, gt) == (4, 0, 4)
        dice, iou = dice_iou(pred, gt)
        assert dice == pytest.approx(2 * 4 / (2 * 4 + 0 + 4))
        assert iou == pytest.approx(4 / 8)

    def test_empty_vs_empty_is_one(self):
        empty = np.zeros((3, 5, 5), dtype=bool)
        assert dice_iou(empty, empty) == (1.0, 1.0)

    def test_empty_prediction_vs_nonempty_is_zero(self):
        gt = np.zeros((5, 5), dtype=np.uint8)
        gt[2, 2] = 1
        assert dice_iou(np.zeros_like(gt), gt) == (0.0, 0.0)
        assert dice_iou(gt, np.zeros_like(gt)) == (0.0, 0.0)

    def test_tensor_input(self):
        mask = torch.tensor([[0, 1], [1, 1]])
        assert dice_iou(mask, mask) == (1.0, 1.0)

    def test_bad_input(self):
        with pytest.raises(ValueError, match="same shape"):
            dice_iou(np.zeros((2, 2)), np.zeros((2, 3)))
        with pytest.raises(ValueError, match="binary"):
            dice_iou(np.full((2, 2), 2), np.zeros((2, 2)))


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


def _fake_results(path, fold, liver, rk, config_setting=1):
    path.parent.mkdir(parents=True, exist_ok=True)
    classes = {
        "LIVER": {
            "label": 1,
            "dice": {"3": liver},
            "iou": {"3": liver / 2},
            "mean_dice": liver,
            "mean_iou": 0.0,
        },
        "RK": {"label": 2, "dice": {"3": rk}, "iou": {"3": rk / 2}, "mean_dice": rk, "mean_iou": 0.0},
    }
    results = {
        "dataset": "CHAOST2",
        "eval_fold": fold,
        "classes": classes,
        "mean_dice": (liver + rk) / 2,
        "mean_iou": 0.0,
        "config": {"setting": config_setting},
    }
    path.write_text(json.dumps(results))
    return path


def _sacred_run(folder: Path, status: str, start: str, fold: int) -> Path:
    """A Sacred run folder as FileStorageObserver leaves it: run.json (status, start time), config.json."""
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"status": status, "start_time": start}))
    (folder / "config.json").write_text(json.dumps({"eval_fold": fold}))
    return folder


def _summarize(*args: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "script" / "summarize.py"), *map(str, args)],
        capture_output=True,
        text=True,
    )


class TestSummarize:
    def test_two_folds_give_the_expected_table(self, tmp_path):
        root = tmp_path / "CHAOST2_setting1"
        _fake_results(root / "fold0" / "test" / "1" / "results.json", 0, 0.80, 0.60)
        _fake_results(root / "fold1" / "test" / "1" / "results.json", 1, 0.70, 0.90)
        done = _summarize(root)
        assert done.returncode == 0, done.stderr
        expected_md = (
            "**CHAOST2, setting 1** (Dice %, mean ± std over 2 fold(s))\n\n"
            "| fold | LIVER | RK | mean | evaluation |\n"
            "|---|---:|---:|---:|---|\n"
            "| 0 | 80.00 | 60.00 | 70.00 | fold0/test/1 |\n"
            "| 1 | 70.00 | 90.00 | 80.00 | fold1/test/1 |\n"
            "| **mean ± std** | 75.00 ± 5.00 | 75.00 ± 15.00 | 75.00 ± 5.00 |  |\n"
        )
        assert done.stdout == expected_md
        assert (root / "summary.md").read_text() == expected_md
        expected_csv = (
            "fold,LIVER,RK,mean,evaluation,warning\n"
            "0,80.000000,60.000000,70.000000,fold0/test/1,\n"
            "1,70.000000,90.000000,80.000000,fold1/test/1,\n"
            "mean,75.000000,75.000000,75.000000,,\n"
            "std,5.000000,15.000000,5.000000,,\n"
        )
        assert (root / "summary.csv").read_text() == expected_csv

    def test_final_validation_beside_the_test_dice(self, tmp_path):
        root = tmp_path / "CHAOST2_setting1"
        for fold, liver in ((0, 0.8), (1, 0.7)):
            test_run = _sacred_run(
                root / f"fold{fold}" / "test" / "1", "COMPLETED", "2026-01-01T10:00:00", fold
            )
            _fake_results(test_run / "results.json", fold, liver, 0.5)
        # Fold 0 trained in two runs (interrupted, resumed): the last validation is the resumed run's.
        for run_id, steps, liver in (("1", [2000, 4000], [0.1, 0.3]), ("2", [6000], [0.42])):
            train = _sacred_run(root / "fold0" / "train" / run_id, "COMPLETED", "2026-01-01T09:00:00", 0)
            metrics = {
                "total": {"steps": steps, "values": [1.0] * len(steps)},
                "val_dice_LIVER": {"steps": steps, "values": liver},
                "val_dice_SPLEEN": {"steps": steps, "values": [0.01] * len(steps)},
                "val_dice_mean": {"steps": steps, "values": [(v + 0.01) / 2 for v in liver]},
            }
            (train / "metrics.json").write_text(json.dumps(metrics))
        done = _summarize(root)
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert (
            lines[2]
            == "| fold | LIVER | RK | mean | val LIVER | val SPLEEN | val mean | val step | evaluation |"
        )
        assert lines[4] == "| 0 | 80.00 | 50.00 | 65.00 | 42.00 | 1.00 | 21.50 | 6000 | fold0/test/1 |"
        assert lines[5] == "| 1 | 70.00 | 50.00 | 60.00 | – | – | – | – | fold1/test/1 |"
        assert "monitoring only" in done.stdout
        csv_rows = (root / "summary.csv").read_text().splitlines()
        assert (
            csv_rows[1] == "0,80.000000,50.000000,65.000000,42.000000,1.000000,21.500000,6000,fold0/test/1,"
        )

    def test_duplicate_explicit_fold_is_an_error(self, tmp_path):
        a = _fake_results(tmp_path / "a" / "results.json", 0, 0.8, 0.6)
        b = _fake_results(tmp_path / "b" / "results.json", 0, 0.7, 0.9)
        done = _summarize(a, b)
        assert done.returncode != 0 and "several results.json" in done.stderr


class TestConfig:
    """The Sacred config: named configs, unknown keys, every key read, failures before training."""

    @staticmethod
    def _config(named=(), **updates):
        from config import ex

        return ex.run("print_run_root", named_configs=list(named), config_updates=updates).config

    def test_named_configs(self):
        assert self._config()["test_label"] == [1, 2, 3, 4] and self._config()["exclude_label"] is None
        ct = self._config(["abd_ct", "setting2"])
        assert (
            ct["dataset"] == "SABS"
            and ct["test_label"] == [1, 2, 3, 6]
            and ct["exclude_label"] == [1, 2, 3, 6]
        )
        assert ct["exp_str"] == "SABS_setting2"
        assert self._config(["cmr"])["n_sv"] == 1000
        official = self._config(["abd_mri", "official_script"])
        assert (official["seed"], official["lr_step_gamma"], official["n_steps"]) == (2025, 0.9, 40000)
        assert (official["save_snapshot_every"], official["max_iters_per_load"], official["supp_idx"]) == (
            10000,
            10000,
            2,
        )
        debug = self._config(["debug"])
        assert debug["pretrained_weights"] is None and debug["num_workers"] == 0 and debug["image_size"] == 64

    @pytest.mark.parametrize(
        "updates", [{"lrr": 0.1}, {"path": {"log_dri": "x"}}, {"optim": {"learning_rate": 1}}]
    )
    def test_mistyped_key_fails(self, updates):
        with pytest.raises(ValueError, match="unknown config key"):
            self._config(**updates)

    def test_every_key_is_read(self):
        """Each top-level key is read as ``cfg["key"]`` (or is a function parameter) in train.py, test.py or
        config.py (run folders, file checks, print_run_root), the value check not counted."""
        from config import base_config_keys

        read = {"n_way"}  # the official key whose only use is the check that it is 1 (DIFD is 1-way)
        for script in ("train.py", "test.py", "config.py"):
            source = (REPO / script).read_text()
            if script == "config.py":  # check_values reads every key: only what is outside it counts
                start = source.index("def check_values(")
                source = source[:start] + source[source.index("\ndef ", start + 1) :]
            tree = ast.parse(source)
            for node in ast.walk(tree):
                if isinstance(node, ast.FunctionDef):
                    read |= {arg.arg for arg in node.args.args}
            read |= {
                n.slice.value
                for n in ast.walk(tree)
                if isinstance(n, ast.Subscript)
                and isinstance(n.slice, ast.Constant)
                and isinstance(n.slice.value, str)
            }
        top_level = {key.split(".")[0] for key in base_config_keys()}
        assert top_level - read == set()
        assert {"validate_every", "validate_cases", "validate_labels", "allow_cross_eval"} <= top_level

    def test_failures_before_training(self, tmp_path):
        import train  # registers the 'train' command on the shared experiment

        common = {"path": {"log_dir": str(tmp_path)}, "data_root": str(tmp_path / "no_data")}
        with pytest.raises(FileNotFoundError, match="pretrained checkpoint.*deeplabv3_resnet101_coco"):
            train.ex.run(
                "train",
                named_configs=["debug"],
                config_updates={**common, "pretrained_weights": "deeplabv3", "pretrained_path": None},
            )
        with pytest.raises(FileNotFoundError, match="pretrained checkpoint"):
            train.ex.run(
                "train",
                named_configs=["debug"],
                config_updates={
                    **common,
                    "pretrained_weights": "resnet101",
                    "pretrained_path": str(tmp_path / "x"),
                },
            )
        with pytest.raises(FileNotFoundError, match="data_root"):
            train.ex.run("train", named_configs=["debug"], config_updates=common)
        with pytest.raises(ValueError, match="setting2"):
            train.ex.run("train", named_configs=["debug"], config_updates={**common, "exclude_label": [1]})
        with pytest.raises(ValueError, match="mode='test'"):
            train.ex.run("train", named_configs=["debug"], config_updates={**common, "mode": "test"})
        assert sorted(p.name for p in tmp_path.iterdir()) == [], "no run folder before the checks pass"

    def test_defaults_of_the_validation_keys(self):
        base, official, debug = self._config(), self._config(["official_script"]), self._config(["debug"])
        assert (base["validate_every"], base["validate_cases"], base["validate_labels"]) == (0, 2, None)
        assert official["validate_every"] == 2000 and debug["validate_every"] == 0
        assert base["allow_cross_eval"] is False
