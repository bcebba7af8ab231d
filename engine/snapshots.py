"""Training snapshots: the files a run writes, the keep policy, and resume from the newest intact one.

Kinds of file (``<run folder>/snapshots/<step>.pth``, the official naming; read by
:func:`models.read_model_checkpoint` too):

* full snapshot (``SNAPSHOT_FORMAT``), what resume needs::

      {"format", "step": int, "model": state_dict, "optimizer": state_dict, "scheduler": state_dict,
       "rng": {"python", "numpy", "torch", "cuda"}, "config": dict}

  plus, for a ``torchrun`` run, ``"rng_ranks"``: every rank's RNG state (``rng`` is rank 0's);
* weights-only snapshot (``WEIGHTS_FORMAT``): ``{"format", "step", "model", "config"}``, about half the size
  (SGD's momentum buffers are as large as the model); evaluation reads it, resume refuses it.

``step`` is the number of optimisation steps already taken, which is also the index of the next episode
to draw: the training episodes are a deterministic function of ``(seed, episode index)``, so the
DataLoader position is restored by starting its sampler at ``step * batch_size``.

Keep policy (:func:`apply_keep_policy`, run by :func:`save_snapshot` once the new file is written and
verified): while training, the two newest snapshots keep the resume state and older ones are rewritten as
weights-only, so a damaged newest snapshot still leaves one to resume from; when the run reaches ``n_steps``
the final snapshot becomes weights-only too (a finished run is not resumed) and the one before it keeps
its resume state, so a damaged final snapshot can be recomputed exactly from it. A 40000-step fold with a
snapshot every 10000 steps ends with 3 weights-only snapshots and 1 full one instead of 4 full ones.

Every write goes through :func:`utils.write_atomically` with the file's zip CRC-32s verified before the
rename; every read verifies them (:mod:`models.files`).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.files import UntrustedCheckpoint, load_torch_file, verify_checkpoint_file
from models.weights import SNAPSHOT_FORMAT, WEIGHTS_FORMAT, ModelCheckpoint, load_model_weights
from utils import capture_rng_state, restore_rng_state, write_atomically

_SNAPSHOT_NAME = re.compile(r"^(\d+)\.pth$")

logger = logging.getLogger(__name__)


def _write_torch(path: Path, payload: dict[str, Any], what: str) -> None:
    """``torch.save`` of ``payload`` onto ``path`` through :func:`utils.write_atomically`, verified."""

    def save(tmp: Path) -> None:
        with tmp.open("wb") as stream:
            torch.save(payload, stream)

    write_atomically(
        path,
        save,
        what=what,
        verify=lambda tmp: verify_checkpoint_file(tmp, what),
        needs=_tensor_bytes(payload),
    )


def _tensor_bytes(value: Any) -> int:
    """Bytes of the tensors in a (nested) payload: about the size of its file (named when the disk is
    full)."""
    if isinstance(value, torch.Tensor):
        return value.nbytes
    if isinstance(value, dict):
        return sum(_tensor_bytes(item) for item in value.values())
    if isinstance(value, list | tuple):
        return sum(_tensor_bytes(item) for item in value)
    return 0


def save_snapshot(
    path: str | os.PathLike,
    *,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    config: dict[str, Any],
    rng_ranks: list[dict[str, Any]] | None = None,
    final: bool = False,
) -> Path:
    """Write a full snapshot atomically and verified, then apply the keep policy to its folder.

    ``rng_ranks``: the RNG states of every rank of a distributed run (rank order), stored as ``rng_ranks``.
    ``final``: the run reached ``n_steps`` (this snapshot is demoted to weights-only as well). A run
    killed while writing never leaves a truncated ``<step>.pth``; a failed write raises ``OSError`` naming
    the file and the cause, with no temporary left and the older snapshots untouched.
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
    _write_torch(path, payload, "snapshot")
    apply_keep_policy(path.parent, int(step), final)
    return path


def demote_snapshot(path: str | os.PathLike) -> None:
    """Rewrite a full snapshot as weights-only (model, step, config), atomically; others are left alone."""
    path = Path(path)
    payload = load_torch_file(path, "snapshot", mmap=True)
    if not isinstance(payload, dict) or payload.get("format") != SNAPSHOT_FORMAT:
        return
    weights = {key: payload[key] for key in ("step", "model", "config")}
    _write_torch(path, {"format": WEIGHTS_FORMAT, **weights}, "weights-only rewrite of snapshot")


def apply_keep_policy(folder: str | os.PathLike, step: int, final: bool) -> list[Path]:
    """Demote the snapshots that no longer need the resume state (see the module docstring).

    Of the snapshots before ``step`` the newest keeps its resume state and the others become
    weights-only; with ``final`` the snapshot of ``step`` becomes weights-only too. Snapshots after
    ``step`` (left by an earlier attempt) are not touched, and an older snapshot that cannot be read is
    left as it is, with a warning. Returns the demoted paths.
    """
    snapshots = list_snapshots(folder)
    older = [path for s, path in snapshots if s < step]
    demoted = []
    for path in older[:-1] + ([path for s, path in snapshots if s == step] if final else []):
        try:
            demote_snapshot(path)
        except ValueError as err:
            logger.warning(f"keep policy: {path} left as it is: {err}")
            continue
        demoted.append(path)
    return demoted


def snapshot_disk_use(n_steps: int, every: int, full_bytes: int, weights_bytes: int) -> tuple[int, int]:
    """Bytes a run's snapshots take under the keep policy: ``(at the end, at most while training)``.

    Snapshots are written every ``every`` steps and at ``n_steps``: ``n`` files. At the end ``n - 1`` are
    weights-only and one (the one before the final) is full (a single snapshot is weights-only). While
    snapshot ``k`` is written, its temporary (full) exists beside the two newest full ones and the older
    weights-only ones, the most at ``k = n``.
    """
    n = len(range(every, n_steps, every)) + 1
    final = (n - 1) * weights_bytes + full_bytes if n > 1 else weights_bytes
    peak = (min(n - 1, 2) + 1) * full_bytes + max(0, n - 3) * weights_bytes
    return final, max(final, peak)


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


def read_snapshot(path: str | os.PathLike) -> dict[str, Any]:
    """One of our snapshots, full or weights-only, verified; anything else is a ``ValueError``."""
    path = Path(path)
    payload = load_torch_file(path, "snapshot")
    if not isinstance(payload, dict) or payload.get("format") not in (SNAPSHOT_FORMAT, WEIGHTS_FORMAT):
        raise ValueError(
            f"{path} is not a snapshot of this project (expected format {SNAPSHOT_FORMAT!r} or "
            f"{WEIGHTS_FORMAT!r}); official-layout weights can be evaluated with test.py but not resumed"
        )
    return payload


def load_snapshot(path: str | os.PathLike) -> dict[str, Any]:
    """Read one of our full snapshots (all fields, for resuming); anything else is a ``ValueError``."""
    payload = read_snapshot(path)
    if payload["format"] == WEIGHTS_FORMAT:
        raise ValueError(
            f"{path} holds the model weights only (step {payload['step']}; the keep policy keeps the "
            "optimiser state in the two newest snapshots of a run), so training cannot resume from it; "
            "it can be evaluated with test.py"
        )
    return payload


def _is_final(payload: dict[str, Any]) -> bool:
    return payload["format"] == WEIGHTS_FORMAT and payload["step"] == payload["config"].get("n_steps")


def load_resume_snapshot(
    folder: str | os.PathLike, log: logging.Logger | None = None
) -> tuple[Path, dict[str, Any]]:
    """The newest snapshot of ``folder`` that a run can continue from, and its payload.

    Snapshots that cannot be read (truncated, damaged) are skipped with a warning naming them; one whose
    pickle holds more than tensors and plain types stops the resume (``models.files.UntrustedCheckpoint``:
    an older snapshot in its place would silently undo the steps since, and the file needs its user's
    decision, not a fallback). A finished
    run's weights-only final snapshot is returned as it is (nothing is left to train; see
    :func:`restore_training_state`). Raises ``ValueError`` listing every snapshot tried when none is
    usable.
    """
    tried = []
    for _, path in reversed(list_snapshots(folder)):
        try:
            payload = read_snapshot(path)
        except UntrustedCheckpoint:
            raise
        except ValueError as err:
            (log or logger).warning(f"resume: skipping {path}: {err}")
            tried.append(f"{path.name}: {err}")
            continue
        if payload["format"] == SNAPSHOT_FORMAT or (_is_final(payload) and not tried):
            if tried:
                (log or logger).warning(f"resume: continuing from {path}, the newest intact snapshot")
            return path, payload
        tried.append(f"{path.name}: model weights only (no optimiser state)")
        break
    detail = "; ".join(tried) if tried else "no snapshot"
    raise ValueError(f"resume: no snapshot in {folder} can be resumed ({detail})")


def restore_training_state(
    path: Path,
    payload: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    rank: int | None = None,
) -> int:
    """Load the snapshot ``payload`` read from ``path``: model (strictly, :func:`models.load_model_weights`),
    optimiser, scheduler and RNG states (``rank``: this process's rank in a distributed run, None
    otherwise); returns the step to continue from.

    A finished run's weights-only final snapshot restores the model only: its step is the run's
    ``n_steps``, so no training step follows.
    """
    kind = "snapshot" if payload["format"] == SNAPSHOT_FORMAT else "weights"
    load_model_weights(
        model, ModelCheckpoint(Path(path), kind, payload["model"], payload["step"], payload["config"])
    )
    if _is_final(payload):
        return int(payload["step"])
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    restore_rng_state(payload["rng"] if rank is None else payload["rng_ranks"][rank])
    return int(payload["step"])
