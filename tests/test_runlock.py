"""engine.runlock: one writer per run folder; a dead holder's successor takes over, a live one is named."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from engine.runlock import LOCK_NAME, Holder, RunLocked, acquire, read_holder, release, slurm_job_id

REPO = Path(__file__).resolve().parent.parent


def _write_holder(folder: Path, **fields) -> Holder:
    holder = Holder(
        **{
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "slurm_job": None,
            "started": "2026-01-01T00:00:00",
            "command": "train.py",
            **fields,
        }
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_NAME).write_text(json.dumps(asdict(holder)))
    return holder


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_acquire_and_release(tmp_path: Path):
    folder = tmp_path / "fold0"
    held = acquire(folder, "train.py")
    assert read_holder(folder) == held and held.pid == os.getpid()
    assert acquire(folder, "train.py").pid == os.getpid()  # the holder itself may take it again
    release(folder)
    assert read_holder(folder) is None and not (folder / LOCK_NAME).exists()


def test_a_live_holder_is_named(tmp_path: Path):
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as other:
        try:
            _write_holder(tmp_path, pid=other.pid, slurm_job="77_3")
            with pytest.raises(RunLocked, match=rf"pid {other.pid} on host .*SLURM job 77_3.*one writer"):
                acquire(tmp_path, "train.py")
            release(tmp_path)  # not ours: left alone
            assert read_holder(tmp_path).pid == other.pid
        finally:
            other.kill()


def test_a_dead_holder_is_taken_over(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    old = _write_holder(tmp_path, pid=_dead_pid())
    with caplog.at_level(logging.WARNING):
        taken = acquire(tmp_path, "train.py")
    assert taken.pid == os.getpid()
    assert f"taking over the lock of {tmp_path} from {old.describe()}: its process has ended" in caplog.text


def test_other_hosts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Another host's holder cannot be checked: refused, unless it is this SLURM job (requeued)."""
    _write_holder(tmp_path, host="node-a", pid=123, slurm_job="41_2")
    with pytest.raises(RunLocked, match=rf"cannot be checked.*delete {tmp_path / LOCK_NAME}"):
        acquire(tmp_path, "train.py")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "41")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    monkeypatch.setenv("SLURM_JOB_ID", "58")
    assert slurm_job_id() == "41_2"
    assert acquire(tmp_path, "train.py").slurm_job == "41_2"


@pytest.mark.e2e
def test_train_py_refuses_a_locked_run_folder(tmp_path: Path, data_root: Path):
    """A hand-started train.py on a fold that a live process trains stops before making any run folder."""
    fold = tmp_path / "runs" / "CHAOST2_setting1" / "fold0"
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"]) as other:
        try:
            _write_holder(fold, pid=other.pid, slurm_job="12")
            done = subprocess.run(
                [
                    sys.executable,
                    str(REPO / "train.py"),
                    "with",
                    "debug",
                    f"path.log_dir={tmp_path / 'runs'}",
                    f"data_root={data_root}",
                ],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=300,
            )
        finally:
            other.kill()
    assert done.returncode != 0
    assert f"is being written by train.py (pid {other.pid} on host" in done.stderr
    assert sorted(p.name for p in fold.iterdir()) == [".lock", ".lock.guard"]
