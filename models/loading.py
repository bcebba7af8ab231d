"""The one way to make a model from a file: :func:`load_model` reads a checkpoint once (verified), finds the
method it belongs to, builds that network with the architecture the weights need and loads them strictly,
for ``test.py``, ``segment.py`` and the benchmarks.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any

from torch import nn

from models.methods import get_method, method_names
from models.weights import (
    ModelCheckpoint,
    identify_methods,
    load_model_weights,
    official_extra_keys,
    read_model_checkpoint,
)


def checkpoint_method(checkpoint: ModelCheckpoint, method: str | None = None) -> str:
    """The method of ``checkpoint``: the one a snapshot records (which must be ``method`` when given), or
    for a plain state dict ``method`` (whose network the tensors must be) or, when None, the one registered
    method whose network the tensors are. Raises ``ValueError`` naming both methods, or the candidates."""
    recorded = checkpoint.method
    if recorded is not None:
        if method is not None and method != recorded:
            raise ValueError(
                f"{checkpoint.path} is a snapshot of the method {recorded!r}, not of {method!r}: a "
                "checkpoint of one method is never loaded as another (set method to the one it records)"
            )
        get_method(recorded)  # a plug-in's snapshot needs its module in plugins=[...]
        return recorded
    found = identify_methods(checkpoint.state)
    if method is not None:
        get_method(method)
        if found and method not in found:
            raise ValueError(
                f"{checkpoint.path} holds the weights of {' or '.join(map(repr, found))}, not of "
                f"{method!r}: a checkpoint of one method is never loaded as another"
            )
        return method
    if len(found) == 1:
        return next(iter(found))
    if not found:
        raise ValueError(
            f"{checkpoint.path}: its {len(checkpoint.state)} tensors are the network of none of the methods "
            f"{list(method_names())}; name the method it was trained with"
        )
    raise ValueError(f"{checkpoint.path}: its tensors fit the methods {sorted(found)}; name the method")


def load_model(
    checkpoint: str | os.PathLike | ModelCheckpoint,
    method: str | None = None,
    options: Mapping[str, Any] | None = None,
) -> tuple[nn.Module, ModelCheckpoint]:
    """A model with the weights of ``checkpoint`` (a path, or a file :func:`read_model_checkpoint` already
    read), and the checkpoint (its kind, step and recorded training config).

    The method: :func:`checkpoint_method`. Its options: the method's defaults, then those a snapshot
    records, then ``options`` as given (e.g. ``test.py``'s config: a test-time option such as Q-Net's
    refinement iterations, or an architecture option, which must then fit the file: a file that does not is
    an error that says what it seems to be and which values fit). A snapshot whose recorded architecture
    contradicts its own weights is an error. The model is on the CPU in training mode, as built.
    """
    if not isinstance(checkpoint, ModelCheckpoint):
        checkpoint = read_model_checkpoint(checkpoint)
    spec = get_method(checkpoint_method(checkpoint, method))
    recorded = spec.options_of(checkpoint.config or {})
    architecture = {}
    if spec.architecture_of is not None:
        state = {k: v for k, v in checkpoint.state.items() if k not in official_extra_keys(spec.name)}
        try:
            architecture = spec.architecture_of(state)
        except (ValueError, KeyError) as err:
            raise ValueError(f"{checkpoint.path}: not a state dict of {spec.name} ({err})") from err
    if checkpoint.config is not None:
        contradicted = {
            key: (checkpoint.config[key], value)
            for key, value in architecture.items()
            if key in checkpoint.config and checkpoint.config[key] != value
        }
        if contradicted:
            found = ", ".join(
                f"{k}={a!r} but its weights need {k}={b!r}" for k, (a, b) in contradicted.items()
            )
            raise ValueError(f"{checkpoint.path}: the snapshot's config says {found}")
    built = {**recorded, **architecture, **dict(options or {})}
    with warnings.catch_warnings():
        # An encoder warns that it is randomly initialised: the checkpoint overwrites every weight.
        warnings.filterwarnings("ignore", message=".*randomly initialised.*")
        model = spec.build(built, None, None)
    load_model_weights(model, checkpoint)
    checkpoint.built_method, checkpoint.built_options = spec.name, built
    return model, checkpoint
