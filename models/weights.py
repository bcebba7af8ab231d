"""Model weights in files: the checkpoint layouts this project reads, what a file holds, and strict loading
with errors that say what a file that does not fit seems to be (another method's weights included).

Layouts (all read by :func:`read_model_checkpoint`):

* full snapshot (:data:`SNAPSHOT_FORMAT`, written during training): model, optimiser, scheduler, RNG states,
  step and the run's config (its ``method`` among them);
* weights-only snapshot (:data:`WEIGHTS_FORMAT`): model, step and config;
* a plain model ``state_dict`` in an official module tree (what an official ``train.py`` writes), possibly
  with entries of the official model that are no parameters of ours (a loss module's buffers): each model
  class lists them, with the values they must have, in ``official_extras`` (checked, then dropped).

Which method a plain state dict belongs to is read off its tensors (:func:`identify_methods`: every
registered method's ``architecture_of`` and its exact key set and shapes); :func:`describe_mismatch` says
why a file does not load into a given model.
"""

from __future__ import annotations

import os
import warnings
import zipfile
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.files import load_torch_file
from models.methods import DEFAULT_METHOD, Method, get_method, method_names

SNAPSHOT_FORMAT = "difd-snapshot-v1"
WEIGHTS_FORMAT = "difd-weights-v1"
#: Names listed per kind of difference in a load error (the rest are counted).
MAX_LISTED = 4


@dataclass
class ModelCheckpoint:
    """A model state read from a file. ``kind``: ``'snapshot'``, ``'weights'`` (our two snapshot kinds) or
    ``'state_dict'`` (a plain state dict, e.g. an official release); ``step``/``config`` are None for a
    plain state dict; ``payload`` is the whole file content of a snapshot (optimiser, RNG states, ...);
    ``dropped``: the official extras removed when it was loaded; ``built_method`` and ``built_options``: the
    method and options of the network :func:`models.load_model` built for it."""

    path: Path
    kind: str
    state: dict[str, torch.Tensor]
    step: int | None = None
    config: dict[str, Any] | None = None
    dropped: list[str] = field(default_factory=list)
    payload: dict[str, Any] | None = field(default=None, repr=False)
    built_method: str | None = None
    built_options: dict[str, Any] | None = None

    @property
    def method(self) -> str | None:
        """The method a snapshot records (snapshots older than the plug-ins are DIFD's); None for a plain
        state dict, which records nothing."""
        return None if self.config is None else self.config.get("method", DEFAULT_METHOD)


def is_snapshot(payload: Any) -> bool:
    """Whether a loaded file is one of this project's snapshots (either kind)."""
    return isinstance(payload, dict) and payload.get("format") in (SNAPSHOT_FORMAT, WEIGHTS_FORMAT)


def read_model_checkpoint(path: str | os.PathLike) -> ModelCheckpoint:
    """The model state of one of our snapshots (either kind) or of a plain state dict (official layout).

    The file is verified (CRC-32s); a ``module.`` prefix (weights saved from a DataParallel or
    DistributedDataParallel wrapper) is removed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model checkpoint not found (config key 'reload_model_path'): {path}")
    payload = load_torch_file(path, "model checkpoint")
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
    payload = load_torch_file(path, "checkpoint", mmap=zipfile.is_zipfile(path))
    config = payload.get("config") if isinstance(payload, dict) else None
    return dict(config) if isinstance(config, dict) else None


@cache
def _skeleton(method: str, architecture: tuple[tuple[str, Any], ...]) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the state dict of ``method`` built with ``architecture`` (on the meta device:
    no memory, no weights)."""
    spec = get_method(method)
    options = {**spec.options_of({}), **dict(architecture)}
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "randomly initialised": only names and shapes are read
        model = spec.build(options, None, None)
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def _without_extras(state: dict[str, torch.Tensor], method: Method) -> dict[str, torch.Tensor]:
    extras = official_extra_keys(method.name)
    return {key: value for key, value in state.items() if key not in extras}


@cache
def official_extra_keys(method: str) -> frozenset[str]:
    """The keys an official checkpoint of ``method`` may hold beyond its network's (``official_extras``)."""
    spec = get_method(method)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "randomly initialised": only names and shapes are read
        model = spec.build(spec.options_of({}), None, None)
    return frozenset(getattr(model, "official_extras", {}))


def architecture_matches(state: dict[str, torch.Tensor], method: Method) -> dict[str, Any] | None:
    """The architecture options under which ``state`` is exactly a state dict of ``method`` (every key
    and shape, official extras aside), or None."""
    if method.architecture_of is None:
        return None
    try:
        architecture = method.architecture_of(state)
    except (ValueError, KeyError):  # a key the method's tensors have is missing: not its state dict
        return None
    own = _skeleton(method.name, tuple(sorted(architecture.items())))
    found = {key: tuple(value.shape) for key, value in _without_extras(state, method).items()}
    return architecture if found == own else None


def identify_methods(state: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """The registered methods whose network ``state`` is exactly, with the architecture options of each."""
    found = {}
    for name in method_names():
        architecture = architecture_matches(state, get_method(name))
        if architecture is not None:
            found[name] = architecture
    return found


def dropofficial_extra_keys(checkpoint: ModelCheckpoint, model: nn.Module) -> None:
    """Check and remove the entries of an official checkpoint that ``model`` lists in
    ``official_extras`` (``{name: expected values}``, e.g. a weighted loss's ``criterion.weight``);
    records them in ``checkpoint.dropped``."""
    for key, expected in getattr(model, "official_extras", {}).items():
        if key not in checkpoint.state:
            continue
        value = checkpoint.state.pop(key)
        want = torch.tensor(expected, dtype=torch.float64)
        found = value.detach().to("cpu", torch.float64).flatten()
        if found.shape != want.shape or not torch.allclose(found, want, rtol=1e-6, atol=0):
            raise ValueError(
                f"{checkpoint.path}: {key} (a buffer of the official model, not a parameter) is "
                f"{found.tolist()}, expected {list(expected)}: weights trained with another loss"
            )
        checkpoint.dropped.append(key)


def load_model_weights(model: nn.Module, path: str | os.PathLike | ModelCheckpoint) -> ModelCheckpoint:
    """Load a checkpoint (a file, or one :func:`read_model_checkpoint` already read) into ``model`` (strict:
    every tensor must match by name and shape), after checking the official extras it may hold.

    A mismatch is a ``ValueError`` that says what the file seems to be (another method's weights are named
    as such), counts the missing, unexpected and differently shaped tensors and lists the first few of
    each (:func:`describe_mismatch`). Returns the checkpoint read (its kind, step and training config).
    """
    checkpoint = path if isinstance(path, ModelCheckpoint) else read_model_checkpoint(path)
    dropofficial_extra_keys(checkpoint, model)
    problem = describe_mismatch(checkpoint, model.state_dict(), getattr(model, "method", None))
    if problem:
        raise ValueError(f"cannot load {checkpoint.path} into the model: {problem}")
    model.load_state_dict(checkpoint.state, strict=True)
    return checkpoint


def _kind_of_state(state: dict[str, torch.Tensor]) -> str:
    """What a plain state dict seems to be: a registered method's, an encoder initialisation, or other."""
    for name, architecture in identify_methods(state).items():
        method = get_method(name)
        if method.describe_state is not None:
            return method.describe_state(state)
        shown = ", ".join(f"{k}={v!r}" for k, v in architecture.items())
        return f"a {method.title} state dict in the official layout" + (f" ({shown})" if shown else "")
    keys = set(state)
    if {"conv1.weight", "layer4.0.conv1.weight", "fc.weight"} <= keys:
        return (
            "a torchvision ResNet-101 (ImageNet) checkpoint, i.e. an encoder initialisation, not a trained "
            "model: train with pretrained_weights='resnet101' pretrained_path=<this file>"
        )
    if "backbone.conv1.weight" in keys and any(k.startswith("classifier.") for k in keys):
        return (
            "a torchvision DeepLabV3-ResNet101 checkpoint, i.e. an encoder initialisation, not a trained "
            "model: train with pretrained_weights='deeplabv3' pretrained_path=<this file>"
        )
    return f"a state dict of another architecture ({len(keys)} tensors)"


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_LISTED])
    return shown + (f", ... ({len(names) - MAX_LISTED} more)" if len(names) > MAX_LISTED else "")


def _describe_snapshot(checkpoint: ModelCheckpoint) -> str:
    config = checkpoint.config or {}
    method = get_method(checkpoint.method) if checkpoint.method in method_names() else None
    architecture = {}
    if method is not None and method.architecture_of is not None:
        try:
            architecture = method.architecture_of(checkpoint.state)
        except (ValueError, KeyError):
            architecture = {}
    details = [f"step {checkpoint.step}", f"dataset {config.get('dataset')}"]
    details += [f"{key}={config.get(key, value)}" for key, value in architecture.items()]
    kind = "full" if checkpoint.kind == "snapshot" else "weights-only"
    return f"a {kind} snapshot of this project ({', '.join(details)}) of the method {checkpoint.method}"


def describe_mismatch(
    checkpoint: ModelCheckpoint, own: dict[str, torch.Tensor], method: str | None = None
) -> str:
    """Why ``checkpoint`` does not load into a model with state ``own`` of the method named ``method``
    ('' when it loads strictly).

    Says what the file seems to be, then the count and first few names of the tensors the model lacks in
    the file, the file's tensors the model does not have, and the shape differences. When the file holds
    the same method under other architecture options (read off both state dicts by the method's
    ``architecture_of``), the hint names the options to set.
    """
    state = checkpoint.state
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if not (missing or unexpected or shapes):
        return ""
    what = _kind_of_state(state) if checkpoint.kind == "state_dict" else _describe_snapshot(checkpoint)
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
    if method in method_names() and not missing and not unexpected:
        spec = get_method(method)
        wanted = architecture_matches(state, spec)
        if wanted is not None and spec.architecture_of is not None:
            have = spec.architecture_of(own)
            changes = [f"{key}={value}" for key, value in wanted.items() if have.get(key) != value]
            if changes:
                parts.append(f"hint: the file fits the model built with {', '.join(changes)}")
    return "; ".join(parts)
