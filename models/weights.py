"""DIFD weights in files: the checkpoint layouts this project reads, what a file holds, and strict loading
with errors that say what a file that does not fit seems to be.

Layouts (all read by :func:`read_model_checkpoint`):

* full snapshot (:data:`SNAPSHOT_FORMAT`, written during training): model, optimiser, scheduler, RNG states,
  step and the run's config;
* weights-only snapshot (:data:`WEIGHTS_FORMAT`): model, step and config;
* a plain model ``state_dict`` in the official module tree (what the official ``train.py`` writes), with
  the official loss module's buffer ``criterion.weight`` (checked to be ``[0.1, 1.0]``, then dropped).

The architecture a state dict needs is read off its tensors (:func:`decoder_extra_maps_of`: 2C+1 or 2C+3
decoder input channels); :func:`describe_mismatch` says why a file does not load into a given model.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.encoder import FEATURE_CHANNELS
from models.files import load_torch_file
from models.losses import CLASS_WEIGHTS

SNAPSHOT_FORMAT = "difd-snapshot-v1"
WEIGHTS_FORMAT = "difd-weights-v1"
#: Names listed per kind of difference in a load error (the rest are counted).
MAX_LISTED = 4
#: Keys every DIFD state dict holds (the official module tree, method.md §6).
DIFD_KEYS = (
    "encoder.backbone.conv1.weight",
    "encoder.reduce1.weight",
    "encoder.reduce1d.weight",
    "fuse.weight",
    "decoder1.merge.0.weight",
    "decoder2.merge.0.weight",
)
#: Decoder input channels -> ``decoder_extra_maps`` (2C+1: the paper's, 2C+3: the official decoders').
DECODER_CHANNELS = {2 * FEATURE_CHANNELS + 1: False, 2 * FEATURE_CHANNELS + 3: True}


@dataclass
class ModelCheckpoint:
    """A model state read from a file. ``kind``: ``'snapshot'``, ``'weights'`` (our two snapshot kinds) or
    ``'state_dict'`` (a plain state dict, e.g. the official release); ``step``/``config`` are None for a
    plain state dict; ``payload`` is the whole file content of a snapshot (optimiser, RNG states, ...)."""

    path: Path
    kind: str
    state: dict[str, torch.Tensor]
    step: int | None = None
    config: dict[str, Any] | None = None
    dropped: list[str] = field(default_factory=list)
    payload: dict[str, Any] | None = field(default=None, repr=False)


def _check_criterion_weight(state: dict[str, torch.Tensor], path: Path) -> list[str]:
    """Drop the official loss module's ``criterion.weight`` buffer after checking it is ``[0.1, 1.0]``."""
    if "criterion.weight" not in state:
        return []
    weight = state.pop("criterion.weight")
    expected = torch.tensor(CLASS_WEIGHTS, dtype=torch.float64)
    found = weight.detach().to("cpu", torch.float64).flatten()
    if found.shape != expected.shape or not torch.allclose(found, expected, rtol=1e-6, atol=0):
        raise ValueError(
            f"{path}: criterion.weight (the NLLLoss class weights of the official model) is "
            f"{found.tolist()}, expected {list(CLASS_WEIGHTS)}: weights trained with another loss"
        )
    return ["criterion.weight"]


def is_snapshot(payload: Any) -> bool:
    """Whether a loaded file is one of this project's snapshots (either kind)."""
    return isinstance(payload, dict) and payload.get("format") in (SNAPSHOT_FORMAT, WEIGHTS_FORMAT)


def read_model_checkpoint(path: str | os.PathLike) -> ModelCheckpoint:
    """The model state of one of our snapshots (either kind) or of a plain state dict (official layout).

    The file is verified (CRC-32s); a ``module.`` prefix (weights saved from a DataParallel or
    DistributedDataParallel wrapper) is removed, and ``criterion.weight`` is checked and dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model checkpoint not found (config key 'reload_model_path'): {path}")
    payload = load_torch_file(path, "model checkpoint", weights_only=False)
    if is_snapshot(payload):
        kind = "snapshot" if payload["format"] == SNAPSHOT_FORMAT else "weights"
        checkpoint = ModelCheckpoint(
            path, kind, dict(payload["model"]), payload["step"], payload["config"], payload=payload
        )
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


def recorded_config(path: str | os.PathLike) -> dict[str, Any] | None:
    """The config that a checkpoint records (one of our snapshots, full or weights-only), or None when it
    records none (a plain ``state_dict``, e.g. an official checkpoint).

    The file is verified like every read; zip-format files are then memory-mapped, so the weights are not
    loaded.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model checkpoint not found (config key 'reload_model_path'): {path}")
    payload = load_torch_file(path, "checkpoint", weights_only=False, mmap=zipfile.is_zipfile(path))
    config = payload.get("config") if isinstance(payload, dict) else None
    return dict(config) if isinstance(config, dict) else None


def decoder_extra_maps_of(checkpoint: ModelCheckpoint) -> bool:
    """The ``decoder_extra_maps`` a DIFD state dict needs, read off its decoder width.

    Raises ``ValueError`` naming the file for another architecture (DIFD's keys missing, or a decoder
    width that is neither 2C+1 nor 2C+3) and for a snapshot whose recorded ``decoder_extra_maps``
    contradicts its weights.
    """
    state, path = checkpoint.state, checkpoint.path
    missing = [key for key in DIFD_KEYS if key not in state]
    if missing:
        sample = ", ".join(list(state)[:4])
        raise ValueError(
            f"{path}: not a DIFD checkpoint (another architecture?): it lacks {missing}; "
            f"its {len(state)} tensors are named like {sample}"
        )
    channels = int(state["decoder1.merge.0.weight"].shape[1])
    if channels not in DECODER_CHANNELS:
        raise ValueError(
            f"{path}: decoder1.merge.0.weight takes {channels} input channels; a DIFD decoder takes "
            f"{sorted(DECODER_CHANNELS)} (2C+1 or 2C+3 with C = {FEATURE_CHANNELS})"
        )
    extra_maps = DECODER_CHANNELS[channels]
    if checkpoint.config is not None:
        recorded = checkpoint.config.get("decoder_extra_maps", extra_maps)
        if bool(recorded) != extra_maps:
            raise ValueError(
                f"{path}: the snapshot's config says decoder_extra_maps={recorded}, but its decoders take "
                f"{channels} channels (decoder_extra_maps={extra_maps})"
            )
    return extra_maps


def load_model_weights(model: nn.Module, path: str | os.PathLike | ModelCheckpoint) -> ModelCheckpoint:
    """Load a checkpoint (a file, or one :func:`read_model_checkpoint` already read) into ``model`` (strict:
    every tensor must match by name and shape).

    A mismatch is a ``ValueError`` that says what the file seems to be, counts the missing, unexpected
    and differently shaped tensors and lists the first few of each (:func:`describe_mismatch`).
    Returns the checkpoint read (its kind, step and training config).
    """
    checkpoint = path if isinstance(path, ModelCheckpoint) else read_model_checkpoint(path)
    problem = describe_mismatch(checkpoint, model.state_dict())
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
