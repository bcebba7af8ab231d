"""One writer per run folder: the lock ``<run folder>/.lock`` that ``train.py`` takes before it writes.

The lock file records its holder (:class:`Holder`: host, pid, SLURM job, start time, command) as JSON,
written through :func:`utils.write_atomically`. A second ``train.py`` on the same run folder (a job of a
grid submitted twice, or a hand-started run while a job trains) stops with :class:`RunLocked`, naming the
holder. A holder that is gone is taken over, with a message: on the same host when its process no longer
runs, or when the taker is the same SLURM job (a requeued job starts again under its old id, possibly on
another node, and Slurm has ended the old incarnation's processes). A holder on another host that is not
this SLURM job cannot be checked from here: that is refused too, and the message says how to clear it.

Taking and releasing are serialised by ``fcntl.flock`` on ``<run folder>/.lock.guard`` (never rewritten,
so every process locks the same file), which the kernel releases when its process dies; the check of the
holder and the write of the new one cannot interleave with another process's.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from utils import pid_alive, timestamp, write_atomically

LOCK_NAME = ".lock"
GUARD_NAME = ".lock.guard"

logger = logging.getLogger(__name__)


def slurm_job_id(environ: dict[str, str] | None = None) -> str | None:
    """This process's SLURM job as ``<array job>_<task>`` for an array task, else ``SLURM_JOB_ID``; None
    outside SLURM. An array task keeps this id when it is requeued."""
    environ = os.environ if environ is None else environ
    if environ.get("SLURM_ARRAY_JOB_ID") and environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{environ['SLURM_ARRAY_JOB_ID']}_{environ['SLURM_ARRAY_TASK_ID']}"
    return environ.get("SLURM_JOB_ID") or None


@dataclass(frozen=True)
class Holder:
    """Who holds (or held) a run folder's lock."""

    host: str
    pid: int
    slurm_job: str | None
    started: str  # ISO time, UTC
    command: str

    def describe(self) -> str:
        job = f", SLURM job {self.slurm_job}" if self.slurm_job else ""
        return f"{self.command} (pid {self.pid} on host {self.host}{job}, since {self.started} UTC)"

    def alive(self) -> bool | None:
        """Whether the holder's process runs: True/False on this host, None (unknown) on another."""
        if self.host != socket.gethostname():
            return None
        return pid_alive(self.pid)


class RunLocked(RuntimeError):
    """Another process holds the run folder's lock."""

    def __init__(self, folder: Path, holder: Holder, hint: str) -> None:
        self.folder, self.holder = folder, holder
        super().__init__(
            f"{folder} is being written by {holder.describe()}: one writer per run folder. {hint}"
        )


def this_process(command: str) -> Holder:
    """A :class:`Holder` describing the calling process."""
    return Holder(socket.gethostname(), os.getpid(), slurm_job_id(), timestamp(), command)


def read_holder(folder: str | os.PathLike) -> Holder | None:
    """The holder recorded in ``<folder>/.lock``, or None when there is no lock (or it is unreadable:
    a lock is written atomically, so an unreadable one was not written by this module)."""
    try:
        data = json.loads((Path(folder) / LOCK_NAME).read_text())
        return Holder(
            str(data["host"]), int(data["pid"]), data["slurm_job"], str(data["started"]), str(data["command"])
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


@contextlib.contextmanager
def _guard(folder: Path) -> Iterator[None]:
    descriptor = os.open(folder / GUARD_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # releases the flock


def _is_self(holder: Holder, me: Holder) -> bool:
    return holder.host == me.host and holder.pid == me.pid


def acquire(folder: str | os.PathLike, command: str, log: logging.Logger | None = None) -> Holder:
    """Take the lock of run folder ``folder`` (created if absent) for this process; returns the holder
    written. Raises :class:`RunLocked` when another live (or uncheckable) process holds it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    me = this_process(command)
    with _guard(folder):
        holder = read_holder(folder)
        if holder is not None and not _is_self(holder, me):
            alive = holder.alive()
            same_job = holder.slurm_job is not None and holder.slurm_job == me.slurm_job
            if alive:
                raise RunLocked(folder, holder, "Wait for it to end, or stop it first.")
            if alive is None and not same_job:
                raise RunLocked(
                    folder,
                    holder,
                    f"Its host cannot be checked from {me.host}; if that process is gone, delete "
                    f"{folder / LOCK_NAME}.",
                )
            reason = "the same SLURM job, requeued" if same_job else "its process has ended"
            (log or logger).warning(f"taking over the lock of {folder} from {holder.describe()}: {reason}")
        write_atomically(folder / LOCK_NAME, lambda tmp: tmp.write_text(json.dumps(asdict(me))), what="lock")
    return me


def release(folder: str | os.PathLike) -> None:
    """Remove the lock of ``folder`` if this process holds it (another holder's lock is left alone)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    me = this_process("")
    with _guard(folder):
        holder = read_holder(folder)
        if holder is not None and _is_self(holder, me):
            (folder / LOCK_NAME).unlink(missing_ok=True)
