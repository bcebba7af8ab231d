"""Verified reading of PyTorch files (snapshots, official state dicts, pretrained weights).

A PyTorch file is a zip archive whose members carry CRC-32s that ``torch.load`` never checks: a flipped bit in
a tensor loads silently. :func:`verify_checkpoint_file` reads every member once with its CRC-32 checked, and
:func:`load_torch_file` is ``torch.load`` after that check, with torch's internal messages turned into
errors that name the file. Imports only the standard library and torch, so that the model package, the
snapshot writer and the scripts share it.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

#: Bytes read at a time when checking a zip member's CRC-32.
_CHUNK = 1 << 24


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


def load_torch_file(
    path: str | os.PathLike, what: str = "checkpoint", weights_only: bool = True, mmap: bool = False
) -> Any:
    """``torch.load`` on the CPU after :func:`verify_checkpoint_file`; failures name ``what`` and the file.

    ``weights_only=True`` (tensors and plain containers only) for files from elsewhere; this project's own
    snapshots hold optimiser and RNG states and are read with ``weights_only=False``. ``mmap`` maps a
    zip-format file instead of reading its tensors.
    """
    path = Path(path)
    verify_checkpoint_file(path, what)
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=mmap)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, AttributeError, OSError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot read {what} {path}: {reason}") from err
