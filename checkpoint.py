"""Training snapshots: atomic save, newest-snapshot lookup, exact resume, loading for evaluation.

A snapshot (``<run folder>/snapshots/<step>.pth``, the official naming) is a dict::

    {"format": SNAPSHOT_FORMAT, "step": int, "model": state_dict, "optimizer": state_dict,
     "scheduler": state_dict, "rng": {"python", "numpy", "torch", "cuda"}, "config": dict}

plus, for a ``torchrun`` run, ``"rng_ranks"``: every rank's RNG state (``rng`` is rank 0's).

``step`` is the number of optimisation steps already taken, which is also the index of the next episode
to draw: the training episodes are a deterministic function of ``(seed, episode index)``, so the
DataLoader position is restored by starting its sampler at ``step * batch_size``.

Evaluation also accepts an official-layout checkpoint: a plain model ``state_dict`` (what the official
``train.py`` writes).
"""

from __future__ import annotations

import os
import pickle
import random
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

SNAPSHOT_FORMAT = "difd-snapshot-v1"
_SNAPSHOT_NAME = re.compile(r"^(\d+)\.pth$")


def capture_rng_state() -> dict[str, Any]:
    """The global random states a training step consumes (Python, NumPy, torch CPU, every CUDA device)."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),  # noqa: NPY002 (the legacy global state is what is saved)
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (CUDA states are restored only when CUDA is present)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])  # noqa: NPY002 (restores the legacy global state)
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_snapshot(
    path: str | os.PathLike,
    *,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    config: dict[str, Any],
    rng_ranks: list[dict[str, Any]] | None = None,
) -> Path:
    """Write a snapshot atomically: a temporary file in the same folder, then ``os.replace``.

    ``rng_ranks``: the RNG states of every rank of a distributed run (rank order), stored as ``rng_ranks``.

    A run killed while writing therefore never leaves a truncated ``<step>.pth`` behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": SNAPSHOT_FORMAT,
        "step": int(step),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": capture_rng_state(),
        "config": config,
    }
    if rng_ranks is not None:
        payload["rng_ranks"] = rng_ranks
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def list_snapshots(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``<step>.pth`` in ``folder``, sorted by step (missing folder: empty list)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        match = _SNAPSHOT_NAME.match(entry.name)
        if match and entry.is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def latest_snapshot(folder: str | os.PathLike) -> Path | None:
    """The snapshot with the highest step in ``folder``, or None when there is none."""
    snapshots = list_snapshots(folder)
    return snapshots[-1][1] if snapshots else None


def load_snapshot(path: str | os.PathLike) -> dict[str, Any]:
    """Read one of our snapshots (all fields, for resuming); anything else is a ``ValueError``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"snapshot not found: {path}")
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(payload, dict) or payload.get("format") != SNAPSHOT_FORMAT:
        raise ValueError(
            f"{path} is not a resumable snapshot of this project (expected format {SNAPSHOT_FORMAT!r}); "
            "official-layout weights can be evaluated with test.py but not resumed"
        )
    return payload


def model_state_from_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model ``state_dict`` of one of our snapshots or of an official-layout checkpoint.

    An official checkpoint is a plain ``state_dict``; a ``module.`` prefix (weights saved from a
    ``DataParallel``/``DistributedDataParallel`` wrapper) is removed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model checkpoint not found (config key 'reload_model_path'): {path}")
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(payload, dict) and payload.get("format") == SNAPSHOT_FORMAT:
        state = payload["model"]
    elif isinstance(payload, dict) and payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
        state = payload
    else:
        raise ValueError(
            f"{path}: expected one of this project's snapshots or a plain model state_dict "
            "(official layout), "
            f"found a {type(payload).__name__}"
        )
    if all(key.startswith("module.") for key in state):
        state = {key[len("module.") :]: value for key, value in state.items()}
    return state


def load_model_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a checkpoint into ``model`` (strict: every parameter must match by name and shape)."""
    state = model_state_from_file(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        hint = ""
        if "merge" in str(err):
            hint = (
                "\nhint: the decoders' first convolution differs; checkpoints trained with 1027-channel "
                "decoders (2C+3) need decoder_extra_maps=True, ours default to 2C+1"
            )
        raise ValueError(f"cannot load {path} into the model: {err}{hint}") from err


def recorded_config(path: str | os.PathLike) -> dict[str, Any] | None:
    """The config that a checkpoint records (one of our snapshots), or None when it records none (a plain
    ``state_dict``, e.g. an official checkpoint).

    Zip-format files (every ``torch.save`` since torch 1.6) are memory-mapped, so the weights are not read.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model checkpoint not found (config key 'reload_model_path'): {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False, mmap=zipfile.is_zipfile(path))
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as err:
        raise ValueError(f"cannot read the checkpoint {path}: {err}") from err
    config = payload.get("config") if isinstance(payload, dict) else None
    return dict(config) if isinstance(config, dict) else None
