"""script/summarize.py: the folds' results.json into the paper's table."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.run_fixtures import load_script

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


def _results(
    path: Path, dataset: str, fold: int, setting: int, dice: dict[str, float], method: str | None = None
) -> None:
    """A results.json of ``dataset`` with the given Dice (fractions) per class; its config records the
    method when given (results written before methods record none: DIFD's)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    classes = {name: {"label": i + 1, "dice": {"3": d}, "iou": {"3": d}, "mean_dice": d, "mean_iou": d}
               for i, (name, d) in enumerate(dice.items())}  # fmt: skip
    mean = sum(dice.values()) / len(dice)
    results = {"dataset": dataset, "eval_fold": fold, "classes": classes, "mean_dice": mean, "mean_iou": mean}
    config = {"setting": setting, "supp_idx": 2, "n_part": 3, "n_steps": 100}
    if method is not None:
        config["method"] = method
    path.write_text(json.dumps({**results, "config": config}))


ORGANS = ("LIVER", "RK", "LK", "SPLEEN")
PLUGIN = str(REPO / "tests" / "plugin_method.py")


class TestReport:
    """The grid report: per dataset and setting, each method beside its reference values."""

    @staticmethod
    def _grid(tmp_path: Path) -> Path:
        grid = tmp_path / "runs"
        for fold, values in ((0, (0.80, 0.60, 0.70, 0.50)), (1, (0.70, 0.80, 0.50, 0.70))):
            path = grid / "CHAOST2_setting1" / f"fold{fold}" / "test" / "1" / "results.json"
            _results(path, "CHAOST2", fold, 1, dict(zip(ORGANS, values, strict=True)))
        path = grid / "CMR_setting1" / "fold3" / "test" / "1" / "results.json"
        _results(path, "CMR", 3, 1, {"LV-BP": 0.9, "LV-MYO": 0.6, "RV": 0.75})
        return grid

    def test_the_published_reference(self, tmp_path: Path, capsys):
        """The shipped reference: DIFD's known mean beside the grid's, its unknown cells "–"; the grid's one
        method is also set beside the other methods' published values; sources, confidence, protocol."""
        grid = self._grid(tmp_path)
        assert load_script("script/summarize.py").main([str(grid)]) == 0
        out = capsys.readouterr().out
        assert (
            "| difd: this grid (2 fold(s)) | 75.00 ± 5.00 | 70.00 ± 10.00 | 60.00 ± 10.00 | 60.00 ± 10.00 | "
            "66.25 ± 1.25 |" in out
        )
        assert "| DIFD [B] | – | – | – | – | 84.12 |" in out
        assert "| difference to DIFD | – | – | – | – | −17.87 |" in out
        assert "| Q-Net [B] | 81.74 | 87.98 | 78.36 | 75.99 | 81.02 |" in out
        assert "| difference to Q-Net | −6.74 | −17.98 | −18.36 | −15.99 | −14.77 |" in out
        assert "| DIFD | – | – | – | – |" in out  # CMR: nothing known of DIFD, no tag
        assert "- difd: supp_idx=2, n_part=3, n_steps=100" in out
        assert "- DIFD: [B] quoted as DIFD's result in the comparison table of SD-FSMIS" in out
        assert "not read from the DIFD paper itself; protocol: not stated by the source" in out
        assert "- ADNet: [B] ADNet (Hansen et al., MedIA 2022)" in out
        assert "protocol: ADNet's own: the last case of each fold as support" in out
        assert "doi:10.1109/TMI.2025.3546653" in out and "## CMR, setting 1" in out
        assert "### difd, CHAOST2, setting 1: per fold" in out
        assert (grid / "report.md").read_text() + f"\npicture: {grid / 'report.png'}\n" == out
        rows = list(csv.DictReader(io.StringIO((grid / "report.csv").read_text())))
        liver = [r for r in rows if r["dataset"] == "CHAOST2" and r["class"] == "LIVER"]
        assert [r["reference_method"] for r in liver] == ["DIFD", "GMRD", "Q-Net", "ADNet", "SSL-ALPNet"]
        assert {r["method"] for r in rows} == {"difd"}
        difd, qnet = liver[0], liver[2]
        assert (difd["fold0"], difd["fold1"], difd["fold2"], difd["mean"]) == (
            "80.000000",
            "70.000000",
            "",
            "75.000000",
        )
        assert difd["reference"] == "" and difd["difference"] == "" and difd["source"].startswith("not known")
        assert (qnet["reference"], qnet["difference"], qnet["confidence"]) == ("81.740000", "-6.740000", "B")
        assert len(rows) == 5 * 5 + 4 * 5  # (CHAOST2: 4 organs + mean; CMR: 3 + mean) x 5 published methods
        assert (grid / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    def test_methods_side_by_side(self, tmp_path: Path, capsys):
        """A grid of three methods (one registered from a plug-in), in the registry's order: each beside its
        own reference row, found by name or title; the reference's other methods listed as not run here."""
        grid = tmp_path / "runs"
        for root, method, folds in (
            ("CHAOST2_setting1", "difd", (0, 1)),
            ("tiny_proto_CHAOST2_setting1", "tiny_proto", (0,)),
            ("qnet_CHAOST2_setting1", "qnet", (2,)),
        ):
            for fold in folds:
                run = _sacred_run(
                    grid / root / f"fold{fold}" / "test" / "1", "COMPLETED", "2026-01-01T10:00:00", fold
                )
                values = (0.6 + 0.1 * fold, 0.5, 0.4, 0.3)
                _results(
                    run / "results.json", "CHAOST2", fold, 1, dict(zip(ORGANS, values, strict=True)), method
                )
        reference = tmp_path / "reference.csv"
        reference.write_text(
            "method,dataset,setting,class,dice,source,confidence\n"
            "TinyProto,CHAOST2,1,LIVER,50,a run of ours,A\n"
            "DIFD,CHAOST2,1,mean,50,quoted,B\n"
            "Q-Net,CHAOST2,1,LIVER,60,quoted,B\n"
            "SSL-ALPNet,CHAOST2,1,LIVER,76.1,quoted,B\n"
        )
        argv = [str(grid), "--reference", str(reference), "--plugin", PLUGIN]
        assert load_script("script/summarize.py").main(argv) == 0
        out = capsys.readouterr().out
        section = out.split("## CHAOST2, setting 1")[1].split("Protocol of this grid")[0].strip().splitlines()
        rk_lk_spleen = " | 50.00 ± 0.00 | 40.00 ± 0.00 | 30.00 ± 0.00"  # the same in every run
        assert section[2:] == [
            "| difd: this grid (2 fold(s)) | 65.00 ± 5.00" + rk_lk_spleen + " | 46.25 ± 1.25 |",
            "| DIFD [B] | – | – | – | – | 50.00 |",
            "| difference to DIFD | – | – | – | – | −3.75 |",
            "| qnet: this grid (1 fold(s)) | 80.00 ± 0.00" + rk_lk_spleen + " | 50.00 ± 0.00 |",
            "| Q-Net [B] | 60.00 | – | – | – | – |",
            "| difference to Q-Net | +20.00 | – | – | – | – |",
            "| tiny_proto: this grid (1 fold(s)) | 60.00 ± 0.00" + rk_lk_spleen + " | 45.00 ± 0.00 |",
            "| TinyProto [A] | 50.00 | – | – | – | – |",
            "| difference to TinyProto | +10.00 | – | – | – | – |",
            "| SSL-ALPNet [B], not run here | 76.10 | – | – | – | – |",
        ], out
        for heading in ("difd", "tiny_proto", "qnet"):
            assert f"### {heading}, CHAOST2, setting 1: per fold" in out
        rows = list(csv.DictReader(io.StringIO((grid / "report.csv").read_text())))
        assert [(r["method"], r["reference_method"]) for r in rows if r["class"] == "LIVER"] == [
            ("difd", "DIFD"),
            ("qnet", "Q-Net"),
            ("tiny_proto", "TinyProto"),
        ]
        qnet = next(r for r in rows if r["method"] == "qnet" and r["class"] == "LIVER")
        assert (qnet["fold2"], qnet["reference"], qnet["difference"]) == (
            "80.000000",
            "60.000000",
            "20.000000",
        )

    def test_a_mean_over_fewer_organs_is_not_compared(self, tmp_path: Path, capsys):
        """Runs that evaluated RK only: the organ is set beside the reference, their mean (over RK) is not
        set beside the reference's mean over four organs."""
        grid = tmp_path / "runs"
        _results(
            grid / "CHAOST2_setting2" / "fold0" / "test" / "1" / "results.json", "CHAOST2", 0, 2, {"RK": 0.5}
        )
        assert load_script("script/summarize.py").main([str(grid)]) == 0
        out = capsys.readouterr().out
        assert "| Q-Net [B] | 65.94 | 68.59 |" in out and "| difference to Q-Net | −15.94 | – |" in out
        assert "- difd: its mean is over RK only, not the dataset's test classes: not compared" in out
        rows = list(csv.DictReader(io.StringIO((grid / "report.csv").read_text())))
        mean = next(r for r in rows if r["class"] == "mean" and r["reference_method"] == "Q-Net")
        assert (mean["mean"], mean["reference"], mean["difference"]) == ("50.000000", "68.590000", "")

    def test_a_method_twice_in_one_grid_is_refused(self, tmp_path: Path):
        grid = self._grid(tmp_path)
        path = grid / "copy_CHAOST2_setting1" / "fold0" / "test" / "1" / "results.json"
        _results(path, "CHAOST2", 0, 1, dict(zip(ORGANS, (0.1, 0.2, 0.3, 0.4), strict=True)))
        with pytest.raises(ValueError, match="difd CHAOST2 setting 1 is in two run folders of the grid: "):
            load_script("script/summarize.py").main([str(grid)])

    def test_a_filled_reference(self, tmp_path: Path, capsys):
        grid = self._grid(tmp_path)
        reference = tmp_path / "colleague.csv"
        reference.write_text(
            "method,dataset,setting,class,dice,source\n"
            "colleague,CHAOST2,1,LIVER,71.5,run of 2026-11-30\n"
            "colleague,CHAOST2,1,mean,,not computed\n"
            "colleague,CMR,1,RV,80,run of 2026-11-30\n"
        )
        assert load_script("script/summarize.py").main([str(grid), "--reference", str(reference)]) == 0
        out = capsys.readouterr().out
        assert "| colleague | 71.50 | – | – | – | – |" in out
        assert "| difference to colleague | +3.50 | – | – | – | – |" in out
        assert "| difference to colleague | – | – | −5.00 | – |" in out  # CMR: LV-BP, LV-MYO, RV, mean
        assert "- colleague: run of 2026-11-30; protocol: not stated by the source" in out
        rows = list(csv.DictReader(io.StringIO((grid / "report.csv").read_text())))
        rv = next(r for r in rows if r["class"] == "RV")
        assert (rv["reference"], rv["difference"], rv["source"]) == (
            "80.000000",
            "-5.000000",
            "run of 2026-11-30",
        )

    @pytest.mark.parametrize(
        ("row", "message"),
        [
            (
                "x,CHAOST2,1,KIDNEY,50,s",
                r"line 2: class must be one of \['LIVER', 'RK', 'LK', 'SPLEEN', 'mean'\]",
            ),
            ("x,CHAOST2,3,LIVER,50,s", "line 2: setting must be 1 or 2"),
            ("x,ABD,1,LIVER,50,s", "line 2: dataset must be one of"),
            ("x,CHAOST2,1,LIVER,0.8x,s", r"line 2: dice must be empty or a number in \[0, 100\]"),
            ("x,CHAOST2,1,LIVER,120,s", r"line 2: dice must be empty or a number in \[0, 100\]"),
            ("x,CHAOST2,1,LIVER,50,s\nx,CHAOST2,1,LIVER,51,s", "line 3: x, CHAOST2, 1, LIVER is given twice"),
        ],
    )
    def test_a_bad_reference_names_the_line(self, tmp_path: Path, row: str, message: str):
        reference = tmp_path / "bad.csv"
        reference.write_text("method,dataset,setting,class,dice,source\n" + row + "\n")
        with pytest.raises(ValueError, match=message):
            load_script("script/summarize.py").main(
                [str(self._grid(tmp_path)), "--reference", str(reference)]
            )

    def test_unknown_columns_are_refused(self, tmp_path: Path):
        reference = tmp_path / "bad.csv"
        reference.write_text("method,dataset,setting,class,dice,source,trust\nx,CHAOST2,1,LIVER,50,s,high\n")
        with pytest.raises(ValueError, match=r"\(and optionally confidence,protocol\), found \["):
            load_script("script/summarize.py").main(
                [str(self._grid(tmp_path)), "--reference", str(reference)]
            )
