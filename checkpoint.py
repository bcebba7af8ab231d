"""Training snapshots and model checkpoints: verified atomic writes, the keep policy, resume from the newest
intact snapshot, and loading for evaluation with errors that say what a file is.

Kinds of file (``<run folder>/snapshots/<step>.pth``, the official naming):

* full snapshot (``SNAPSHOT_FORMAT``), what resume needs::

      {"format", "step": int, "model": state_dict, "optimizer": state_dict, "scheduler": state_dict,
       "rng": {"python", "numpy", "torch", "cuda"}, "config": dict}

  plus, for a ``torchrun`` run, ``"rng_ranks"``: every rank's RNG state (``rng`` is rank 0's);
* weights-only snapshot (``WEIGHTS_FORMAT``): ``{"format", "step", "model", "config"}``, about half the size
  (SGD's momentum buffers are as large as the model); evaluation reads it, resume refuses it;
* official-layout checkpoint: a plain model ``state_dict`` (what the official ``train.py`` writes), with the
  official loss module's buffer ``criterion.weight`` (checked to be ``[0.1, 1.0]``, then dropped).

``step`` is the number of optimisation steps already taken, which is also the index of the next episode
to draw: the training episodes are a deterministic function of ``(seed, episode index)``, so the
DataLoader position is restored by starting its sampler at ``step * batch_size``.

Keep policy (:func:`apply_keep_policy`, run by :func:`save_snapshot` once the new file is written and
verified): while training, the two newest snapshots keep the resume state and older ones are rewritten as
weights-only, so a damaged newest snapshot still leaves one to resume from; when the run reaches ``n_steps``
the final snapshot becomes weights-only too (a finished run is not resumed) and the one before it keeps
its resume state, so a damaged final snapshot can be recomputed exactly from it. A 40000-step fold with a
snapshot every 10000 steps ends with 3 weights-only snapshots and 1 full one instead of 4 full ones.

Writes (snapshots and demotions): a hidden temporary ``.<name>.tmp<pid>`` in the same folder, flushed to
disk, its zip CRC-32s verified, then ``os.replace``; a failed write (disk full, ...) removes the temporary,
leaves the older files as they were and raises ``OSError`` naming the file and the cause. Temporaries of
processes killed while writing are removed by :func:`remove_stale_temporaries` at the next start. Reads
verify every zip member's CRC-32 (``torch.load`` does not: a flipped bit in a tensor loads silently) and turn
torch's internal messages into errors naming the file.
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
import random
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

SNAPSHOT_FORMAT = "difd-snapshot-v1"
WEIGHTS_FORMAT = "difd-weights-v1"
_SNAPSHOT_NAME = re.compile(r"^(\d+)\.pth$")
_TEMPORARY_NAME = re.compile(r"^\.(\d+\.pth)\.tmp(\d+)$")
#: Bytes read at a time when checking a zip member's CRC-32.
_CHUNK = 1 << 24
#: Names listed per kind of difference in a load error (the rest are counted).
MAX_LISTED = 4

logger = logging.getLogger(__name__)


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


# ------------------------------------------------------------------------------------------ reading files


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


def _torch_load(path: Path, what: str, weights_only: bool, mmap: bool = False) -> Any:
    """``torch.load`` on the CPU after :func:`verify_checkpoint_file`; failures name the file."""
    verify_checkpoint_file(path, what)
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=mmap)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, AttributeError, OSError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot read {what} {path}: {reason}") from err


def read_torch_file(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    """A tensor-only PyTorch file (``weights_only=True``), verified; errors name ``what`` and the file."""
    return _torch_load(Path(path), what, weights_only=True)


# ------------------------------------------------------------------------------------------ writing files


def _pid_alive(pid: int) -> bool:
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


def remove_stale_temporaries(folder: str | os.PathLike, log: logging.Logger | None = None) -> list[Path]:
    """Delete the ``.<step>.pth.tmp<pid>`` files that processes killed while writing left in ``folder``.

    A temporary whose process still runs on this machine is kept; this process's own pid counts as dead
    (call it before this process writes a snapshot: a leftover with its pid is from an earlier process
    that had the same id). Returns the removed paths.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in sorted(folder.iterdir()):
        match = _TEMPORARY_NAME.match(entry.name)
        if match is None or not entry.is_file():
            continue
        pid = int(match.group(2))
        if pid != os.getpid() and _pid_alive(pid):
            continue
        size = entry.stat().st_size
        entry.unlink(missing_ok=True)
        removed.append(entry)
        (log or logger).warning(
            f"removed {entry} ({size / 2**20:.0f} MiB), left by process {pid} that died while writing "
            f"{match.group(1)}"
        )
    return removed


def _write_atomically(path: Path, payload: dict[str, Any], what: str) -> None:
    """``torch.save`` into ``.<name>.tmp<pid>``, flushed to disk, verified, then renamed onto ``path``."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with tmp.open("wb") as stream:
            torch.save(payload, stream)
            stream.flush()
            os.fsync(stream.fileno())
        verify_checkpoint_file(tmp, what)
        os.replace(tmp, path)
    except OSError as err:
        cause = err.strerror or os.strerror(err.errno or errno.EIO)
        raise OSError(err.errno, f"cannot write {what} {path}: {cause}") from err
    finally:
        tmp.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a crash
    finally:
        os.close(directory)


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
    _write_atomically(path, payload, "snapshot")
    apply_keep_policy(path.parent, int(step), final)
    return path


def demote_snapshot(path: str | os.PathLike) -> None:
    """Rewrite a full snapshot as weights-only (model, step, config), atomically; others are left alone."""
    path = Path(path)
    payload = _torch_load(path, "snapshot", weights_only=False, mmap=True)
    if not isinstance(payload, dict) or payload.get("format") != SNAPSHOT_FORMAT:
        return
    weights = {key: payload[key] for key in ("step", "model", "config")}
    _write_atomically(path, {"format": WEIGHTS_FORMAT, **weights}, "weights-only rewrite of snapshot")


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


# ------------------------------------------------------------------------------------------ snapshots


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
    payload = _torch_load(path, "snapshot", weights_only=False)
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

    Snapshots that cannot be read (truncated, damaged) are skipped with a warning naming them. A finished
    run's weights-only final snapshot is returned as it is (nothing is left to train; see
    :func:`restore_training_state`). Raises ``ValueError`` listing every snapshot tried when none is
    usable.
    """
    tried = []
    for _, path in reversed(list_snapshots(folder)):
        try:
            payload = read_snapshot(path)
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
    payload: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    rank: int | None = None,
) -> int:
    """Load a snapshot's model, optimiser, scheduler and RNG states (``rank``: this process's rank in a
    distributed run, None otherwise); returns the step to continue from.

    A finished run's weights-only final snapshot restores the model only: its step is the run's
    ``n_steps``, so no training step follows.
    """
    model.load_state_dict(payload["model"])
    if _is_final(payload):
        return int(payload["step"])
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    restore_rng_state(payload["rng"] if rank is None else payload["rng_ranks"][rank])
    return int(payload["step"])


# ------------------------------------------------------------------------------------------ model weights


@dataclass
class ModelCheckpoint:
    """A model state read from a file. ``kind``: ``'snapshot'``, ``'weights'`` (our two snapshot kinds) or
    ``'state_dict'`` (a plain state dict, e.g. the official release); ``step``/``config`` are None for a
    plain state dict."""

    path: Path
    kind: str
    state: dict[str, torch.Tensor]
    step: int | None = None
    config: dict[str, Any] | None = None
    dropped: list[str] = field(default_factory=list)


def _check_criterion_weight(state: dict[str, torch.Tensor], path: Path) -> list[str]:
    """Drop the official loss module's ``criterion.weight`` buffer after checking it is ``[0.1, 1.0]``."""
    if "criterion.weight" not in state:
        return []
    from models.losses import CLASS_WEIGHTS  # here, not at the top: models.encoder imports this module

    weight = state.pop("criterion.weight")
    expected = torch.tensor(CLASS_WEIGHTS, dtype=torch.float64)
    found = weight.detach().to("cpu", torch.float64).flatten()
    if found.shape != expected.shape or not torch.allclose(found, expected, rtol=1e-6, atol=0):
        raise ValueError(
            f"{path}: criterion.weight (the NLLLoss class weights of the official model) is "
            f"{found.tolist()}, expected {list(CLASS_WEIGHTS)}: weights trained with another loss"
        )
    return ["criterion.weight"]


def read_model_checkpoint(path: str | os.PathLike) -> ModelCheckpoint:
    """The model state of one of our snapshots (either kind) or of a plain state dict (official layout).

    The file is verified (CRC-32s); a ``module.`` prefix (weights saved from a DataParallel or
    DistributedDataParallel wrapper) is removed, and ``criterion.weight`` is checked and dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model checkpoint not found (config key 'reload_model_path'): {path}")
    payload = _torch_load(path, "model checkpoint", weights_only=False)
    if isinstance(payload, dict) and payload.get("format") in (SNAPSHOT_FORMAT, WEIGHTS_FORMAT):
        kind = "snapshot" if payload["format"] == SNAPSHOT_FORMAT else "weights"
        checkpoint = ModelCheckpoint(path, kind, dict(payload["model"]), payload["step"], payload["config"])
    elif isinstance(payload, dict) and payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
        checkpoint = ModelCheckpoint(path, "state_dict", dict(payload))
    else:
        raise ValueError(
            f"{path}: expected one of this project's snapshots or a plain model state_dict "
            f"(official layout), found a {type(payload).__name__}"
        )
    if checkpoint.state and all(key.startswith("module.") for key in checkpoint.state):
        checkpoint.state = {key[len("module.") :]: value for key, value in checkpoint.state.items()}
    checkpoint.dropped = _check_criterion_weight(checkpoint.state, path)
    return checkpoint


def model_state_from_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model ``state_dict`` of a file :func:`read_model_checkpoint` reads."""
    return read_model_checkpoint(path).state


def load_model_weights(model: nn.Module, path: str | os.PathLike | ModelCheckpoint) -> ModelCheckpoint:
    """Load a checkpoint (a file, or one :func:`read_model_checkpoint` already read) into ``model`` (strict:
    every tensor must match by name and shape).

    A mismatch is a ``ValueError`` that says what the file seems to be, counts the missing, unexpected
    and differently shaped tensors and lists the first few of each (:func:`describe_mismatch`).
    Returns the checkpoint read (its kind, step and training config).
    """
    checkpoint = path if isinstance(path, ModelCheckpoint) else read_model_checkpoint(path)
    own = model.state_dict()
    problem = describe_mismatch(checkpoint, own)
    if problem:
        raise ValueError(f"cannot load {checkpoint.path} into the model: {problem}")
    model.load_state_dict(checkpoint.state, strict=True)
    return checkpoint


def _kind_of_state(state: dict[str, torch.Tensor]) -> str:
    """What a plain state dict seems to be, from its key names and decoder shapes."""
    keys = set(state)
    if "encoder.backbone.conv1.weight" in keys and "decoder1.merge.0.weight" in keys:
        channels = state["decoder1.merge.0.weight"].shape[1]
        features = state["encoder.reduce1.weight"].shape[0] if "encoder.reduce1.weight" in keys else 512
        extra = {1: "2C+1", 3: "2C+3"}.get(channels - 2 * features, "unusual")
        return f"a DIFD state dict in the official layout with {extra} ({channels}-channel) decoders"
    if {"conv1.weight", "layer4.0.conv1.weight", "fc.weight"} <= keys:
        return (
            "a torchvision ResNet-101 (ImageNet) checkpoint, i.e. an encoder initialisation, not a trained "
            "DIFD: train with pretrained_weights='resnet101' pretrained_path=<this file>"
        )
    if "backbone.conv1.weight" in keys and any(k.startswith("classifier.") for k in keys):
        return (
            "a torchvision DeepLabV3-ResNet101 checkpoint, i.e. an encoder initialisation, not a trained "
            "DIFD: train with pretrained_weights='deeplabv3' pretrained_path=<this file>"
        )
    return f"a state dict of another architecture ({len(keys)} tensors)"


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_LISTED])
    return shown + (f", ... ({len(names) - MAX_LISTED} more)" if len(names) > MAX_LISTED else "")


def describe_mismatch(checkpoint: ModelCheckpoint, own: dict[str, torch.Tensor]) -> str:
    """Why ``checkpoint`` does not load into a model with state ``own`` ('' when it loads strictly).

    Says what the file seems to be, then the count and first few names of the tensors the model lacks in
    the file, the file's tensors the model does not have, and the shape differences. Suggests
    ``decoder_extra_maps`` only when the decoders' input channels (2C+3 against 2C+1) are the only
    difference.
    """
    state = checkpoint.state
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if not (missing or unexpected or shapes):
        return ""
    if checkpoint.kind == "state_dict":
        what = _kind_of_state(state)
    else:
        config = checkpoint.config or {}
        what = (
            f"a {'full' if checkpoint.kind == 'snapshot' else 'weights-only'} snapshot of this project "
            f"(step {checkpoint.step}, dataset {config.get('dataset')}, "
            f"decoder_extra_maps={config.get('decoder_extra_maps')})"
        )
    parts = [f"the file seems to be {what}"]
    matching = len(set(own) & set(state)) - len(shapes)
    parts.append(f"{matching} of the model's {len(own)} tensors match it")
    if missing:
        parts.append(f"{len(missing)} of the model's tensors are not in the file: {_listed(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} of the file's tensors are not in the model: {_listed(unexpected)}")
    if shapes:
        described = [f"{k} {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} here" for k in shapes]
        parts.append(f"{len(shapes)} shape(s) differ: {_listed(described)}")
    merge = {"decoder1.merge.0.weight", "decoder2.merge.0.weight"}
    if not missing and not unexpected and set(shapes) == merge:
        in_file = state["decoder1.merge.0.weight"].shape[1]
        in_model = own["decoder1.merge.0.weight"].shape[1]
        if in_file - in_model in (2, -2):
            wanted = in_file > in_model
            parts.append(
                f"hint: the file's decoders take {in_file} input channels, the model's {in_model}: "
                f"set decoder_extra_maps={wanted}"
            )
    return "; ".join(parts)


def recorded_config(path: str | os.PathLike) -> dict[str, Any] | None:
    """The config that a checkpoint records (one of our snapshots, full or weights-only), or None when it
    records none (a plain ``state_dict``, e.g. an official checkpoint).

    The file is verified like every read (:func:`verify_checkpoint_file`); zip-format files are then
    memory-mapped, so the weights are not loaded.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model checkpoint not found (config key 'reload_model_path'): {path}")
    payload = _torch_load(path, "checkpoint", weights_only=False, mmap=zipfile.is_zipfile(path))
    config = payload.get("config") if isinstance(payload, dict) else None
    return dict(config) if isinstance(config, dict) else None
