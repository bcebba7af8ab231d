"""launcher.job in this process, with small commands in place of train.py/test.py: bounded retries then
FAILED with the log's last lines (and the status row that says so), a stop from outside, a lane that goes
on after a failed run, and the warning forwarded to a process tree (torchrun's workers run in sessions of
their own)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher.job import LOG_NAME, Child, GridJob, RunFailed, RunStopped, RunTask, read_state
from launcher.status import format_status, grid_status

OK = (sys.executable, "-c", "print('fine')")
FAIL = (sys.executable, "-c", "print('loading'); raise ValueError('boom: volume 3 is damaged')")
TERMINATED = (sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGTERM)")


def _task(grid: Path, name: str, train=OK, test=OK) -> RunTask:
    return RunTask(f"CHAOST2_setting1/{name}", str(grid / "CHAOST2_setting1" / name), train, test)


def _manifest(grid: Path, tasks: list[RunTask], job: str) -> None:
    """A grid.json holding ``tasks``, submitted from here as local job ``job``."""
    runs = {t.key: {"dataset": "CHAOST2", "setting": 1, "fold": int(t.key[-1]), "n_steps": 4} for t in tasks}
    host = socket.gethostname()
    submission = {"submitted": "t", "cluster": "local", "host": host, "jobs": {t.key: job for t in tasks}}
    manifest = {"format": "difd-grid/1", "runs": runs, "submissions": [submission]}
    (grid / "grid.json").write_text(json.dumps(manifest))


def test_a_failing_run_is_retried_then_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # As a job of the local executor whose controller (its id) has ended.
    ended = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    monkeypatch.setenv("SUBMITIT_LOCAL_JOB_ID", ended.stdout.strip())
    task = _task(tmp_path, "fold0", train=FAIL)
    with pytest.raises(RunFailed) as failed:
        GridJob([task], retries=1, stop_wait_s=5)()
    message = str(failed.value)
    assert "CHAOST2_setting1/fold0: train failed 2 time(s) (retries allowed: 1)" in message
    assert "last error: ValueError: boom: volume 3 is damaged" in message
    assert f"log {Path(task.folder) / LOG_NAME}, last lines:" in message and "loading" in message
    state = read_state(task.folder)
    assert state["stage"] == "failed" and state["failures"] == 2 and not state["trained"]
    assert [a["outcome"] for a in state["attempts"]] == ["failed", "failed"]

    # status: the job has ended; the row says failed, with the log and its last error line.
    assert state["job"] == ended.stdout.strip()
    _manifest(tmp_path, [task], state["job"])
    (row,) = grid_status(tmp_path)
    assert row.state == "failed" and "ValueError: boom: volume 3 is damaged" in row.note
    assert str(Path(task.folder) / LOG_NAME) in row.note
    assert "1 failed" in format_status([row])


def test_a_stop_from_outside_ends_the_job(tmp_path: Path):
    task = _task(tmp_path, "fold1", train=TERMINATED)
    with pytest.raises(RunStopped, match="train stopped by SIGTERM from outside the job"):
        GridJob([task, _task(tmp_path, "fold2")], retries=3, stop_wait_s=5)()
    assert read_state(task.folder)["stage"] == "stopped"
    assert read_state(tmp_path / "CHAOST2_setting1" / "fold2") is None  # the lane stopped


def test_a_lane_goes_on_after_a_failed_run(tmp_path: Path):
    failing, fine = _task(tmp_path, "fold3", test=FAIL), _task(tmp_path, "fold4")
    with pytest.raises(RunFailed, match="fold3: test failed 1 time"):
        GridJob([failing, fine], retries=0, stop_wait_s=5)()
    assert read_state(failing.folder)["trained"] is True and read_state(failing.folder)["stage"] == "failed"
    fine_state = read_state(fine.folder)
    assert fine_state["stage"] == "finished"
    assert [(a["stage"], a["outcome"]) for a in fine_state["attempts"]] == [
        ("train", "done"),
        ("test", "done"),
    ]
    assert (
        "=== " in (Path(fine.folder) / LOG_NAME).read_text()
        and "fine" in (Path(fine.folder) / LOG_NAME).read_text()
    )


def test_the_warning_reaches_a_process_tree(tmp_path: Path):
    """A child that ignores the warning (as torchrun does) with a grandchild in a session of its own (as
    torchrun's workers are) that handles it: the grandchild gets the warning, the child SIGTERM, none is
    left."""
    marker, ready = tmp_path / "warned", tmp_path / "ready"
    grandchild = (
        "import signal, sys, time\n"
        f"signal.signal(signal.SIGUSR2, lambda *a: (open({str(marker)!r}, 'w').write('x'), sys.exit(0)))\n"
        f"open({str(ready)!r}, 'w').close()\n"
        "time.sleep(60)\n"
    )
    child = (
        "import subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, '-c', {grandchild!r}], start_new_session=True)\n"
        "time.sleep(60)\n"
    )
    process = Child((sys.executable, "-c", child), tmp_path / "log", "test")
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert time.monotonic() < deadline, "the grandchild did not start"
        time.sleep(0.05)
    started = time.monotonic()
    process.stop(signal.SIGUSR2, wait_s=4)
    assert process.process.wait(timeout=10) == -signal.SIGTERM  # ignored the warning, then SIGTERM
    assert time.monotonic() - started < 6
    assert marker.read_text() == "x"
