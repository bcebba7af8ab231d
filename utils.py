"""The bottom layer: seeding, device resolution, the data-root resolver, the one atomic file write and the
checked download built on it.

These are the only places where global random state is touched or where a device name is turned into a
``torch.device``; library code (``models/``, ``dataloaders/``) takes its device from its inputs and its
randomness from local generators. This module imports nothing of the project, so every layer above may use
it (``models/`` does not: it stays self-contained).

Every file the project writes (snapshots, NIfTI volumes, JSON, PNG pictures) goes through
:func:`write_atomically`: a hidden temporary beside the target, flushed to disk, optionally verified, then
renamed onto the target, so a reader never sees a half-written file and a process killed while writing
leaves only a temporary that :func:`remove_stale_temporaries` recognises.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import re
import shutil
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np

if TYPE_CHECKING:
    import torch

#: Environment variable consulted by :func:`resolve_data_root` when no data root is configured.
DATA_ROOT_ENV = "DIFD_DATA_ROOT"

#: ``../shared/data`` beside the checkout: the offline copy of the preprocessed datasets.
DEFAULT_DATA_ROOT = Path(__file__).resolve().parent.parent / "shared" / "data"


def set_seed(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device) from one integer.

    ``deterministic`` switches ``cudnn.deterministic`` on and ``cudnn.benchmark`` off together (and the
    reverse when False), never the contradictory pair the official code sets.
    """
    import torch  # here, not at the top: the file helpers below serve tools that start without torch

    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - legacy global state is what third-party code draws from
    torch.manual_seed(seed)  # also seeds every CUDA device
    torch.backends.cudnn.deterministic = bool(deterministic)
    torch.backends.cudnn.benchmark = not deterministic


#: A user's mistake as a command meets it (a wrong path, a missing folder, a bad value): one line.
USER_ERRORS = (ValueError, OSError)


def run_cli(main: Callable[..., Any], prog: str, argv: list[str] | None = None) -> NoReturn:
    """Run a command's ``main`` and exit: its status (an int; anything else is 0), or, for a
    :data:`USER_ERRORS` exception, ``<prog>: error: <message>`` on stderr and status 1, never a traceback
    (argparse answers a bad option itself, with status 2). A full disk says so and what to do."""
    try:
        code = main() if argv is None else main(argv)
    except USER_ERRORS as err:
        full = disk_full(err)
        sys.exit(f"{prog}: error: {full}; free space and run it again" if full else f"{prog}: error: {err}")
    sys.exit(code if isinstance(code, int) else 0)


def capture_rng_state() -> dict[str, Any]:
    """The global random states a training step consumes (Python, NumPy, torch CPU, every CUDA device).

    Tensors and plain types only (a snapshot is read with ``weights_only=True``): NumPy's state is
    ``(name, key as a list of ints, pos, has_gauss, cached_gaussian)``.
    """
    import torch

    name, key, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002 (the legacy global state)
    return {
        "python": random.getstate(),
        "numpy": (str(name), key.tolist(), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (CUDA states are restored only when CUDA is present)."""
    import torch

    random.setstate(state["python"])
    name, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), pos, has_gauss, cached))  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resolve_device(name: str = "auto") -> torch.device:
    """Turn a configured device name into a ``torch.device``.

    ``'auto'`` gives CUDA when available, else the CPU. An explicit CUDA device on a machine without CUDA
    is an error rather than a silent fallback, so a run never trains for hours on the wrong device.
    """
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"device: expected 'auto', 'cpu' or 'cuda[:N]', got {name!r}") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"device={name!r} was requested but CUDA is not available on this machine "
                "(use device='auto' or device='cpu')"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(
                f"device={name!r} was requested but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    return device


def resolve_data_root(configured: str | os.PathLike | None = None) -> Path:
    """Find the folder that holds ``CHAOST2/``, ``SABS/`` and ``CMR/``.

    Precedence: the configured value (config key ``data_root``), then the ``DIFD_DATA_ROOT`` environment
    variable, then ``../shared/data`` beside the checkout when it exists. A configured or environment path
    that does not exist is an error (it is never silently replaced by the next candidate).
    """
    if configured not in (None, ""):
        path = Path(configured).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"data root from the config key 'data_root' does not exist: {path}")
        return path
    from_env = os.environ.get(DATA_ROOT_ENV, "")
    if from_env:
        path = Path(from_env).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(
                f"data root from the environment variable {DATA_ROOT_ENV} does not exist: {path}"
            )
        return path
    if DEFAULT_DATA_ROOT.is_dir():
        return DEFAULT_DATA_ROOT
    raise FileNotFoundError(
        "no data root found: set the config key 'data_root' (e.g. `python train.py with data_root=/path`), "
        f"or the environment variable {DATA_ROOT_ENV}, or place the data at {DEFAULT_DATA_ROOT}"
    )


#: ``.<name>.tmp<pid>`` (plus the name's suffixes where the writer picks the format by them): the hidden
#: temporary of :func:`write_atomically`.
_TEMPORARY = re.compile(r"^\.(?P<name>.+?)\.tmp(?P<pid>\d+)(?P<suffix>(\.[^.]+)*)$")

logger = logging.getLogger(__name__)


def temporary_path(path: str | os.PathLike, keep_suffix: bool = False) -> Path:
    """The hidden temporary of ``path`` for this process: ``.<name>.tmp<pid>``; with ``keep_suffix`` the
    name's suffixes follow (``.pred.nii.gz.tmp7.nii.gz``), for writers that pick the format by the name."""
    path = Path(path)
    suffix = "".join(path.suffixes) if keep_suffix else ""
    return path.with_name(f".{path.name}.tmp{os.getpid()}{suffix}")


def write_atomically(
    path: str | os.PathLike,
    write: Callable[[Path], None],
    *,
    what: str = "file",
    verify: Callable[[Path], None] | None = None,
    keep_suffix: bool = False,
    needs: int | None = None,
) -> Path:
    """Write ``path`` through its hidden temporary: ``write(tmp)`` writes the content, which is flushed to
    disk and checked by ``verify(tmp)`` (when given) before ``os.replace`` puts it in place; the folder is
    synced so that the rename survives a crash.

    ``write`` may also make a folder (e.g. a set of pictures): it then replaces an existing folder of that
    name, whose old contents go just before the new ones arrive (a folder cannot be swapped in one step).
    A failure removes the temporary and leaves an existing ``path`` as it was; an ``OSError`` (disk full,
    ...) is raised again as ``OSError`` naming ``what``, the file and the cause; a full disk (``ENOSPC``,
    ``EDQUOT``) adds the folder's free space and what the file needs (``needs`` bytes where the caller knows
    it, else at least what was written when the write failed). Returns ``path``.
    """
    path = Path(path)
    tmp = temporary_path(path, keep_suffix)
    try:
        write(tmp)
        if tmp.is_dir():
            if path.is_dir():
                shutil.rmtree(path)
        else:
            with tmp.open("rb+") as stream:
                os.fsync(stream.fileno())
            if verify is not None:
                verify(tmp)
        os.replace(tmp, path)
    except OSError as err:
        if not err.errno:  # a message of our own (a writer that failed), kept as it is
            raise OSError(f"cannot write {what} {path}: {err}") from err
        cause = err.strerror or os.strerror(err.errno)
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            cause += _space_note(path.parent, tmp, needs)
        raise OSError(err.errno, f"cannot write {what} {path}: {cause}") from err
    finally:
        _remove(tmp)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return path


def disk_full(err: BaseException | None) -> str | None:
    """What a full disk (or an exhausted quota) said, where ``err`` or an error it was raised from is
    one (the message without its ``[Errno 28]``); None otherwise."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return err.strerror or str(err)
        err = err.__cause__
    return None


def _size(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:.1f} MiB" if n_bytes >= 2**20 else f"{n_bytes / 2**10:.0f} KiB"


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _space_note(folder: Path, tmp: Path, needs: int | None) -> str:
    """``' (<folder> has X MiB free; the file needs ...)'`` for a write that found the disk full: the free
    space once the temporary is gone."""
    try:
        written = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file()) if tmp.is_dir() else 0
        written = written or (tmp.stat().st_size if tmp.is_file() else 0)
        _remove(tmp)
        free = shutil.disk_usage(folder).free
    except OSError:
        return ""
    if needs:
        return f" ({folder} has {_size(free)} free; the file needs about {_size(needs)})"
    if written:
        return f" ({folder} has {_size(free)} free; the file needs more than the {_size(written)} written)"
    return f" ({folder} has {_size(free)} free)"


def utc_now() -> datetime:
    """The current UTC time without a time zone, as Sacred records its run times."""
    return datetime.now(UTC).replace(tzinfo=None)


def timestamp() -> str:
    """:func:`utc_now` as ISO text to the second: the time stamp of the project's own records (locks,
    launch.json, grid.json)."""
    return utc_now().isoformat(timespec="seconds")


class DownloadError(RuntimeError):
    """A download that failed (unreachable address, dropped connection, hash mismatch); nothing was
    written."""


def download_checked(
    url: str, path: str | os.PathLike, sha256_prefix: str, timeout_s: float = 30.0, progress: bool = True
) -> Path:
    """Download ``url`` (``https://``, ``file://`` ...) to ``path`` through ``torch.hub`` with a progress
    bar, its SHA-256 required to start with ``sha256_prefix``, through :func:`write_atomically`.

    A download that fails half-way, or whose hash differs (a damaged or truncated file: a dropped
    connection can end the stream early without an error), raises :class:`DownloadError` and leaves no
    file behind. ``timeout_s`` bounds each network wait, so a machine whose network drops packets fails
    instead of hanging.
    """
    import http.client
    import socket
    import urllib.error

    import torch

    if not sha256_prefix:
        raise ValueError(f"download of {url}: a SHA-256 prefix is required, so that the file is checked")

    def fetch(tmp: Path) -> None:
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(timeout_s)
        try:
            torch.hub.download_url_to_file(url, str(tmp), hash_prefix=sha256_prefix, progress=progress)
        except RuntimeError as err:  # torch.hub's hash check
            raise DownloadError(f"{url}: {err} (a damaged, truncated or other file); none kept") from err
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as err:
            reason = getattr(err, "reason", None) or err
            raise DownloadError(f"cannot download {url}: {reason}") from err
        finally:
            socket.setdefaulttimeout(previous)

    return write_atomically(path, fetch, what="downloaded file")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def remove_stale_temporaries(
    folder: str | os.PathLike, log: logging.Logger | None = None, recursive: bool = False
) -> list[Path]:
    """Delete the temporaries (files or folders) of :func:`write_atomically` that processes killed while
    writing left in ``folder`` (with ``recursive``, in its subfolders too); returns the removed paths.

    A temporary whose process still runs on this machine is kept; this process's own pid counts as dead
    (call it before this process writes: a leftover with its pid is from an earlier process that had the
    same id). Only the folders of one writer (a run folder under its lock, an output folder) are swept: a
    process of another machine that writes there is not seen.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    entries = sorted(folder.rglob(".*") if recursive else folder.iterdir())
    for entry in entries:
        match = _TEMPORARY.match(entry.name)
        if match is None or any(entry.is_relative_to(gone) for gone in removed):
            continue
        pid = int(match.group("pid"))
        if pid != os.getpid() and pid_alive(pid):
            continue
        if entry.is_dir() and not entry.is_symlink():
            size = sum(p.stat().st_size for p in entry.rglob("*") if p.is_file())
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.is_file():
            size = entry.stat().st_size
            entry.unlink(missing_ok=True)
        else:
            continue
        removed.append(entry)
        (log or logger).warning(
            f"removed {entry} ({size / 2**20:.0f} MiB), left by process {pid} that died while writing "
            f"{match.group('name')}"
        )
    return removed
