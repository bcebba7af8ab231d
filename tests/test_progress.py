"""The picture of a run (engine.progress, ``script/plot_run.py``) from a saved Sacred ``metrics.json``
(the error cases are in tests/test_faults_runs.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from engine import progress
from engine.progress import merge_metrics, smooth, validation_table

REPO = Path(__file__).resolve().parent.parent


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _metrics_json(path: Path, steps: list[int], val_steps: list[int]) -> None:
    """A metrics.json in Sacred's layout (with timestamps), as train.py leaves it."""
    rng = np.random.default_rng(0)
    metrics = {}
    for name in ("query_nll", "query_boundary", "align_nll", "align_boundary", "total"):
        metrics[name] = {"steps": steps, "values": rng.uniform(0, 2, len(steps)).tolist()}
    metrics["lr"] = {"steps": steps, "values": [1e-3 if s <= 60 else 9e-4 for s in steps]}
    for name in ("LIVER", "SPLEEN", "mean"):
        metrics[f"val_dice_{name}"] = {
            "steps": val_steps,
            "values": rng.uniform(0, 1, len(val_steps)).tolist(),
        }
    for series in metrics.values():
        series["timestamps"] = ["2026-01-01T00:00:00"] * len(series["steps"])
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.json").write_text(json.dumps(metrics))


def test_plot_run_draws_a_saved_metrics_json(tmp_path: Path):
    first, resumed = tmp_path / "train" / "1", tmp_path / "train" / "2"
    _metrics_json(first, list(range(10, 110, 10)), [50, 100])
    _metrics_json(resumed, list(range(100, 160, 10)), [150])
    for runs, picture in (([first], first / "progress.png"), ([first, resumed], resumed / "progress.png")):
        done = subprocess.run(
            [sys.executable, str(REPO / "script" / "plot_run.py"), *map(str, runs)],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == str(picture)
        assert picture.read_bytes()[:8] == PNG_SIGNATURE
        image = cv2.imread(str(picture))
        assert image is not None and image.shape == (1300, 900, 3)  # 4 panels: losses, lr, label-free, organs
        assert not list(picture.parent.glob(".progress.png.tmp*")), "temporary file left behind"


def test_merge_and_smooth():
    merged = merge_metrics(
        [
            {"total": {"steps": [1, 2, 3], "values": [3.0, 2.0, 1.0]}},
            {"total": {"steps": [3, 4], "values": [1.5, 1.0]}, "lr": {"steps": [4], "values": [0.1]}},
        ]
    )
    assert merged == {
        "total": {"steps": [1, 2, 3, 4], "values": [3.0, 2.0, 1.5, 1.0]},
        "lr": {"steps": [4], "values": [0.1]},
    }
    assert smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # bias-corrected: no ramp from 0
    assert smooth([0.0, 10.0], weight=0.5) == pytest.approx([0.0, 10.0 * 0.5 / 0.75])


def test_validation_table():
    metrics = {
        "total": {"steps": [10, 20, 30], "values": [3.0, 2.0, 1.0]},
        "val_dice_LIVER": {"steps": [20, 30], "values": [0.5, 0.625]},
        "val_dice_SPLEEN": {"steps": [30], "values": [0.25]},
        "val_dice_mean": {"steps": [20, 30], "values": [0.5, 0.4375]},
    }
    lines = validation_table(metrics).splitlines()
    assert lines[0].split() == ["step", "LIVER", "SPLEEN", "mean", "loss"]
    assert lines[1].split() == ["20", "50.0", "-", "50.0", f"{smooth([3.0, 2.0])[-1]:.3f}"]
    assert lines[2].split() == ["30", "62.5", "25.0", "43.8", f"{smooth([3.0, 2.0, 1.0])[-1]:.3f}"]
    assert validation_table({"total": metrics["total"]}) == ""


def test_validation_table_leads_with_the_label_free_curve():
    metrics = {
        "total": {"steps": [10, 20], "values": [3.0, 2.0]},
        "lf_auc": {"steps": [10, 20], "values": [0.5, 0.6125]},
        "lf_dice": {"steps": [10, 20], "values": [0.076, 0.054]},
        "val_dice_LIVER": {"steps": [20], "values": [0.5]},
    }
    lines = validation_table(metrics).splitlines()
    assert lines[0].split() == ["step", "lf", "AUC", "lf", "Dice", "LIVER", "loss"]
    assert lines[1].split() == ["10", "0.500", "7.6", "-", f"{smooth([3.0])[-1]:.3f}"]
    assert lines[2].split() == ["20", "0.613", "5.4", "50.0", f"{smooth([3.0, 2.0])[-1]:.3f}"]
    only = {name: metrics[name] for name in ("total", "lf_auc", "lf_dice")}
    assert validation_table(only).splitlines()[0].split() == ["step", "lf", "AUC", "lf", "Dice", "loss"]


def test_plot_run_require_checks_the_last_validation_dice(tmp_path: Path):
    run = tmp_path / "train" / "1"
    run.mkdir(parents=True)
    metrics = {
        "total": {"steps": [10, 20], "values": [2.0, 1.0]},
        "val_dice_LIVER": {"steps": [10, 20], "values": [0.7, 0.62]},  # the last value decides, not the best
    }
    (run / "metrics.json").write_text(json.dumps(metrics))

    def plot_run(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, str(REPO / "script" / "plot_run.py"), str(run), *args]
        return subprocess.run(command, capture_output=True, text=True)

    done = plot_run("--require", "LIVER=60")
    assert done.returncode == 0, done.stderr
    assert "LIVER: last validation Dice 62.0 % at step 20; reached 60 %" in done.stdout
    done = plot_run("--require", "LIVER=65")
    assert done.returncode == 1 and "FAILED: below 65 %" in done.stdout
    done = plot_run("--require", "SPLEEN=1")
    assert done.returncode == 2 and "no validation Dice of 'SPLEEN'" in done.stderr
    done = plot_run("--require", "LIVER")
    assert done.returncode == 2 and "expected CLASS=PERCENT" in done.stderr


@pytest.mark.parametrize(
    ("validated", "expected"),
    [
        (("lf_auc", "lf_dice"), (None, progress.NO_ORGAN_VALIDATION)),  # the demo: validate_cases=0
        (("val_dice_LIVER",), (progress.NO_LABEL_FREE_VALIDATION, None)),
        ((), (progress.NO_VALIDATION, progress.NO_VALIDATION)),
    ],
)
def test_empty_validation_panels_say_why(tmp_path: Path, monkeypatch, validated, expected):
    metrics = {"total": {"steps": [1, 2], "values": [1.0, 0.9]}}
    metrics |= {name: {"steps": [0, 2], "values": [0.5, 0.7]} for name in validated}
    said = []
    monkeypatch.setattr(progress, "_say", lambda axes, message: said.append(message))
    progress.draw_progress(metrics, tmp_path / "progress.png")
    validation_messages = [m for m in said if "validation" in m]
    assert validation_messages == [m for m in expected if m is not None]
