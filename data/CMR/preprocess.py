"""Preprocess MS-CMRSeg 2019 bSSFP (C0) scans into ``cmr_MR_normalized`` (method.md §1b, CMR).

Usage (from the repository root)::

    python data/CMR/preprocess.py --input RAW_DIR --output <data_root>/CMR [--ids 1 2 ...]
    python -m data.CMR.preprocess ...           # same thing

``RAW_DIR`` is searched recursively for ``patient<N>_C0.nii.gz`` and ``patient<N>_C0_manual.nii.gz`` (images
and labels may sit in different sub-folders, as in the challenge download); case id = ``N``.
Writes ``<output>/cmr_MR_normalized/image_<N>.nii.gz`` and ``label_<N>.nii.gz`` (float64, 256 x 256 x Z).

Steps per case (method.md §1b steps 3-6): labels 200/500/600 mapped to 1/2/3 (LV-MYO, LV-BP, RV), geometry
taken from the image; clip above the 99.5th intensity percentile; linear resampling to (1.25, 1.25, 7.99) mm
with the per-value label rule; centre crop/pad to 256 x 256 (image minimum / label 0).

Label values on disk: **1/2/3**, as method.md §1b asks. The published copies keep the raw 200/500/600; the
two are read identically by a loader that maps 200/500/600 to 1/2/3 and leaves 1/2/3 alone, and the resampled
masks are the same because both orders of values agree. Raw labels may already hold 1/2/3 (then kept), but
not a mix of both codings.

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
    mr_image_steps,
    mr_label_steps,
    require_dir,
    run_command,
)
from dataloaders.datasets import get_dataset_info
from dataloaders.nifti import read_image
from dataloaders.volume import require_simpleitk
from utils import run_cli

sitk = require_simpleitk("data/CMR/preprocess.py")

#: Target spacing (x, y, z) in mm.
SPACING = (1.25, 1.25, 7.99)
#: MS-CMRSeg label values -> class ids (LV myocardium, LV blood pool, RV blood pool).
LABEL_MAP = dict(get_dataset_info("CMR").label_remap)

_IMAGE_NAME = re.compile(r"patient(\d+)_C0\.nii(\.gz)?")
_LABEL_NAME = re.compile(r"patient(\d+)_C0_manual\.nii(\.gz)?")


def _files_by_id(root: Path, pattern: re.Pattern[str]) -> dict[int, Path]:
    """``{N: path}`` for every file under ``root`` whose name matches ``pattern`` fully; duplicates fail."""
    found: dict[int, Path] = {}
    for path in sorted(root.rglob("*")):
        match = pattern.fullmatch(path.name)
        if match is None or not path.is_file():
            continue
        case_id = int(match.group(1))
        if case_id in found:
            raise ValueError(f"two files for case {case_id}: {found[case_id]} and {path}")
        found[case_id] = path
    return found


def find_cases(raw_dir: Path) -> dict[int, tuple[Path, Path]]:
    """``{N: (image_path, label_path)}`` for every raw case under ``raw_dir``.

    Raises:
        FileNotFoundError: the folder is missing, or an image has no label file (or the reverse).
    """
    raw_dir = require_dir(raw_dir, "CMR raw folder")
    images, labels = _files_by_id(raw_dir, _IMAGE_NAME), _files_by_id(raw_dir, _LABEL_NAME)
    for case_id in sorted(set(images) - set(labels)):
        raise FileNotFoundError(f"{images[case_id]}: no patient{case_id}_C0_manual.nii.gz under {raw_dir}")
    for case_id in sorted(set(labels) - set(images)):
        raise FileNotFoundError(f"{labels[case_id]}: no image patient{case_id}_C0.nii.gz under {raw_dir}")
    return {case_id: (images[case_id], labels[case_id]) for case_id in images}


def map_labels(label: sitk.Image, source: Path) -> sitk.Image:
    """Raw label volume -> UInt8 class ids 0..3 (200/500/600 -> 1/2/3; 1/2/3 kept), same geometry.

    Raises:
        ValueError: values outside {0, 200, 500, 600} and {0, 1, 2, 3}, or a mix of the two codings.
    """
    array = sitk.GetArrayFromImage(label)
    values = set(np.unique(array).tolist())
    if values <= {0, 1, 2, 3}:
        mapped = array.astype(np.uint8)
    else:
        check_label_values(array, {0, *LABEL_MAP}, source)
        mapped = np.zeros(array.shape, dtype=np.uint8)
        for raw, class_id in LABEL_MAP.items():
            mapped[array == raw] = class_id
    result = sitk.GetImageFromArray(mapped)
    result.CopyInformation(label)
    return result


def preprocess_case(image_path: Path, label_path: Path) -> tuple[sitk.Image, sitk.Image]:
    """One raw case -> (image, label) at 1.25 x 1.25 x 7.99 mm, 256 x 256 in-plane (method.md §1b, CMR)."""
    image, label = read_image(image_path), read_image(label_path)
    if image.GetDimension() != 3 or image.GetSize() != label.GetSize():
        raise ValueError(
            f"{label_path}: expected a 3-D label of its image's size {image.GetSize()}, "
            f"found {label.GetSize()}"
        )
    label = map_labels(label, label_path)
    label.CopyInformation(image)  # the label is drawn on the image's grid
    return mr_image_steps(image, SPACING), mr_label_steps(label, SPACING)


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """Run the command; returns the written paths (image, label, image, label, ...)."""
    return run_command(
        argv,
        "CMR",
        __doc__.splitlines()[0],
        "folder holding patient<N>_C0[_manual].nii.gz",
        find_cases,
        lambda paths: preprocess_case(*paths),
    )


if __name__ == "__main__":
    run_cli(main, "preprocess.py")
