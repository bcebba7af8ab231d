"""The pretrained encoder files: where ``train.py`` looks for them (config keys ``pretrained_weights`` and
``pretrained_path``), and their download with the SHA-256 checked (``python script/launch.py weights``)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from models.encoder import PRETRAINED
from utils import DownloadError, download_checked

#: Environment variable: a base address that replaces ``https://download.pytorch.org/models/`` for the
#: pretrained files (a site mirror, or a ``file://`` folder holding torchvision's files).
WEIGHTS_MIRROR_ENV = "DIFD_WEIGHTS_MIRROR"

#: The command that puts the pretrained files where :func:`resolve_pretrained_path` looks for them.
WEIGHTS_COMMAND = "python script/launch.py weights"


def default_pretrained_path(pretrained_weights: str) -> Path:
    """torchvision's file name for ``pretrained_weights`` in ``torch.hub.get_dir()/checkpoints``."""
    return Path(torch.hub.get_dir()).expanduser() / "checkpoints" / PRETRAINED[pretrained_weights].file_name


def pretrained_url(pretrained_weights: str, mirror: str | None = None) -> str:
    """Where the file of ``pretrained_weights`` is downloaded from: torchvision's address, or the same file
    name under ``mirror`` (default ``$DIFD_WEIGHTS_MIRROR``) when one is given."""
    mirror = mirror or os.environ.get(WEIGHTS_MIRROR_ENV) or None
    entry = PRETRAINED[pretrained_weights]
    return entry.url if mirror is None else f"{mirror.rstrip('/')}/{entry.file_name}"


def fetch_pretrained(pretrained_weights: str, path: str | os.PathLike, mirror: str | None = None) -> Path:
    """Download the file of ``pretrained_weights`` to ``path`` with a progress bar, its SHA-256 checked
    against the prefix in torchvision's file name (:func:`utils.download_checked`: nothing is left behind
    when the download fails or the hash differs). Raises :class:`utils.DownloadError`."""
    entry = PRETRAINED[pretrained_weights]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return download_checked(pretrained_url(pretrained_weights, mirror), path, entry.sha256_prefix)


def resolve_pretrained_path(
    pretrained_weights: str | None, pretrained_path: str | None, download: bool = False
) -> Path | None:
    """The local checkpoint file for ``pretrained_weights``, checked to exist (None when no weights).

    ``pretrained_path`` None means torchvision's file name in ``torch.hub.get_dir()/checkpoints``; with
    ``download`` that file is fetched when it is absent (:func:`fetch_pretrained`), so a machine with
    internet needs no step of its own. A missing file is a ``FileNotFoundError`` that says the one command
    to run and where the file must go.
    """
    if pretrained_weights is None:
        return None
    if pretrained_weights not in PRETRAINED:
        raise ValueError(
            f"pretrained_weights: expected None or one of {sorted(PRETRAINED)}, found {pretrained_weights!r}"
        )
    default = default_pretrained_path(pretrained_weights)
    path = Path(pretrained_path).expanduser() if pretrained_path else default
    if path.is_file():
        return path
    failed = ""
    if download and not pretrained_path:
        try:
            return fetch_pretrained(pretrained_weights, path)
        except DownloadError as err:
            failed = f"; downloading it failed: {err}"
    raise FileNotFoundError(
        f"pretrained checkpoint for pretrained_weights={pretrained_weights!r} not found: {path}{failed}. "
        f"On a machine with internet run `{WEIGHTS_COMMAND} --kind {pretrained_weights}` (it downloads "
        f"{PRETRAINED[pretrained_weights].url} to {default}) and make the file available here at {default}, "
        "or pass its location with pretrained_path=... (or run with pretrained_weights=None for a randomly "
        "initialised encoder)"
    )
