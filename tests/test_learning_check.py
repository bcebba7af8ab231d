"""``script/learning_check.sh`` end to end at a minimal size, so that the check itself cannot silently break.

Six real CHAOST2 cases (fold 0 = positions 0-4, so one training volume), 2 steps at 32 px, a validation
before the first and after each step on one query volume and on the label-free episodes: checks the exit
status, the printed curves and verdict and the picture; a goal no run can reach must fail the check; a bad
dataset or data root fails before any training. The values of 2 steps mean nothing; the measured curves of
the real checks are in docs/results.md.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from engine import runtime
from tests.run_fixtures import make_mini_root

pytestmark = pytest.mark.e2e  # runs the commands end to end (CI runs it; -m "not e2e" skips it)

REPO = Path(__file__).resolve().parent.parent


def _check(data_root: Path, out: Path, goal: str, *args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
        "DIFD_DATA_ROOT": str(data_root),
        "DIFD_LC_OUT": str(out),
        "DIFD_LC_SKIP_SETUP": "1",
        "DIFD_LC_STEPS": "2",
        "DIFD_LC_SIZE": "32",
        "DIFD_LC_VALIDATE_EVERY": "1",
        "DIFD_LC_VALIDATE_CASES": "1",
        "DIFD_LC_GOAL": goal,
    }
    script = REPO / "script" / "learning_check.sh"
    return subprocess.run(["bash", str(script), *args], env=env, capture_output=True, text=True, timeout=600)


def test_learning_check_prints_its_curve_and_judges_the_goal(data_root: Path, tmp_path: Path) -> None:
    mini = make_mini_root(data_root, tmp_path / "data")
    done = _check(mini, tmp_path / "out", goal="0")
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    run_dir = tmp_path / "out" / "runs" / "learning_check_CHAOST2" / "fold0" / "train" / "1"
    table = done.stdout[done.stdout.index("validation curves") :].splitlines()
    assert table[1].split() == ["step", "lf", "AUC", "lf", "Dice", "LIVER", "SPLEEN", "mean", "loss"]
    assert [line.split()[0] for line in table[2:5]] == ["0", "1", "2"]
    assert "label-free AUC on the held-out volumes" in done.stdout
    assert f"picture of the run: {run_dir}/progress.png" in done.stdout
    assert (run_dir / "progress.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((run_dir / "config.json").read_text())
    assert config["use_gt"] is True and config["test_label"] == [4] and config["validate_labels"] == [1, 4]
    # DIFD_LC_PRECISION=auto: bf16 only where this CPU has bfloat16 instructions
    assert config["precision"] == ("bf16" if runtime.cpu_has_native_bf16() else "fp32")
    assert "passed: the pipeline learns" in done.stdout

    failed = _check(mini, tmp_path / "out", goal="101")  # the run folder is made anew
    assert failed.returncode == 1
    assert "FAILED: below 101 %" in failed.stdout and "did not reach 101 %" in failed.stderr
    assert "passed" not in failed.stdout


@pytest.mark.parametrize(
    ("argument", "layout", "said"),
    [
        ("abd_mr", "chaos", r"unknown dataset 'abd_mr': expected abd_mri \(CHAOST2\), cmr \(CMR\) or abd_ct"),
        ("cmr", "chaos", r"CMR: image folder not found: .*cmr_MR_normalized"),
        ("abd_mri", "no_supervoxels", r"CHAOST2: supervoxel folder not found: .*supervoxels_5000"),
    ],
)
def test_learning_check_refuses_bad_input_before_training(
    data_root: Path, tmp_path: Path, argument: str, layout: str, said: str
) -> None:
    mini = make_mini_root(data_root, tmp_path / "data")
    if layout == "no_supervoxels":
        shutil.rmtree(mini / "CHAOST2" / "supervoxels_5000")
    done = _check(mini, tmp_path / "out", "60", argument)
    assert done.returncode == 2
    assert re.search(said, done.stderr), done.stderr[-2000:]
    assert not (tmp_path / "out").exists()
