"""DICOM in and out for ``segment.py``: a series folder read with its slices checked, and the result written
as a DICOM Segmentation (DICOM SEG) that references the source series, for PACS viewers.

:func:`series_files` finds the series of a folder (GDCM, through SimpleITK), reads every slice's header
(pydicom) and returns the files sorted along the slice normal. It refuses, naming the files, a series whose
slices differ in orientation, size, pixel spacing or frame of reference (mixed series), two slices at one
position (a duplicate), a step that is a multiple of the series' spacing (missing slices) and any other
uneven step. The slices are then read in that order, so slice ``k`` of the volume is file ``k``.

:func:`write_dicom_seg` writes a binary DICOM SEG with ``highdicom``: one segment per organ (its name, an
algorithm identification naming difd, its version and the checkpoint), one frame per source slice that
holds the organ, each referencing its source instance.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dataloaders import Volume
from dataloaders.volume import require_simpleitk
from utils import write_atomically

sitk = require_simpleitk("segment.py (DICOM)")

#: DICOM tag of the series description, shown when a folder holds several series.
_SERIES_DESCRIPTION_TAG = "0008|103e"
#: Relative tolerance on slice steps and on the attributes slices must share.
STEP_TOLERANCE = 1e-3


def dicom_series(folder: str | os.PathLike) -> dict[str, list[str]]:
    """The DICOM series of ``folder``: ``{series instance UID: file names}`` (GDCM's grouping)."""
    folder = str(folder)
    reader = sitk.ImageSeriesReader
    return {uid: list(reader.GetGDCMSeriesFileNames(folder, uid)) for uid in reader.GetGDCMSeriesIDs(folder)}


def _series_description(path: str) -> str:
    header = sitk.ImageFileReader()
    header.SetFileName(path)
    header.ReadImageInformation()
    if header.HasMetaDataKey(_SERIES_DESCRIPTION_TAG):
        return header.GetMetaData(_SERIES_DESCRIPTION_TAG).strip()
    return ""


def choose_series(folder: Path, series: tuple[str, ...] = ()) -> tuple[str, list[str]]:
    """The one series of ``folder``, or the one whose UID is among ``series``: ``(UID, its files)``.

    Raises:
        FileNotFoundError: the folder holds no DICOM series.
        ValueError: several series and none (or several) of them chosen by ``series``; the message lists
            every series with its UID, file count and description.
    """
    found = dicom_series(folder)
    if not found:
        raise FileNotFoundError(f"{folder}: expected a DICOM series in this folder, found none")
    chosen = [uid for uid in found if uid in series] if len(found) > 1 else list(found)
    if len(chosen) != 1:
        listing = "; ".join(
            f"{uid} ({len(files)} files, {_series_description(files[0])!r})" for uid, files in found.items()
        )
        asked = f"--series {list(series)} matches {len(chosen)} of them" if series else "choose one"
        raise ValueError(f"{folder}: holds {len(found)} DICOM series ({asked} with --series UID): {listing}")
    return chosen[0], found[chosen[0]]


def _agree(a: object, b: object) -> bool:
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    a, b = np.ravel(np.asarray(a, dtype=float)), np.ravel(np.asarray(b, dtype=float))
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=STEP_TOLERANCE, atol=1e-4))


def _shared(headers: list, name: str, files: list[str], folder: Path) -> None:
    """Every slice has the first one's ``name`` attribute, else a mixed series naming both files."""
    first = getattr(headers[0], name, None)
    for header, file in zip(headers, files, strict=True):
        value = getattr(header, name, None)
        if (value is None) != (first is None) or (value is not None and not _agree(value, first)):
            raise ValueError(
                f"{folder}: mixed series: {Path(files[0]).name} has {name} {first} but "
                f"{Path(file).name} has {value}"
            )


def check_slices(folder: Path, files: Sequence[str]) -> list[str]:
    """The files of one series sorted along the slice normal, after the checks of the module docstring."""
    import pydicom

    files = list(files)
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    for header, file in zip(headers, files, strict=True):
        needed = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")
        missing = [a for a in needed if a not in header]
        if missing:
            raise ValueError(f"{file}: a slice of a DICOM series needs {missing}, which it lacks")
    for name in ("ImageOrientationPatient", "Rows", "Columns", "PixelSpacing", "FrameOfReferenceUID"):
        _shared(headers, name, files, folder)
    row, column = np.reshape(np.asarray(headers[0].ImageOrientationPatient, dtype=float), (2, 3))
    normal = np.cross(row, column)
    along = np.array([np.dot(normal, np.asarray(h.ImagePositionPatient, dtype=float)) for h in headers])
    order = np.argsort(along, kind="stable")
    files, along = [files[i] for i in order], along[order]
    if len(files) < 2:
        return files
    steps = np.diff(along)
    names = [Path(f).name for f in files]
    duplicate = np.flatnonzero(steps <= STEP_TOLERANCE * max(1.0, float(np.abs(steps).max())))
    if duplicate.size:
        k = int(duplicate[0])
        raise ValueError(
            f"{folder}: duplicated slice: {names[k]} and {names[k + 1]} lie at the same position "
            f"({along[k]:.3f} mm along the slice normal)"
        )
    spacing = float(np.min(steps))
    for k, step in enumerate(steps):
        ratio = step / spacing
        if abs(ratio - 1) <= STEP_TOLERANCE:
            continue
        if abs(ratio - round(ratio)) <= STEP_TOLERANCE:
            raise ValueError(
                f"{folder}: {round(ratio) - 1} missing slice(s) between {names[k]} and {names[k + 1]} "
                f"({step:.3f} mm apart; the series' slices are {spacing:.3f} mm apart)"
            )
        raise ValueError(
            f"{folder}: inconsistent slice spacing: {names[k]} to {names[k + 1]} is {step:.3f} mm, the "
            f"series' slices are {spacing:.3f} mm apart"
        )
    return files


def series_files(folder: Path, series: tuple[str, ...] = ()) -> list[str]:
    """The checked, sorted slice files of the chosen series of ``folder`` (:func:`choose_series`,
    :func:`check_slices`)."""
    _, files = choose_series(folder, series)
    return check_slices(folder, files)


def read_series(folder: Path, series: tuple[str, ...] = ()) -> sitk.Image:
    """The chosen series of ``folder`` as one image, its slices in :func:`series_files`' order."""
    files = series_files(folder, series)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        return reader.Execute()
    except RuntimeError as err:
        text = str(err).strip().splitlines()
        raise ValueError(f"cannot read the DICOM series of {folder}: {text[-1] if text else err}") from err


def write_dicom_seg(
    label_map: Volume,
    labels: Sequence[int],
    names: dict[int, str],
    source_files: Sequence[str],
    checkpoint: tuple[str, str],
    path: Path,
) -> Path:
    """Write ``label_map`` (on the grid of the series read from ``source_files``, slice ``k`` = file ``k``)
    as a binary DICOM SEG (module docstring). ``checkpoint``: its file name and SHA-256."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    sources = [pydicom.dcmread(f) for f in source_files]
    if label_map.shape != (len(sources), int(sources[0].Rows), int(sources[0].Columns)):
        raise ValueError(
            f"{path}: the label map's shape {label_map.shape} is not the {len(sources)} source slices'"
        )
    version = importlib.metadata.version("difd")
    algorithm = hd.AlgorithmIdentificationSequence(
        name="difd",
        version=version,
        family=codes.cid7162.ArtificialIntelligence,
        parameters={"checkpoint": checkpoint[0], "checkpoint_sha256": checkpoint[1]},
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=names[value],
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=codes.SCT.Organ,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=hd.UID(),
            tracking_id=f"difd label {value}",
        )
        for number, value in enumerate(labels, start=1)
    ]
    pixels = np.stack([label_map.array == value for value in labels], axis=-1).astype(np.uint8)
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=int(getattr(sources[0], "SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="difd",
        manufacturer_model_name="difd segment.py",
        software_versions=version,
        device_serial_number=checkpoint[1][:16],
        series_description=f"difd segmentation ({checkpoint[0]})"[:64],
    )
    return write_atomically(path, lambda tmp: seg.save_as(tmp), what="DICOM SEG")
