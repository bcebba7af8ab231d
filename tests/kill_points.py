"""SIGKILL at a named moment of a command, in a forked copy of the test process (no Python start-up).

:func:`run_forked` forks, runs ``work()`` in the child and returns how the child ended. With a
:class:`KillAt`, the child first wraps one function so that at its ``n``-th matching call the child sends
itself SIGKILL: no handler, ``finally`` or ``atexit`` runs, exactly as when the OOM killer or a lost node
ends a process, but at a moment chosen by the test. With a :class:`FillAt`, the child fills the test's
small filesystem at a chosen write instead (a full disk). The wrappers exist only in the child: the commands
carry no test hook. Where a file is being written (``*_half``), half of its bytes reach the disk first
(flushed and synced), as a kill in the middle of the write leaves them.

Points (``where``):

* ``step``: after the ``n``-th training step (weights updated in memory, not saved);
* ``validation``: between the label-free and the organ validation;
* ``torch_save_half``: half of the ``n``-th ``torch.save`` (a snapshot, or its weights-only rewrite);
* ``picture_half``: half of the ``n``-th ``progress.png`` (matplotlib ``savefig``);
* ``record_half``: half of the temporary of the ``n``-th Sacred JSON record (``run.json``, ...);
* ``before_rename`` / ``after_rename``: just before / after the ``n``-th ``os.replace`` onto a file
  whose name ends with ``match`` (the temporary complete but not in place; in place, but the folder not yet
  synced and the next step, e.g. the keep policy, not done);
* ``prediction``: after the ``n``-th per-query output of ``test.py`` (``engine.evaluation.evaluate_class``'s
  callback) or label map of ``segment.py``.
"""

from __future__ import annotations

import io
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2


@dataclass(frozen=True)
class KillAt:
    where: str
    n: int = 1
    match: str = ""

    def __str__(self) -> str:
        return f"{self.where}#{self.n}{f' ({self.match})' if self.match else ''}"


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _countdown(n: int) -> Callable[[], bool]:
    """A function that answers True at its ``n``-th call."""
    calls = [0]

    def hit() -> bool:
        calls[0] += 1
        return calls[0] == n

    return hit


def _write_half(target: Any, data: bytes) -> None:
    if isinstance(target, str | os.PathLike):
        with open(target, "wb") as stream:
            _write_half(stream, data)
        return
    target.write(data[: len(data) // 2])
    target.flush()
    os.fsync(target.fileno())


def _everywhere(original: Callable, wrapper: Callable) -> None:
    """Put ``wrapper`` in place of ``original`` in every loaded module that holds it (the scripts import
    functions by name)."""
    for module in list(sys.modules.values()):
        for name, value in list(getattr(module, "__dict__", {}).items()):
            if value is original:
                setattr(module, name, wrapper)


def _after(original: Callable, hit: Callable[[], bool]) -> None:
    """``original`` everywhere, followed by the kill at the chosen call."""

    def then_die(*args, **kwargs):
        out = original(*args, **kwargs)
        if hit():
            _die()
        return out

    _everywhere(original, then_die)


def arm(kill: KillAt) -> None:
    """Install the wrapper of ``kill`` (in the child)."""
    hit = _countdown(kill.n)
    where = kill.where
    if where == "step":
        import engine.runtime as runtime

        _after(runtime.training_step, hit)
    elif where == "validation":
        import engine.label_free as label_free

        _after(label_free.label_free_scores, hit)
    elif where == "torch_save_half":
        import torch

        save = torch.save

        def torch_save(obj, f, *args, **kwargs):
            if not hit():
                return save(obj, f, *args, **kwargs)
            buffer = io.BytesIO()
            save(obj, buffer, *args, **kwargs)
            _write_half(f, buffer.getvalue())
            _die()

        torch.save = torch_save
    elif where == "picture_half":
        from matplotlib.figure import Figure

        savefig = Figure.savefig

        def figure_savefig(self, fname, *args, **kwargs):
            if not hit():
                return savefig(self, fname, *args, **kwargs)
            buffer = io.BytesIO()
            savefig(self, buffer, *args, **kwargs)
            _write_half(fname, buffer.getvalue())
            _die()

        Figure.savefig = figure_savefig
    elif where == "record_half":
        import json

        from engine.observer import AtomicFileStorageObserver
        from utils import temporary_path

        save_json = AtomicFileStorageObserver.save_json

        def observer_save_json(self, obj, filename):
            if not hit():
                return save_json(self, obj, filename)
            text = json.dumps(obj, default=str, indent=2).encode()
            _write_half(temporary_path(Path(self.dir) / filename), text)
            _die()

        AtomicFileStorageObserver.save_json = observer_save_json
    elif where in ("before_rename", "after_rename"):
        replace = os.replace

        def os_replace(src, dst, *args, **kwargs):
            if not str(dst).endswith(kill.match) or not hit():
                return replace(src, dst, *args, **kwargs)
            if where == "after_rename":
                replace(src, dst, *args, **kwargs)
            _die()

        os.replace = os_replace
    elif where == "prediction":
        import engine.evaluation as evaluation
        import inference.outputs as outputs

        evaluate_class = evaluation.evaluate_class

        def evaluate_then_die(*args, on_query=None, **kwargs):
            def on_each(*query_args):
                on_query(*query_args)
                if hit():
                    _die()

            return evaluate_class(*args, on_query=on_each if on_query else None, **kwargs)

        _everywhere(evaluate_class, evaluate_then_die)
        _after(outputs.write_label_map, hit)
    else:
        raise ValueError(f"unknown kill point {where!r}")


@dataclass(frozen=True)
class FillAt:
    """Fill the disk of ``folder`` (a small filesystem of the test's), leaving ``leave`` bytes free, just
    before the ``n``-th :func:`utils.write_atomically` onto a path whose name ends with ``match``."""

    folder: Path
    match: str
    n: int = 1
    leave: int = 4096

    def __str__(self) -> str:
        return f"full disk before {self.match}#{self.n}"


BALLAST = "ballast"


def fill_disk(folder: Path, leave: int) -> None:
    """Write ``folder/ballast`` until the filesystem has about ``leave`` bytes free."""
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    with open(folder / BALLAST, "ab") as stream:
        stream.write(b"\0" * max(0, free - leave))
        stream.flush()
        os.fsync(stream.fileno())


def arm_fill(fill: FillAt) -> None:
    """Install the wrapper of ``fill`` (in the child)."""
    import utils

    hit = _countdown(fill.n)
    write_atomically = utils.write_atomically

    def fill_then_write(path, *args, **kwargs):
        if str(path).endswith(fill.match) and hit():
            fill_disk(fill.folder, fill.leave)
        return write_atomically(path, *args, **kwargs)

    _everywhere(write_atomically, fill_then_write)


def run_forked(
    work: Callable[[], Any], kill: KillAt | FillAt | None, log: Path, kill_after: float | None = None
) -> int:
    """Run ``work()`` in a forked child (stdout and stderr to ``log``), killed at ``kill`` or by the parent
    ``kill_after`` seconds after the fork; returns the child's exit code as
    ``os.waitstatus_to_exitcode`` gives it (0 done, 1 an exception, -9 killed)."""
    sys.stdout.flush()
    sys.stderr.flush()
    # OpenCV's thread pool, alive in this process when an earlier test used it (a pytest-xdist worker runs
    # many files), must not be copied into the child: there cv2.setNumThreads waits forever on the copied
    # pool (as train.py's DataLoader workers would; see train.episode_loader). One thread stops the pool.
    cv_threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    pid = os.fork()
    if pid != 0:
        cv2.setNumThreads(cv_threads)
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            descriptor = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            os.dup2(descriptor, 1)
            os.dup2(descriptor, 2)
            # pytest's capture replaced the Python streams: these write to the log.
            sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
            sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
            if isinstance(kill, FillAt):
                arm_fill(kill)
            elif kill is not None:
                arm(kill)
            work()
            code = 0
        except SystemExit as stop:  # as the interpreter ends a script that raised it
            if isinstance(stop.code, int):
                code = stop.code
            else:
                print(stop.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    if kill_after is not None:
        deadline = time.monotonic() + kill_after
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.01)
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)
