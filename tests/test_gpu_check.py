"""script/gpu_check.sh: the prepared GPU check, run here with ``--cpu-smoke`` (every step at toy sizes on the
CPU: the CUDA tests collected and skipped, the benchmark with a small encoder, a 2-step train.py and its
test.py, a two-run local grid), so that the script cannot rot between GPU windows; and its bad inputs.

The smoke run checks the exit status, the summary's rows and sections and the raw logs, not any timing.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent
STEPS = ("env", "tests", "bench", "train", "test", "grid")


def _gpu_check(*argv: str, env: dict[str, str] | None = None, timeout: int = 120):
    return subprocess.run(
        ["bash", str(REPO / "script" / "gpu_check.sh"), *argv],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_cpu_smoke_runs_every_step(data_root: Path, tmp_path: Path):
    out = tmp_path / "report"
    # The time limits are hang guards; a shared CI machine gets three times as long.
    done = _gpu_check("--cpu-smoke", "--out", str(out), env={"DIFD_GPU_CHECK_SCALE": "3"}, timeout=1800)
    summary = (out / "summary.md").read_text()
    assert done.returncode == 0, summary + done.stdout[-3000:] + done.stderr[-3000:]
    assert summary.startswith("# GPU check (CPU smoke test: toy sizes, no measurement)")
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in summary.splitlines()[6:12]}
    assert rows == dict.fromkeys(STEPS, "ok"), rows
    for name in STEPS:
        assert (out / f"{name}.log").stat().st_size > 0, name
    assert "skipped" in (out / "tests.log").read_text()  # the cuda tests are collected, and skip here
    assert "fp32  fast " in summary and "bf16  naive" in summary and "loader (" in summary
    assert "| fold | RK |" in summary or "RK" in summary.split("## train.py")[1]
    assert "label-free AUC on the held-out volumes" in summary
    assert summary.split("## grid")[1].count("finished") >= 1
    assert (out / "runs" / "gpu_check" / "fold0" / "train" / "1" / "progress.png").is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_says_so_in_one_line(tmp_path: Path):
    done = _gpu_check("--out", str(tmp_path / "report"))
    assert done.returncode == 1
    assert done.stderr.startswith("gpu_check: no CUDA GPU here (torch ") and done.stderr.count("\n") == 1
    assert "--cpu-smoke" in done.stderr and not (tmp_path / "report").exists()


def test_unknown_argument_is_refused():
    done = _gpu_check("--fast")
    assert done.returncode == 2 and "unknown argument --fast" in done.stderr
