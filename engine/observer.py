"""The Sacred run folder's observer: Sacred's ``FileStorageObserver`` with its JSON files (``run.json``,
``config.json``, ``metrics.json``, ``info.json``) written through :func:`utils.write_atomically`.

Sacred rewrites them in place (``open(..., "w")``) at every heartbeat; a process killed then (SIGKILL from
the OOM killer or a lost node) would leave a truncated ``run.json`` or ``metrics.json`` that
``script/summarize.py``, ``script/plot_run.py`` and the launcher's status then fail to read. ``cout.txt``
is appended to, so a kill cuts at most its last line. :func:`remove_stale_run_temporaries` removes what
killed runs left in their run folders.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

from sacred.observers import FileStorageObserver
from sacred.serializer import flatten

from utils import remove_stale_temporaries, write_atomically


class AtomicFileStorageObserver(FileStorageObserver):
    """A ``FileStorageObserver`` whose JSON files are replaced atomically, never rewritten in place."""

    def save_json(self, obj: Any, filename: str) -> None:
        text = json.dumps(flatten(obj), sort_keys=True, indent=2)
        write_atomically(Path(self.dir) / filename, lambda tmp: tmp.write_text(text), what="Sacred record")


def remove_stale_run_temporaries(folder: str | os.PathLike, log: logging.Logger | None = None) -> list[Path]:
    """The temporaries that killed processes left in the Sacred run folders ``<folder>/<id>/`` of this
    machine (``run.json``'s host): a run of another machine may still be writing its own, and its process
    cannot be checked from here."""
    removed = []
    for run in sorted(Path(folder).glob("*/run.json")):
        try:
            host = json.loads(run.read_text())["host"]["hostname"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if host == socket.gethostname():
            removed += remove_stale_temporaries(run.parent, log, recursive=True)
    return removed
