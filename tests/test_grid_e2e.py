"""A debug-size grid through script/launch.py, end to end: on the real SLURM cluster (started by .ci/run
with script/slurm_cluster.sh) and on submitit's local executor (CPU).

Two runs (CHAOST2 Settings 1 and 2, fold 1 of the miniature data root, 12 steps at 64 px, evaluation of RK).
The Setting 1 run is warned mid-training as SLURM warns a job before its time limit or on preemption
(SLURM: ``scancel --signal=USR2``, which signals every process of the job step; local: SIGUSR2 to the
job's process, which is what the local executor sends at the time limit): it must write a snapshot, stop,
be requeued and finish, with final weights equal, bit for bit, to those of the same command run without
interruption. Every run must be trained and evaluated, ``status`` must show them finished, and the report
must hold both settings. A second submission of the same grid while it runs is refused.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine.snapshots import read_snapshot
from launcher.clusters import slurm_available
from launcher.grid import MANIFEST, parse_grid, resolve_runs
from launcher.job import read_state
from tests.run_fixtures import make_mini_root

# script/test.sh runs the suite with --dist loadfile: this module's tests run on one worker, one after
# another (the SLURM cluster, the reference run); test_launcher.py's SLURM checks are dry runs.
pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent
#: Steps of a run: the warning comes after the step-2 snapshot, and must find the run still training (a
#: busy machine delays it by seconds).
N_STEPS = 12
INTERRUPTED = "CHAOST2_setting1/fold1"
SPEC = "abd_mri:1,2:1"
DEADLINE_S = 360


def _env() -> dict[str, str]:
    # One thread: the same kernels in every process (the reference and the jobs), and no oversubscription.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _with(mini_root: Path, log_dir: Path) -> list[str]:
    return [
        "debug",
        "supp_idx=0",
        f"data_root={mini_root}",
        f"path.log_dir={log_dir}",
        f"n_steps={N_STEPS}",
        "region_sampling=random",
        "test_label=[2]",
    ]


def _launch(*argv: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "script" / "launch.py"), *argv]
    return subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)


def _final_weights(run_folder: Path) -> dict[str, torch.Tensor]:
    return read_snapshot(run_folder / "snapshots" / f"{N_STEPS}.pth")["model"]


@pytest.fixture(scope="module")
def mini_root(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_mini_root(data_root, tmp_path_factory.mktemp("mini_grid"))


@pytest.fixture(scope="module")
def reference(mini_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """Final weights of the interrupted run's own train.py command, run without interruption."""
    log_dir = tmp_path_factory.mktemp("grid_reference")
    _, (run,) = resolve_runs(parse_grid(["abd_mri:1:1"]), _with(mini_root, log_dir))
    done = subprocess.run(
        run.train_command(0), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return _final_weights(log_dir / INTERRUPTED)


def _wait_for_file(path: Path, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not path.exists():
        assert process is None or process.poll() is None, f"the launcher ended early: {process.stdout.read()}"
        assert time.monotonic() < deadline, f"no {path} within {DEADLINE_S} s"
        time.sleep(0.02)


def _check_grid(grid: Path, reference: dict[str, torch.Tensor]) -> None:
    """Both runs trained and evaluated, the warned one requeued mid-training and equal to the
    reference, status and report show them, no lock left."""
    state = read_state(grid / INTERRUPTED)
    outcomes = [(a["stage"], a["outcome"], a.get("step")) for a in state["attempts"]]
    assert outcomes[0][:2] == ("train", "requeued") and outcomes[0][2] < N_STEPS, outcomes
    assert outcomes[1:] == [("train", "done", N_STEPS), ("test", "done", None)], outcomes
    final = _final_weights(grid / INTERRUPTED)
    assert final.keys() == reference.keys()
    assert all(torch.equal(final[key], reference[key]) for key in reference), "not bit-exact"
    for key in (INTERRUPTED, "CHAOST2_setting2/fold1"):
        assert read_state(grid / key)["stage"] == "finished"
        results = json.loads(next((grid / key / "test").glob("*/results.json")).read_text())
        assert list(results["classes"]) == ["RK"] and results["checkpoint"].endswith(f"/{N_STEPS}.pth")
        assert not (grid / key / ".lock").exists()

    status = _launch("status", str(grid))
    assert status.returncode == 0, status.stderr
    rows = [line.split() for line in status.stdout.splitlines() if line.startswith("difd ")]
    done = f"{N_STEPS}/{N_STEPS}"
    expected = [("CHAOST2", "1", "finished", done), ("CHAOST2", "2", "finished", done)]
    assert [(row[1], row[2], row[4], row[5]) for row in rows] == expected
    assert status.stdout.rstrip().endswith("2 finished")

    report = subprocess.run(
        [sys.executable, str(REPO / "script" / "summarize.py"), str(grid)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert report.returncode == 0, report.stderr
    assert "## CHAOST2, setting 1" in report.stdout and "## CHAOST2, setting 2" in report.stdout
    assert (grid / "report.png").is_file() and (grid / "report.csv").is_file()


NO_SLURM = slurm_available()


@pytest.mark.skipif(NO_SLURM is not None, reason=f"no SLURM reachable here ({NO_SLURM}); .ci/run starts one")
def test_slurm_grid_survives_a_warning(mini_root: Path, reference, tmp_path: Path):
    grid = tmp_path / "grid"
    argv = ["submit", "--grid", SPEC, "--cluster", "slurm", "--timeout-min", "10", "--signal-delay-s", "30",
            "--max-parallel", "2", "with", *_with(mini_root, grid)]  # fmt: skip
    submitted = _launch(*argv)
    assert submitted.returncode == 0, submitted.stdout[-2000:] + submitted.stderr[-3000:]
    jobs = json.loads((grid / MANIFEST).read_text())["submissions"][0]["jobs"]
    assert sorted(jobs) == [INTERRUPTED, "CHAOST2_setting2/fold1"]

    again = _launch(*argv)
    assert again.returncode == 1 and "already submitted and not ended" in again.stderr, again.stderr[-2000:]
    assert len(json.loads((grid / MANIFEST).read_text())["submissions"]) == 1

    _wait_for_file(grid / INTERRUPTED / "snapshots" / "2.pth")
    warned = subprocess.run(["scancel", "--signal=USR2", jobs[INTERRUPTED]], capture_output=True, text=True)
    assert warned.returncode == 0, warned.stderr
    deadline = time.monotonic() + DEADLINE_S
    while True:
        status = _launch("status", str(grid)).stdout
        if status.rstrip().endswith("2 finished") or "failed" in status:
            break
        assert time.monotonic() < deadline, f"not finished within {DEADLINE_S} s:\n{status}"
        time.sleep(3)
    _check_grid(grid, reference)


def test_local_grid_survives_a_warning(mini_root: Path, reference, tmp_path: Path):
    grid = tmp_path / "grid"
    options = ["submit", "--grid", SPEC, "--cluster", "local", "--wait"]
    command = [sys.executable, str(REPO / "script" / "launch.py"), *options, "with", *_with(mini_root, grid)]
    launcher = subprocess.Popen(
        command, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        _wait_for_file(grid / INTERRUPTED / "snapshots" / "2.pth", launcher)
        os.kill(
            read_state(grid / INTERRUPTED)["pid"], signal.SIGUSR2
        )  # the job's process, as at a time limit
        output, _ = launcher.communicate(timeout=DEADLINE_S)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0, output[-4000:]
    assert output.rstrip().endswith("2 finished"), output[-2000:]
    _check_grid(grid, reference)


def test_train_sh_goes_through_the_launcher(mini_root: Path, tmp_path: Path):
    """script/train.sh keeps its interface (dataset, setting, overrides; FOLDS, GPUS) and trains then
    evaluates each fold on the local executor, waiting for them."""
    grid = tmp_path / "runs"
    env = {**_env(), "FOLDS": "1", "GPUS": ""}
    argv = ["bash", "script/train.sh", "abd_mri", "setting2", *_with(mini_root, grid), "n_steps=2"]
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=DEADLINE_S)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stdout.rstrip().endswith("1 finished")
    submission = json.loads((grid / MANIFEST).read_text())["submissions"][0]
    assert submission["options"]["grid"] == ["abd_mri:2:1"] and submission["cluster"] == "local"
    assert (grid / "CHAOST2_setting2" / "fold1" / "snapshots" / "2.pth").is_file()
    assert next((grid / "CHAOST2_setting2" / "fold1" / "test").glob("*/results.json")).is_file()
