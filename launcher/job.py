"""What one submitted job runs: for each of its runs, ``train.py`` (``resume=True``) then ``test.py``, each
in a child process, with the run's state kept on disk.

A job holds one run on SLURM (one array task per run) and a lane's share of the runs with the local
executor. :class:`GridJob` is a ``submitit.helpers.Checkpointable``: when SLURM warns a job before its time
limit or on preemption (submitit's signal, ``$SUBMITIT_PREEMPT_SIGNAL``, SIGUSR2 by default), submitit
calls :meth:`GridJob.checkpoint` in the job's process; it forwards the signal to the training child and to
every process under it (SLURM also signals every process of the step itself; the local executor signals
the job's process only; torchrun's workers run in sessions of their own), waits for the child to write its
snapshot and stop (``train.py`` treats the signal like the first Ctrl-C), and hands submitit the same job to
requeue: the requeued job resumes from that snapshot. A training or evaluation that fails is retried up to
``retries`` times (the count survives requeues), then the run is FAILED with its log's last lines; a child
stopped by a signal from outside (SIGTERM: cancel, or a preemption/requeue of SLURM's own) ends the job
with the run marked stopped.

Children: their own process group, the preemption signal ignored until ``train.py`` installs its handler
(torchrun itself keeps ignoring it), SIGTERM when the job's process dies (``PR_SET_PDEATHSIG``: an orphan
would escape ``proctrack/linuxproc`` and keep writing the run folder), and whatever is left of them is
killed when an attempt ends. Their output is appended to ``<run folder>/launch.log`` (a stream, not a file
written once); the state goes to ``<run folder>/launch.json`` through :func:`utils.write_atomically`:
stage (training, evaluating, finished, failed, stopped), failures, attempts, last error line, job and
process. ``script/launch.py status`` reads it.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit

from engine.monitor import preempt_signal
from engine.snapshots import latest_snapshot
from utils import pid_alive, timestamp, write_atomically

STATE_NAME = "launch.json"
LOG_NAME = "launch.log"
TRAINING, EVALUATING, FINISHED, FAILED, STOPPED = "training", "evaluating", "finished", "failed", "stopped"
#: Lines of a failed run's log that its error message carries.
TAIL_LINES = 20
_PR_SET_PDEATHSIG = 1
_ERROR_LINE = re.compile(r"(^\w+(\.\w+)*(Error|Exception|Interrupt|Stopped)\b)|(\berror\b:)", re.IGNORECASE)


@dataclass(frozen=True)
class RunTask:
    """One run as a job sees it: its key in the grid, run folder and the two commands."""

    key: str
    folder: str
    train: tuple[str, ...]
    test: tuple[str, ...]


class RunFailed(RuntimeError):
    """A run's training or evaluation failed more often than its retries allow."""


class RunStopped(RuntimeError):
    """A run's child was stopped by a signal from outside (cancel, or SLURM's own preemption/requeue)."""


def read_state(folder: str | os.PathLike) -> dict[str, Any] | None:
    """``<run folder>/launch.json``, or None when absent or unreadable."""
    try:
        state = json.loads((Path(folder) / STATE_NAME).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def write_state(folder: str | os.PathLike, state: dict[str, Any]) -> None:
    state["updated"] = timestamp()
    write_atomically(Path(folder) / STATE_NAME, lambda tmp: tmp.write_text(json.dumps(state, indent=1)))


def log_tail(path: str | os.PathLike, lines: int = TAIL_LINES) -> list[str]:
    """The last ``lines`` lines of a log (empty when it cannot be read)."""
    try:
        with open(path, "rb") as stream:
            stream.seek(0, os.SEEK_END)
            stream.seek(max(0, stream.tell() - 64 * 1024))
            text = stream.read().decode(errors="replace")
    except OSError:
        return []
    return text.replace("\r", "\n").splitlines()[-lines:]


def last_error_line(lines: list[str]) -> str:
    """The last line that reads as an error (``ValueError: ...``, ``error: ...``), else the last line."""
    lines = [line.strip() for line in lines if line.strip()]
    for line in reversed(lines):
        if _ERROR_LINE.search(line):
            return line
    return lines[-1] if lines else ""


def sacred_run_ids(folder: Path) -> list[int]:
    """Ids of the Sacred run folders (``<id>/run.json``) in ``folder`` (``train/`` or ``test/``), sorted."""
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and (p / "run.json").is_file())


def sacred_status(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "run.json").read_text()).get("status")
    except (OSError, ValueError):
        return None


def process_tree(pid: int) -> list[int]:
    """``pid`` and every process under it (by parent pid, read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry.name))
    tree, queue = [], [pid]
    while queue:
        current = queue.pop()
        tree.append(current)
        queue += children.get(current, [])
    return tree


def _child_setup(ignored: int) -> None:
    """In the child before exec: own process group, ``ignored`` (the preemption signal) ignored until
    the program installs its own handler, and SIGTERM when the job's process dies."""
    os.setpgid(0, 0)
    signal.signal(ignored, signal.SIG_IGN)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class Child:
    """One attempt's child process (``train.py``, torchrun, ``test.py``), its output appended to ``log``."""

    def __init__(self, argv: tuple[str, ...], log: Path, header: str) -> None:
        with open(log, "ab") as stream:
            stream.write(f"\n=== {header}\n=== {' '.join(argv)}\n".encode())
            stream.flush()
            ignored = preempt_signal()
            self.process = subprocess.Popen(
                argv,
                stdout=stream,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                preexec_fn=lambda: _child_setup(ignored),
            )

    def alive(self) -> bool:
        """Whether the child still runs (an exited, unreaped child counts as ended)."""
        return pid_alive(self.process.pid)

    def _wait_ended(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        return not self.alive()

    def _signal_all(self, signum: int) -> None:
        for pid in process_tree(self.process.pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signum)

    def stop(self, signum: int, wait_s: float) -> None:
        """Ask the child and every process under it to stop with ``signum``, wait up to ``wait_s`` for it to
        end (snapshot written), then SIGTERM (a child that had not yet installed its handler ignored the
        preemption signal), and SIGKILL what is left at the end. Safe inside a signal handler: it never
        waits on the ``Popen`` (whose lock the interrupted main code may hold)."""
        self._signal_all(signum)
        if self._wait_ended(wait_s * 0.75):
            return
        self._signal_all(signal.SIGTERM)
        if not self._wait_ended(wait_s * 0.25):
            self._signal_all(signal.SIGKILL)

    def kill_group(self) -> None:
        """SIGKILL what is left in the child's process group (its DataLoader workers, say). Safe after the
        child was reaped: a process group's id is not reused while any member lives."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)


def current_job_id() -> str:
    """This job's id as submitit names it (``<array job>_<task>`` on SLURM arrays, the controller's pid with
    the local executor); ``pid<N>`` outside a submitit job."""
    try:
        return str(submitit.JobEnvironment().job_id)
    except RuntimeError:
        return f"pid{os.getpid()}"


class GridJob(submitit.helpers.Checkpointable):
    """Train then evaluate each of ``tasks``; a checkpointable submitit job (see the module docstring).

    ``retries``: failed attempts a run may have beyond the first; ``stop_wait_s``: how long a preemption
    warning waits for the training child to write its snapshot (the job is killed ``signal_delay_s``
    after the warning).
    """

    def __init__(self, tasks: list[RunTask], retries: int, stop_wait_s: float) -> None:
        self.tasks, self.retries, self.stop_wait_s = list(tasks), int(retries), float(stop_wait_s)
        self._child: Child | None = None
        self._task: RunTask | None = None
        self._state: dict[str, Any] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"tasks": self.tasks, "retries": self.retries, "stop_wait_s": self.stop_wait_s}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["tasks"], state["retries"], state["stop_wait_s"])

    def __call__(self) -> dict[str, str]:
        """Runs every task; returns ``{key: "finished"}``. Raises :class:`RunFailed` naming the runs that
        failed (after the others were done) and :class:`RunStopped` at once."""
        failed = []
        for task in self.tasks:
            try:
                self._run(task)
            except RunFailed as err:
                failed.append(str(err))
        if failed:
            raise RunFailed("\n\n".join(failed))
        return {task.key: FINISHED for task in self.tasks}

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """submitit's preemption/time-limit handler: stop the running child (snapshot first), record it,
        and return this job to be requeued."""
        child, state = self._child, self._state
        if child is not None and child.alive():
            # train.py snapshots on the warning; test.py has nothing to keep and stops on SIGTERM.
            training = state is not None and state.get("stage") == TRAINING
            child.stop(preempt_signal() if training else signal.SIGTERM, self.stop_wait_s)
        if state is not None and self._task is not None:
            attempt = state["attempts"][-1] if state["attempts"] else None
            if attempt is not None and attempt.get("ended") is None:
                attempt.update(ended=timestamp(), outcome="requeued", step=self._step(self._task))
            write_state(self._task.folder, state)
        return submitit.helpers.DelayedSubmission(GridJob(self.tasks, self.retries, self.stop_wait_s))

    def _step(self, task: RunTask) -> int:
        newest = latest_snapshot(Path(task.folder) / "snapshots")
        return int(newest.stem) if newest is not None else 0

    def _run(self, task: RunTask) -> None:
        folder = Path(task.folder)
        folder.mkdir(parents=True, exist_ok=True)
        job = current_job_id()
        state = read_state(folder) or {}
        if state.get("job") == job and state.get("stage") == FINISHED:
            return  # done before this job was requeued
        if state.get("job") == job and state.get("stage") == FAILED:
            raise RunFailed(f"{task.key}: failed before this job was requeued: {state.get('error')}")
        if state.get("job") != job:  # a new submission: a fresh count of failures
            state = {"key": task.key, "attempts": [], "failures": 0, "trained": False}
        state.update(job=job, host=socket.gethostname(), pid=os.getpid(), log=str(folder / LOG_NAME))
        state["error"] = None
        self._task, self._state = task, state
        try:
            if not state["trained"]:
                self._stage(task, state, TRAINING, "train", task.train)
                state["trained"] = True
            self._stage(task, state, EVALUATING, "test", task.test)
            state["stage"] = FINISHED
            write_state(folder, state)
        finally:
            self._task = self._state = None

    def _stage(self, task: RunTask, state: dict[str, Any], stage: str, sacred_dir: str, argv) -> None:
        """Run one stage's command until it succeeds, retrying failures up to :attr:`retries` in all."""
        folder = Path(task.folder)
        while True:
            state["stage"] = stage
            before = sacred_run_ids(folder / sacred_dir)
            attempt = {"stage": sacred_dir, "job": state["job"], "started": timestamp(), "ended": None}
            state["attempts"].append(attempt)
            write_state(folder, state)
            returncode = self._attempt(task, state, argv, len(state["attempts"]))
            new_runs = [i for i in sacred_run_ids(folder / sacred_dir) if i not in before]
            status = sacred_status(folder / sacred_dir / str(new_runs[-1])) if new_runs else None
            attempt.update(
                ended=timestamp(), returncode=returncode, sacred_run=new_runs[-1] if new_runs else None
            )
            if sacred_dir == "train":
                attempt["step"] = self._step(task)
            if returncode == 0:
                attempt["outcome"] = "done"
                write_state(folder, state)
                return
            tail = log_tail(folder / LOG_NAME)
            # A stop this job asked for never returns here (submitit exits in its handler).
            if status == "INTERRUPTED" or (returncode < 0 and returncode != -signal.SIGKILL):
                name = signal.Signals(-returncode).name if returncode < 0 else "a stop request"
                attempt["outcome"] = "stopped"
                state["stage"] = STOPPED
                state["error"] = (
                    f"{task.key}: {sacred_dir} stopped by {name} from outside the job (cancelled, or "
                    "preempted or requeued by the cluster)"
                )
                write_state(folder, state)
                raise RunStopped(state["error"])
            state["failures"] += 1
            attempt["outcome"] = "failed"
            state["error"] = last_error_line(tail) or f"exit status {returncode}"
            if state["failures"] > self.retries:
                state["stage"] = FAILED
                write_state(folder, state)
                raise RunFailed(
                    f"{task.key}: {sacred_dir} failed {state['failures']} time(s) (retries allowed: "
                    f"{self.retries}); last error: {state['error']}\nlog {folder / LOG_NAME}, last lines:\n"
                    + "\n".join(tail)
                )
            write_state(folder, state)

    def _attempt(self, task: RunTask, state: dict[str, Any], argv, number: int) -> int:
        """Run ``argv`` to its end; returns its exit status."""
        header = (
            f"{timestamp()} UTC: job {state['job']} on {state['host']} (pid {os.getpid()}), attempt {number}"
        )
        child = self._child = Child(tuple(argv), Path(task.folder) / LOG_NAME, header)
        try:
            returncode = child.process.wait()
        except BaseException:  # this process is stopping (Ctrl-C, the requeue's exit): the child stops first
            if child.alive():
                child.stop(signal.SIGTERM, self.stop_wait_s)
            raise
        finally:
            child.kill_group()
            self._child = None
        return returncode
