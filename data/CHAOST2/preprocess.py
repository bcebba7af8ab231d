"""Preprocess CHAOS MR T2-SPIR scans into ``chaos_MR_T2_normalized`` (method.md §1b, CHAOS).

Usage (from the repository root)::

    python data/CHAOST2/preprocess.py --input RAW_DIR --output <data_root>/CHAOST2 [--ids 1 2 ...]
    python -m data.CHAOST2.preprocess ...           # same thing

``RAW_DIR`` is the CHAOS training folder holding ``MR/<id>/T2SPIR/DICOM_anon/*.dcm`` and
``MR/<id>/T2SPIR/Ground/*.png`` (or the ``MR`` folder itself); case id = ``<id>``. Writes
``<output>/chaos_MR_T2_normalized/image_<id>.nii.gz`` and ``label_<id>.nii.gz`` (float64, 256 x 256 x Z).

Steps per case:

1. DICOM series -> 3-D image with SimpleITK (no external ``dcm2nii``). Slices are ordered by position along
   the slice normal; the series must be complete (consecutive instance numbers, evenly spaced positions).
   Rows are then stored bottom-up, as ``dcm2nii`` stores them (array flipped along rows, direction and
   origin adjusted so that every voxel keeps its physical position): the published copies have this layout
   (direction ``diag(1, -1, 1)`` for an axial series), so the output arrays line up with them.
2. Ground-truth PNGs sorted by the number after the last ``-`` (``IMG-0004-00012.png`` -> 12); the k-th
   PNG belongs to the DICOM file of the k-th smallest instance number. The stack is flipped along rows
   (matching step 1), grey values 0/63/126/189/252 -> 0..4 (background, liver, right kidney, left kidney,
   spleen; a fixed table, so a case without some organ still maps correctly), geometry from the image.
3. Clip intensities above the 99.5th percentile (pixel type kept).
4. Linear resampling to (1.25, 1.25, 7.70) mm with the size rule of method.md §1b; labels per value.
5. Centre crop/pad to 256 x 256 (image minimum / label 0), origin moved accordingly.

Idempotent: every selected case is recomputed and its two files overwritten (other files in the output folder
are left alone); equal inputs give byte-identical outputs. Errors: missing folders, a series with missing
slices, PNGs whose count or size does not match the series, grey values outside the table.
"""

from __future__ import annotations

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
from dataloaders.nifti import read_image
from dataloaders.volume import require_simpleitk
from utils import run_cli

sitk = require_simpleitk("data/CHAOST2/preprocess.py")

#: Target spacing (x, y, z) in mm.
SPACING = (1.25, 1.25, 7.70)
#: Ground-truth PNG grey value -> class id (background, liver, right kidney, left kidney, spleen).
GREY_TO_CLASS = {0: 0, 63: 1, 126: 2, 189: 3, 252: 4}
#: Largest tolerated deviation of a slice gap from the median gap, relative to the median.
SLICE_GAP_TOLERANCE = 0.2

_INSTANCE_NUMBER_TAG = "0020|0013"


def find_cases(raw_dir: Path) -> dict[int, Path]:
    """``{id: <MR>/<id>/T2SPIR}`` for every numbered patient folder with a ``T2SPIR`` sub-folder."""
    raw_dir = require_dir(raw_dir, "CHAOS raw folder")
    mr_dir = raw_dir / "MR" if (raw_dir / "MR").is_dir() else raw_dir
    return {
        int(case.name): case / "T2SPIR"
        for case in mr_dir.iterdir()
        if case.name.isdigit() and (case / "T2SPIR").is_dir()
    }


def read_dicom_series(dicom_dir: Path) -> tuple[sitk.Image, np.ndarray]:
    """Read a complete single-series DICOM folder (step 1, before the row flip).

    Returns:
        image: 3-D image, slices in increasing position along the slice normal, DICOM geometry.
        instance_rank: ``(Z,)`` int, for each image slice the rank (0-based) of its instance number.

    Raises:
        FileNotFoundError: no ``*.dcm`` file in ``dicom_dir``.
        ValueError: slices of different size or orientation, a missing instance number tag, duplicate or
            non-consecutive instance numbers, or unevenly spaced slice positions (a missing slice).
    """
    files = sorted(require_dir(dicom_dir, "CHAOS DICOM series").glob("*.dcm"))
    if not files:
        raise FileNotFoundError(f"{dicom_dir}: expected DICOM files (*.dcm), found none")
    header = sitk.ImageFileReader()
    sizes, directions, positions, instances = set(), set(), [], []
    for path in files:
        header.SetFileName(str(path))
        header.ReadImageInformation()
        if not header.HasMetaDataKey(_INSTANCE_NUMBER_TAG):
            raise ValueError(f"{path}: expected an InstanceNumber tag (0020,0013), found none")
        sizes.add(header.GetSize()[:2])
        directions.add(tuple(np.round(header.GetDirection(), 4)))
        normal = np.asarray(header.GetDirection()).reshape(3, 3)[:, 2]
        positions.append(float(np.dot(header.GetOrigin(), normal)))
        instances.append(int(header.GetMetaData(_INSTANCE_NUMBER_TAG).strip()))
    if len(sizes) > 1 or len(directions) > 1:
        raise ValueError(
            f"{dicom_dir}: expected slices of one size and orientation, found sizes {sorted(sizes)} "
            f"and {len(directions)} orientations"
        )
    instances_sorted = np.sort(instances)
    if np.any(np.diff(instances_sorted) != 1):
        missing = sorted(set(range(instances_sorted[0], instances_sorted[-1] + 1)) - set(instances))
        raise ValueError(
            f"{dicom_dir}: expected consecutive instance numbers, found {instances_sorted.tolist()} "
            f"(missing {missing}, or duplicates)"
        )
    order = np.argsort(positions, kind="stable")
    gaps = np.diff(np.asarray(positions)[order])
    if gaps.size:
        median = float(np.median(gaps))
        if median <= 0:
            raise ValueError(
                f"{dicom_dir}: expected slices at distinct positions, found several at one position"
            )
        bad = np.flatnonzero(np.abs(gaps - median) > SLICE_GAP_TOLERANCE * median)
        if bad.size:
            raise ValueError(
                f"{dicom_dir}: expected evenly spaced slices ({median:.3f} mm apart), found gaps of "
                f"{np.round(gaps[bad], 3).tolist()} mm after files {[files[order[i]].name for i in bad]} "
                "(missing slice?)"
            )
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(files[i]) for i in order])
    rank = np.argsort(np.argsort(instances, kind="stable"), kind="stable")
    return reader.Execute(), rank[order]


def flip_rows(image: sitk.Image) -> sitk.Image:
    """Store rows bottom-up: array flipped along ``H``; direction and origin keep physical positions."""
    array = sitk.GetArrayFromImage(image)[:, ::-1, :]
    result = sitk.GetImageFromArray(np.ascontiguousarray(array))
    result.SetSpacing(image.GetSpacing())
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    direction[:, 1] *= -1
    result.SetDirection(direction.ravel().tolist())
    result.SetOrigin(image.TransformIndexToPhysicalPoint((0, image.GetSize()[1] - 1, 0)))
    return result


def _png_number(path: Path) -> int:
    """The number after the last ``-`` of a ground-truth file name (``IMG-0004-00012.png`` -> 12)."""
    try:
        return int(path.stem.rsplit("-", 1)[-1])
    except ValueError:
        raise ValueError(f"{path}: expected a name ending in -<number>.png") from None


def read_ground_truth(ground_dir: Path, instance_rank: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Ground-truth PNGs -> ``(Z, rows, cols)`` uint8 class ids in the image's slice order (step 2).

    Raises:
        FileNotFoundError: ``ground_dir`` is missing.
        ValueError: PNG count differs from the series length, a PNG is not a ``rows x cols`` grey image,
            duplicate numbers, or grey values outside :data:`GREY_TO_CLASS`.
    """
    files = sorted(require_dir(ground_dir, "CHAOS ground truth").glob("*.png"), key=_png_number)
    if len(files) != len(instance_rank):
        raise ValueError(
            f"{ground_dir}: expected {len(instance_rank)} PNGs (one per DICOM slice), found {len(files)}"
        )
    numbers = [_png_number(path) for path in files]
    if len(set(numbers)) != len(numbers):
        raise ValueError(f"{ground_dir}: expected distinct numbers after the last '-', found {numbers}")
    lookup = np.zeros(256, dtype=np.uint8)
    for grey, class_id in GREY_TO_CLASS.items():
        lookup[grey] = class_id
    slices = []
    for path in files:
        grey = sitk.GetArrayFromImage(read_image(path))
        if grey.shape != (rows, cols):
            raise ValueError(
                f"{path}: expected a {rows} x {cols} grey image like its DICOM slice, found {grey.shape}"
            )
        check_label_values(grey, GREY_TO_CLASS, path)
        slices.append(lookup[grey])
    return np.stack(slices)[instance_rank]


def preprocess_case(t2spir_dir: Path) -> tuple[sitk.Image, sitk.Image]:
    """One ``MR/<id>/T2SPIR`` folder -> (image, label) at 1.25 x 1.25 x 7.70 mm, 256 x 256 in-plane."""
    image, instance_rank = read_dicom_series(t2spir_dir / "DICOM_anon")
    cols, rows = image.GetSize()[:2]
    classes = read_ground_truth(t2spir_dir / "Ground", instance_rank, rows, cols)
    image = flip_rows(image)
    label = sitk.GetImageFromArray(np.ascontiguousarray(classes[:, ::-1, :]))
    label.CopyInformation(image)
    return mr_image_steps(image, SPACING), mr_label_steps(label, SPACING)


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """Run the command; returns the written paths (image, label, image, label, ...)."""
    return run_command(
        argv,
        "CHAOST2",
        __doc__.splitlines()[0],
        "CHAOS folder holding MR/<id>/T2SPIR (or the MR folder)",
        find_cases,
        preprocess_case,
    )


if __name__ == "__main__":
    run_cli(main, "preprocess.py")
