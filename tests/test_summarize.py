"""script/summarize.py: the folds' results.json into the paper's table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


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

    def test_final_label_free_validation_beside_the_test_dice(self, tmp_path):
        root = tmp_path / "CHAOST2_setting1"
        test_run = _sacred_run(root / "fold0" / "test" / "1", "COMPLETED", "2026-01-01T10:00:00", 0)
        _fake_results(test_run / "results.json", 0, 0.8, 0.5)
        train = _sacred_run(root / "fold0" / "train" / "1", "COMPLETED", "2026-01-01T09:00:00", 0)
        metrics = {
            "lf_auc": {"steps": [100, 200], "values": [0.55, 0.625]},
            "lf_dice": {"steps": [100, 200], "values": [0.1, 0.05]},
            "val_dice_LIVER": {"steps": [100, 200], "values": [0.2, 0.3]},
            "val_dice_mean": {"steps": [100, 200], "values": [0.2, 0.3]},
        }
        (train / "metrics.json").write_text(json.dumps(metrics))
        done = _summarize(root)
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        header = "| fold | LIVER | RK | mean | val lf AUC | val lf Dice | val LIVER | val mean | val step |"
        assert lines[2] == header + " evaluation |"
        assert lines[4] == "| 0 | 80.00 | 50.00 | 65.00 | 0.62 | 5.00 | 30.00 | 30.00 | 200 | fold0/test/1 |"
        assert "label-free AUC" in done.stdout

    def test_duplicate_explicit_fold_is_an_error(self, tmp_path):
        a = _fake_results(tmp_path / "a" / "results.json", 0, 0.8, 0.6)
        b = _fake_results(tmp_path / "b" / "results.json", 0, 0.7, 0.9)
        done = _summarize(a, b)
        assert done.returncode != 0 and "several results.json" in done.stderr
