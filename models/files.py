"""Verified reading of PyTorch files (snapshots, official state dicts, pretrained weights).

A PyTorch file is a zip archive whose members carry CRC-32s that ``torch.load`` never checks: a flipped bit in
a tensor loads silently. :func:`verify_checkpoint_file` reads every member once with its CRC-32 checked, and
:func:`load_torch_file` is ``torch.load`` after that check, with torch's internal messages turned into
errors that name the file. Imports only the standard library and torch, so that the model package, the
snapshot writer and the scripts share it.

A checkpoint is data, never code: every file is read with ``weights_only=True`` (tensors and plain
containers; a pickle naming any other global, which could run code on load, is refused before anything
of it runs). This project's snapshots hold nothing else (``utils.capture_rng_state`` stores the RNG states
as tensors and plain lists). A file that holds more is refused with :class:`UntrustedCheckpoint`, naming
the types it asks for and the one-off conversion (:mod:`engine.convert_checkpoint`) for a file its user
trusts; :func:`load_trusted_torch_file` is the only ``weights_only=False`` read, for that conversion.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

#: Bytes read at a time when checking a zip member's CRC-32.
_CHUNK = 1 << 24
#: The one-off command that rewrites a trusted file as plain data (see :mod:`engine.convert_checkpoint`).
CONVERT_COMMAND = "python -m engine.convert_checkpoint --trust-this-file"
#: The global torch's weights-only unpickler names when it refuses one.
_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


class UntrustedCheckpoint(ValueError):
    """A file whose pickle asks for more than tensors and plain types (it could run code on load)."""


def verify_checkpoint_file(path: str | os.PathLike, what: str = "checkpoint") -> None:
    """Check that ``path`` is a whole PyTorch file: every zip member's CRC-32 (reads the whole file).

    Raises ``FileNotFoundError``, or ``ValueError`` naming the file for a truncated or damaged zip archive
    or a file that is no PyTorch checkpoint. Files of torch's legacy (pre-1.6, pickle) format have no
    checksum and pass; members written without a CRC-32 (``torch.serialization.set_crc32_options(False)``
    stores 0) are not checked.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    with path.open("rb") as stream:
        magic = stream.read(4)
    if magic[:1] == b"\x80":  # legacy pickle format: nothing to verify
        return
    if magic != b"PK\x03\x04":
        raise ValueError(f"cannot read {what} {path}: not a PyTorch checkpoint (starts with {magic!r})")
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.infolist():
                if member.CRC == 0 and member.file_size > 0:
                    continue
                with archive.open(member) as data:
                    while data.read(_CHUNK):
                        pass
    except (zipfile.BadZipFile, EOFError, OSError) as err:
        cause = "truncated" if "zip file" in str(err) else f"damaged ({err})"
        raise ValueError(f"cannot read {what} {path}: the file is {cause}") from err


def refused_globals(path: Path, err: Exception) -> list[str]:
    """The globals (``module.name``) beyond tensors and plain types that the pickle of ``path`` names,
    read without running it; for torch's legacy format, the one its unpickler refused (``err``)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (ValueError, RuntimeError, OSError, pickle.UnpicklingError):
        names = []
    return names or _REFUSED_GLOBAL.findall(str(err))[:1] or ["an object torch does not read as data"]


def check_plain_data(path: str | os.PathLike, what: str = "checkpoint") -> None:
    """Raise :class:`UntrustedCheckpoint` when the pickle of zip-format ``path`` names any global beyond
    tensors and plain types; reads the pickle's opcodes only (nothing of it runs, no tensor is read), so
    that a command refuses such a file before any work. Other failures are left to the full read."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        return
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (ValueError, RuntimeError, OSError, pickle.UnpicklingError):
        return
    if names:
        raise _untrusted(path, what, names)


def _untrusted(path: Path, what: str, names: list[str]) -> UntrustedCheckpoint:
    return UntrustedCheckpoint(
        f"refused to read {what} {path}: it holds {', '.join(names)}, not only tensors and plain types (a "
        f"pickled object can run code when loaded); if the file is your own and trusted, convert it once "
        f"with `{CONVERT_COMMAND} {path}`"
    )


def load_torch_file(path: str | os.PathLike, what: str = "checkpoint", mmap: bool = False) -> Any:
    """``torch.load`` on the CPU with ``weights_only=True`` after :func:`verify_checkpoint_file`; failures
    name ``what`` and the file.

    A pickle asking for any global beyond tensors and plain containers raises :class:`UntrustedCheckpoint`
    (one line: the file, the types it holds, the conversion command for a trusted file); nothing of such a
    pickle runs. ``mmap`` maps a zip-format file instead of reading its tensors.
    """
    path = Path(path)
    verify_checkpoint_file(path, what)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        if "weights only" not in str(err).lower():
            raise ValueError(f"cannot read {what} {path}: {_first_line(err)}") from err
        raise _untrusted(path, what, refused_globals(path, err)) from None
    except (RuntimeError, EOFError, ValueError, AttributeError, OSError) as err:
        raise ValueError(f"cannot read {what} {path}: {_first_line(err)}") from err


def load_trusted_torch_file(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    """``torch.load`` with ``weights_only=False``: runs whatever the file's pickle says. Only for the
    one-off conversion of a file its user has vouched for (:mod:`engine.convert_checkpoint`)."""
    path = Path(path)
    verify_checkpoint_file(path, what)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)  # the user's explicit request
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, AttributeError, OSError) as err:
        raise ValueError(f"cannot read {what} {path}: {_first_line(err)}") from err


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
