"""Synthetic datasets in the on-disk layout of method.md §1, written to a temporary folder."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from dataloaders.datasets import DATASETS, DatasetInfo

#: A CHAOST2-like dataset of 4 volumes, one per fold position, so that fold 0 tests case 0 and trains on 1..3.
SYN = dataclasses.replace(
    DATASETS["CHAOST2"],
    name="SYN",
    description="synthetic test volumes",
    image_folder="syn_normalized",
    n_volumes=4,
    folds=((0, 1), (1, 2), (2, 3), (3, 0)),
)

SHAPE = (12, 48, 48)  # Z, H, W


def write(array: np.ndarray, path: Path, spacing: tuple[float, float, float] = (1.5, 1.5, 5.0)) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))


def synthetic_case(case_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image, label and supervoxels of one synthetic case, each ``SHAPE``.

    Labels: 1 in slices 2..7 (a 20x20 square), 2 in slices 6..9, 3 in slices 0..11 (small), 4 absent.
    Supervoxels: id 5 everywhere in a 24x24 square (slices 0..11), id 9 a 16x16 square in slices 3..5, id 12
    a 4x4 square (16 pixels, always below min_size) in slices 0..11.
    """
    rng = np.random.default_rng(case_id)
    z, h, w = SHAPE
    image = rng.normal(100.0, 20.0, size=SHAPE) + np.linspace(0, 50, w)[None, None, :]
    label = np.zeros(SHAPE, dtype=np.uint8)
    label[2:8, 4:24, 4:24] = 1
    label[6:10, 26:40, 26:40] = 2
    label[:, 42:46, 2:6] = 3
    sv = np.zeros(SHAPE, dtype=np.int32)
    sv[:, 12:36, 12:36] = 5
    sv[3:6, 30:46, 30:46] = 9
    sv[:, 0:4, 40:44] = 12
    image[label == 1] += 40.0
    return image.astype(np.float64), label, sv


def make_root(tmp_path: Path, info: DatasetInfo = SYN, case_ids: tuple[int, ...] = (3, 11, 20, 104)) -> Path:
    """Write ``case_ids`` in ``info``'s layout under ``tmp_path``; returns the data root."""
    image_dir = tmp_path / info.name / info.image_folder
    sv_dir = tmp_path / info.name / info.supervoxel_folder()
    image_dir.mkdir(parents=True)
    sv_dir.mkdir(parents=True)
    for case_id in case_ids:
        image, label, sv = synthetic_case(case_id)
        write(image, image_dir / info.image_pattern.format(id=case_id))
        write(label, image_dir / info.label_pattern.format(id=case_id))
        write(sv, sv_dir / info.supervoxel_pattern.format(id=case_id), spacing=(1.0, 1.0, 1.0))
    return tmp_path
