"""The Sacred run folder's observer: Sacred's ``FileStorageObserver`` with its JSON files (``run.json``,
``config.json``, ``metrics.json``, ``info.json``) written through :func:`utils.write_atomically`.

Sacred rewrites them in place (``open(..., "w")``) at every heartbeat; a process killed then (SIGKILL from
the OOM killer or a lost node) would leave a truncated ``run.json`` or ``metrics.json`` that
``script/summarize.py``, ``script/plot_run.py`` and the launcher's status then fail to read. ``cout.txt``
is appended to, so a kill cuts at most its last line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sacred.observers import FileStorageObserver
from sacred.serializer import flatten

from utils import write_atomically


class AtomicFileStorageObserver(FileStorageObserver):
    """A ``FileStorageObserver`` whose JSON files are replaced atomically, never rewritten in place."""

    def save_json(self, obj: Any, filename: str) -> None:
        text = json.dumps(flatten(obj), sort_keys=True, indent=2)
        write_atomically(Path(self.dir) / filename, lambda tmp: tmp.write_text(text), what="Sacred record")
