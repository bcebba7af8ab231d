"""The quick-start pipeline (script/demo.sh) end to end at a minimal size, so it cannot silently break.

Phantom of 10 cases x 10 slices at 64 px, supervoxels with min_size 200, 2 training steps at 32 px on the
CPU with the label-free validation before the first and at the last step, evaluation of fold 0: checks the
exit status, the printed label-free curve, the Dice table and the output files, not the values (2 steps
learn nothing).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e  # runs the commands end to end (CI runs it; -m "not e2e" skips it)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    if not list((REPO / "data" / "supervoxels").glob("felzenszwalb_3d_cy*.so")):
        pytest.skip("supervoxel extension not built (python data/supervoxels/setup.py build_ext --inplace)")
    out = tmp_path_factory.mktemp("demo")
    env = {key: value for key, value in os.environ.items() if key != "DIFD_DATA_ROOT"}
    env |= {
        "DIFD_DEMO_SKIP_SETUP": "1",
        "DIFD_DEMO_OUT": str(out),
        "DIFD_DEMO_DEVICE": "cpu",
        "DIFD_DEMO_STEPS": "2",
        "DIFD_DEMO_SIZE": "32",
        "DIFD_DEMO_CASES": "10",
        "DIFD_DEMO_SLICES": "10",
        "DIFD_DEMO_PHANTOM_SIZE": "64",
        "DIFD_DEMO_NSV": "200",
    }
    result = subprocess.run(
        ["bash", str(REPO / "script" / "demo.sh")], env=env, capture_output=True, text=True, timeout=600
    )
    return result, out


def test_demo_runs_end_to_end(demo_run: tuple[subprocess.CompletedProcess, Path]) -> None:
    result, out = demo_run
    assert result.returncode == 0, f"demo.sh failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert "| fold | LIVER | RK | LK | SPLEEN | mean |" in result.stdout
    images = sorted((out / "data" / "CHAOST2" / "chaos_MR_T2_normalized").glob("image_*.nii.gz"))
    assert len(images) == 10
    assert len(list((out / "data" / "CHAOST2" / "supervoxels_200").glob("superpix-MIDDLE_*.nii.gz"))) == 10
    results_files = list((out / "runs" / "demo_cpu" / "fold0" / "test").glob("*/results.json"))
    assert len(results_files) == 1
    results = json.loads(results_files[0].read_text())
    assert list(results["classes"]) == ["LIVER", "RK", "LK", "SPLEEN"]
    test_dir = results_files[0].parent
    for organ in results["classes"]:
        assert list((test_dir / "predictions" / organ).glob("pred_*.nii.gz"))
        assert list((test_dir / "overlays" / organ).glob("*.png"))
    assert f"results.json: {test_dir}/results.json" in result.stdout
    # The label-free curve leads the report (before the organ Dice table); it is printed and drawn.
    train_dir = out / "runs" / "demo_cpu" / "fold0" / "train" / "1"
    assert result.stdout.index("label-free validation curve") < result.stdout.index("| fold | LIVER")
    lines = result.stdout.splitlines()
    header = [line.split() for line in lines if line.split()[:1] == ["step"]]
    assert header == [["step", "lf", "AUC", "lf", "Dice", "loss"]]
    assert "label-free AUC on the held-out volumes (no label read; chance 0.5):" in result.stdout
    assert " at step 0, " in result.stdout and " at step 2 " in result.stdout
    assert "Organ Dice needs general-purpose features" in result.stdout
    assert (train_dir / "progress.png").stat().st_size > 0
    assert f"{train_dir}/progress.png" in result.stdout


def test_demo_stops_on_a_failing_step(tmp_path: Path) -> None:
    # A data root without CHAOST2 images: the script must stop with an error, not train on nothing.
    env = dict(os.environ) | {
        "DIFD_DEMO_SKIP_SETUP": "1",
        "DIFD_DEMO_OUT": str(tmp_path / "out"),
        "DIFD_DATA_ROOT": str(tmp_path),
        "DIFD_DEMO_DEVICE": "cpu",
    }
    result = subprocess.run(
        ["bash", str(REPO / "script" / "demo.sh")], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert "no CHAOST2 images" in result.stderr
    assert not (tmp_path / "out" / "runs").exists()
