"""Process-level helpers: seeding, device resolution and the data-root resolver.

These are the only places where global random state is touched or where a device name is turned into a
``torch.device``; library code (``models/``, ``dataloaders/``) takes its device from its inputs and its
randomness from local generators.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
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
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - legacy global state is what third-party code draws from
    torch.manual_seed(seed)  # also seeds every CUDA device
    torch.backends.cudnn.deterministic = bool(deterministic)
    torch.backends.cudnn.benchmark = not deterministic


def resolve_device(name: str = "auto") -> torch.device:
    """Turn a configured device name into a ``torch.device``.

    ``'auto'`` gives CUDA when available, else the CPU. An explicit CUDA device on a machine without CUDA
    is an error rather than a silent fallback, so a run never trains for hours on the wrong device.
    """
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
