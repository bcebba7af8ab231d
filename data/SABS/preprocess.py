"""Preprocess Synapse multi-organ abdominal CT ("SABS") into ``sabs_CT_normalized`` (method.md §1b, SABS).

Usage (from the repository root)::

    python data/SABS/preprocess.py --input RAW_DIR --output <data_root>/SABS [--ids 0 1 ...]
    python -m data.SABS.preprocess ...           # same thing

``RAW_DIR`` holds ``img/img<NNNN>.nii.gz`` and ``label/label<NNNN>.nii.gz`` (Synapse ``RawData/Training``).
Cases are re-indexed 0, 1, ... in the sorted order of the raw image numbers (the 30 training scans become
0..29); ``--ids`` selects by that output index. Writes ``<output>/sabs_CT_normalized/image_<i>.nii.gz`` and
``label_<i>.nii.gz`` (float32 both).

Steps per case: clip to the CT window [-125, 275] HU and map it linearly onto [0, 255] (fixed window, so
-125 -> 0 and 275 -> 255 in every volume); cut a 32-voxel border in-plane (512 -> 448); resample in-plane by
the factor 448 / 256 = 1.75 (spacing x 1.75, z spacing unchanged; size rule of method.md §1b, so 448 -> 257
and Z -> Z + 1 with zeros outside the original field), labels with the per-value rule. No crop to 256.

Geometry is carried through every step: unlike the published copies (origin 0, identity direction), the
outputs keep the raw direction and an origin moved by the 32-voxel cut, so each voxel keeps its physical
position. Labels must hold integers 0..13.

Idempotent: every selected case is recomputed and its two files overwritten (other files in the output folder
are left alone); equal inputs give byte-identical outputs. Errors: missing input folder, image without label
(or the reverse), size mismatch, unknown label values.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from data.preprocessing import (
    check_label_values,
    crop_or_pad_inplane,
    require_dir,
    resample_image,
    resample_label,
    run_command,
)
from dataloaders.datasets import get_dataset_info
from dataloaders.nifti import read_image
from dataloaders.volume import require_simpleitk
from utils import run_cli

sitk = require_simpleitk("data/SABS/preprocess.py")

#: CT intensity window in HU, mapped onto [0, 255].
HU_WINDOW = (-125.0, 275.0)
#: Voxels cut from each in-plane border.
BORDER = 32
#: In-plane spacing factor (512 - 2 * 32) / 256.
SPACING_FACTOR = 1.75
#: Allowed label values (background and 13 organs).
LABEL_VALUES = frozenset({0, *get_dataset_info("SABS").label_names})

_IMAGE_NAME = re.compile(r"img(\d+)\.nii(\.gz)?")


def find_cases(raw_dir: Path) -> list[tuple[Path, Path]]:
    """``[(image_path, label_path), ...]`` in sorted raw-number order; list position = output case id.

    Raises:
        FileNotFoundError: ``raw_dir``, its ``img``/``label`` folders or an image's label file are missing.
    """
    raw_dir = require_dir(raw_dir, "SABS raw folder")
    image_dir, label_dir = (
        require_dir(raw_dir / "img", "SABS images"),
        require_dir(raw_dir / "label", "SABS labels"),
    )
    numbered = []
    for path in image_dir.iterdir():
        match = _IMAGE_NAME.fullmatch(path.name)
        if match is not None:
            numbered.append((int(match.group(1)), path, label_dir / path.name.replace("img", "label", 1)))
    for _, image_path, label_path in numbered:
        if not label_path.is_file():
            raise FileNotFoundError(f"{image_path}: expected its label at {label_path}, found nothing")
    return [(image_path, label_path) for _, image_path, label_path in sorted(numbered)]


def normalise_intensity(image: sitk.Image) -> sitk.Image:
    """Clip to :data:`HU_WINDOW` and map it linearly onto [0, 255] (float64, same geometry)."""
    low, high = HU_WINDOW
    array = np.clip(sitk.GetArrayFromImage(image).astype(np.float64), low, high)
    result = sitk.GetImageFromArray((array - low) / (high - low) * 255.0)
    result.CopyInformation(image)
    return result


def cut_and_resample(
    image: sitk.Image,
    border: Sequence[int],
    spacing: Sequence[float],
    size: Sequence[int] | None = None,
    label: bool = False,
) -> sitk.Image:
    """Cut ``border`` (x, y) voxels from each in-plane side, then resample to ``spacing`` (x, y, z) and
    ``size`` (default: the published size rule); a label with the per-value rule (``label=True``)."""
    width, height = image.GetSize()[:2]
    size_xy = (width - 2 * border[0], height - 2 * border[1])
    if min(size_xy) < 1:
        raise ValueError(f"in-plane size {width} x {height} leaves nothing after a {tuple(border)}-voxel cut")
    cut = crop_or_pad_inplane(image, border, size_xy, 0)
    return resample_label(cut, spacing, size) if label else resample_image(cut, spacing, size)


def preprocess_case(image_path: Path, label_path: Path) -> tuple[sitk.Image, sitk.Image]:
    """One raw case -> (image in [0, 255], label 0..13), border cut and resampled in-plane by 1.75."""
    image, label = read_image(image_path), read_image(label_path)
    if image.GetDimension() != 3 or image.GetSize() != label.GetSize():
        raise ValueError(
            f"{label_path}: expected a 3-D label of its image's size {image.GetSize()}, "
            f"found {label.GetSize()}"
        )
    label_array = sitk.GetArrayFromImage(label)
    check_label_values(label_array, LABEL_VALUES, label_path)
    label = sitk.GetImageFromArray(label_array.astype(np.uint8))
    label.CopyInformation(image)  # the label is drawn on the image's grid
    spacing = image.GetSpacing()
    new_spacing = (spacing[0] * SPACING_FACTOR, spacing[1] * SPACING_FACTOR, spacing[2])
    border = (BORDER, BORDER)
    try:
        image = cut_and_resample(normalise_intensity(image), border, new_spacing)
    except ValueError as err:
        raise ValueError(f"{image_path}: {err}") from err
    return image, cut_and_resample(label, border, new_spacing, label=True)


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """Run the command; returns the written paths (image, label, image, label, ...)."""
    return run_command(
        argv,
        "SABS",
        __doc__.splitlines()[0],
        "folder holding img/img<NNNN>.nii.gz and label/label<NNNN>.nii.gz",
        lambda root: dict(enumerate(find_cases(root))),
        lambda paths: preprocess_case(*paths),
        (sitk.sitkFloat32, sitk.sitkFloat32),
        lambda paths: f" ({paths[0].name})",
    )


if __name__ == "__main__":
    run_cli(main, "preprocess.py")
