"""Raw inputs of the preprocessing commands, written by the tests: a CHAOS-style T2-SPIR case (a DICOM series
and its ground-truth PNGs, named like the CHAOS release)."""

from __future__ import annotations

import locale
from pathlib import Path

import numpy as np
import SimpleITK as sitk

CHAOS_SPACING = (1.5, 1.6, 6.0)  # x (cols), y (rows), z
CHAOS_ORIGIN = (-30.0, -20.0, 10.0)
CHAOS_SHAPE = (6, 40, 48)  # Z, rows, cols


def chaos_volumes() -> tuple[np.ndarray, np.ndarray]:
    """``(Z, rows, cols)`` int16 image and uint8 grey ground truth in DICOM row order, slice 0 lowest."""
    rng = np.random.default_rng(0)
    image = rng.integers(90, 110, size=CHAOS_SHAPE).astype(np.int16)
    grey = np.zeros(CHAOS_SHAPE, dtype=np.uint8)
    grey[0:3, 4:16, 8:30] = 63  # liver: low slices, top rows
    grey[3:6, 24:36, 28:44] = 252  # spleen: high slices, bottom rows
    grey[1:5, 20:30, 4:12] = 126  # right kidney
    image[grey == 63] += 200
    image[grey == 252] += 500
    image[0, 0, :30] = 5000  # bright outliers above the 99.5th percentile
    return image, grey


def write_chaos_case(
    root: Path, case_id: int = 1, reverse_instances: bool = False, z_positions: list[float] | None = None
) -> Path:
    """Write ``root/MR/<id>/T2SPIR/{DICOM_anon,Ground}``; returns the T2SPIR folder."""
    image, grey = chaos_volumes()
    t2spir = root / "MR" / str(case_id) / "T2SPIR"
    (t2spir / "DICOM_anon").mkdir(parents=True)
    (t2spir / "Ground").mkdir()
    depth = image.shape[0]
    if z_positions is None:
        z_positions = [CHAOS_ORIGIN[2] + k * CHAOS_SPACING[2] for k in range(depth)]
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    # GDCM's DICOM writer resets the process locale to "C" (ASCII), which would make every later
    # subprocess decode its UTF-8 output with the wrong codec: restore it after writing.
    saved_locale = locale.setlocale(locale.LC_ALL)
    try:
        write_chaos_slices(writer, image, grey, t2spir, z_positions, reverse_instances)
    finally:
        locale.setlocale(locale.LC_ALL, saved_locale)
    return t2spir


def write_chaos_slices(
    writer: sitk.ImageFileWriter,
    image: np.ndarray,
    grey: np.ndarray,
    t2spir: Path,
    z_positions: list[float],
    reverse_instances: bool,
) -> None:
    """One DICOM file and one ground-truth PNG per slice, named like the CHAOS release."""
    depth = image.shape[0]
    for k in range(depth):
        number = depth - k if reverse_instances else k + 1
        dicom = sitk.GetImageFromArray(image[k])
        dicom.SetSpacing(CHAOS_SPACING[:2])
        tags = {
            "0008|0060": "MR",
            "0020|000d": "1.2.826.0.1.3680043.9.7.1",
            "0020|000e": "1.2.826.0.1.3680043.9.7.1.1",
            "0008|0018": f"1.2.826.0.1.3680043.9.7.1.1.{number}",
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0020|0032": f"{CHAOS_ORIGIN[0]}\\{CHAOS_ORIGIN[1]}\\{z_positions[k]}",
            "0020|0013": str(number),
            "0018|0050": str(CHAOS_SPACING[2]),
        }
        for key, value in tags.items():
            dicom.SetMetaData(key, value)
        writer.SetFileName(str(t2spir / "DICOM_anon" / f"IMG-0004-{number:05d}.dcm"))
        writer.Execute(dicom)
        sitk.WriteImage(
            sitk.GetImageFromArray(grey[k]), str(t2spir / "Ground" / f"IMG-0004-{number:05d}.png")
        )
