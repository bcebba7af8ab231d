"""Rewrite a trusted PyTorch file as plain data, once, on the user's explicit request.

Every checkpoint is read with ``weights_only=True`` (:mod:`models.files`): tensors and plain containers
only, so that a file from elsewhere cannot run code. Snapshots written before that rule stored NumPy's RNG
state as an array, and some releases hold NumPy values too; such a file is refused with the command below,
which reads it ONCE with ``weights_only=False`` (running whatever its pickle says: only for a file you made
or trust), turns NumPy arrays and scalars into lists and numbers, refuses any other object, and rewrites
the file in place (atomically, verified), or into ``--output``::

    python -m engine.convert_checkpoint --trust-this-file runs/CHAOST2_setting1/fold0/snapshots/10000.pth

Exit status 0 when the file is (now) plain data, 1 with one line on stderr otherwise.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.files import UntrustedCheckpoint, load_torch_file, load_trusted_torch_file, verify_checkpoint_file
from utils import run_cli, write_atomically

#: Types kept as they are (``torch.load(weights_only=True)`` reads them).
_ATOMS = (torch.Tensor, torch.Size, torch.dtype, torch.device, str, bytes, int, float, bool, type(None))


def to_plain(value: Any, where: str = "file") -> Any:
    """``value`` with NumPy arrays as lists and NumPy scalars as Python numbers; containers rebuilt.

    Any other object raises ``ValueError`` naming its type and where it is (``file['rng']['numpy'][1]``):
    the conversion does not guess what an unknown object means.
    """
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise ValueError(f"{where} is a NumPy array of Python objects, which has no plain form")
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, _ATOMS):
        return value
    if isinstance(value, collections.Counter | collections.OrderedDict | dict):
        items = {key: to_plain(item, f"{where}[{key!r}]") for key, item in value.items()}
        return type(value)(items) if type(value) in (collections.Counter, collections.OrderedDict) else items
    if isinstance(value, list | tuple) and type(value) in (list, tuple):
        return type(value)(to_plain(item, f"{where}[{i}]") for i, item in enumerate(value))
    kind = f"{type(value).__module__}.{type(value).__qualname__}"
    raise ValueError(f"{where} holds a {kind}, which has no plain form; the file cannot be converted")


def convert(path: Path, output: Path | None = None) -> str:
    """Convert ``path`` (see the module docstring); returns the line to print."""
    output = output or path
    try:
        load_torch_file(path)
    except UntrustedCheckpoint:
        pass
    else:
        return f"{path} already holds only tensors and plain types: nothing to convert"
    payload = to_plain(load_trusted_torch_file(path), str(path))

    def save(tmp: Path) -> None:
        with tmp.open("wb") as stream:
            torch.save(payload, stream)

    def verify(tmp: Path) -> None:
        verify_checkpoint_file(tmp, "converted checkpoint")
        load_torch_file(tmp, "converted checkpoint")  # reads as data now, or says what is still in it

    write_atomically(output, save, what="converted checkpoint", verify=verify)
    return f"{output}: rewritten as tensors and plain types (read from {path}); it now loads as data"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--trust-this-file",
        type=Path,
        required=True,
        metavar="FILE",
        help="the file to convert: its pickle is run once, so only a file you made or trust",
    )
    parser.add_argument("--output", type=Path, help="write the converted file here (default: in place)")
    args = parser.parse_args(argv)
    try:
        print(convert(args.trust_this_file, args.output))
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    run_cli(main, "convert_checkpoint")
