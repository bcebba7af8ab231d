"""Stage 1 of inference, the boundary: a user's scans read into :class:`~dataloaders.volume.Volume` objects,
and every check of what a user gives (scans, label values, the support pair, query ranges), shared by
``segment.py`` and the Python API (:mod:`inference.segmenter`).

:func:`read_scan` reads NIfTI through :func:`dataloaders.nifti.read_volume` (so every check of the project's
NIfTI reader applies), any other 3-D format SimpleITK reads (``.nrrd``, ``.mha``, ...) through SimpleITK,
and a folder as a DICOM series (:func:`inference.dicom.read_series`: its slices checked and sorted); every
scan read passes :func:`check_scan`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dataloaders import AxisMap, Volume, check_finite, read_volume
from dataloaders.volume import require_simpleitk
from inference.dicom import read_series
from inference.segmentations import SEG_SUFFIX, SupportLabel, is_seg_nrrd, place_on_grid, read_seg_nrrd

sitk = require_simpleitk("segment.py (inference)")

#: File names read through dataloaders.nifti.read_volume.
NIFTI_SUFFIXES = (".nii", ".nii.gz")


def check_scan(volume: Volume, source: str | os.PathLike, constant_ok: bool = False) -> Volume:
    """Raise ``ValueError`` naming ``source`` for an empty, non-finite or (unless ``constant_ok``, for label
    maps) constant scan; returns it."""
    if volume.array.ndim != 3:
        raise ValueError(f"{source}: expected a (Z, H, W) array, found shape {volume.array.shape}")
    if volume.array.size == 0:
        raise ValueError(f"{source}: the scan is empty (shape (Z,H,W)={volume.shape})")
    check_finite(volume.array, source)
    if not constant_ok and volume.array.min() == volume.array.max():
        raise ValueError(
            f"{source}: the scan is empty: every voxel has the value {volume.array.flat[0]} "
            "(nothing to segment, and the intensity normalisation needs a spread)"
        )
    return volume


def _last_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[-1] if text else type(err).__name__


def read_scan(path: str | os.PathLike, series: tuple[str, ...] = (), constant_ok: bool = False) -> Volume:
    """Read a 3-D scan: a NIfTI file, any 3-D file SimpleITK reads, or a DICOM series folder.

    ``series``: series instance UIDs to choose from when a DICOM folder holds several series. The result is
    checked by :func:`check_scan` (non-empty, finite, not constant unless ``constant_ok``). A missing path
    raises ``FileNotFoundError``; an unreadable, 2-D, 4-D, vector-valued or non-finite one ``ValueError``,
    both naming the path.
    """
    path = Path(path)
    if path.is_dir():
        volume = Volume.from_sitk(read_series(path, tuple(series)), path)
    elif not path.is_file():
        raise FileNotFoundError(f"scan not found: {path}")
    elif path.name.endswith(NIFTI_SUFFIXES):
        volume = Volume(*read_volume(path))
    else:
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as err:
            raise ValueError(f"cannot read {path}: {_last_line(err)}") from err
        volume = Volume.from_sitk(image, path)
    return check_scan(volume, path, constant_ok)


def scan_name(path: str | os.PathLike) -> str:
    """Output name of a scan: the file name without its image suffix, or the DICOM folder's name."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii", SEG_SUFFIX, ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def check_labels(labels: Sequence[int]) -> list[int]:
    """Label values to segment: at least one, positive, integers, no repeats."""
    if not labels:
        raise ValueError("labels: expected at least one label value to segment, got none")
    bad = [v for v in labels if isinstance(v, bool) or int(v) != v or int(v) <= 0]
    if bad or len(set(labels)) != len(labels):
        raise ValueError(f"labels: expected distinct positive integers (0 is background), got {list(labels)}")
    return [int(v) for v in labels]


def check_support(
    image: Volume, label: Volume | SupportLabel, labels: Sequence[int], sources: tuple[str, str]
) -> SupportLabel:
    """Support image and label: scans (:func:`check_scan`; the label may be constant), the label on the
    image's grid or a voxel-aligned part of it (:func:`~inference.segmentations.place_on_grid`), a label
    map integer-valued and holding every requested value (:func:`check_labels`), a Slicer segmentation's
    chosen segments not empty. Returns the label on the image's grid; ``sources`` name the image and the
    label in errors."""
    image_source, label_source = sources
    check_scan(image, image_source)
    if isinstance(label, SupportLabel):
        support = place_on_grid(label, image, sources)
        empty = [support.names.get(v, v) for v in support.labels if not support.mask(v).any()]
        if empty:
            raise ValueError(f"{label_source}: segment(s) {empty} hold no voxel")
        return support
    labels = check_labels(labels)
    check_scan(label, label_source, constant_ok=True)
    values = np.unique(label.array)
    if not np.array_equal(values, np.rint(values)):
        raise ValueError(
            f"{label_source}: a label map must hold integers, found values such as "
            f"{values[values != np.rint(values)][:5].tolist()}"
        )
    absent = [v for v in labels if v not in values]
    if absent:
        raise ValueError(
            f"{label_source}: label value(s) {absent} not found; the support label holds "
            f"{[int(v) for v in values if v != 0]} (and 0)"
        )
    return place_on_grid(SupportLabel.from_label_map(label, labels), image, sources)


def read_support_label(
    path: str | os.PathLike, selectors: Sequence[str], series: tuple[str, ...] = ()
) -> tuple[Volume | SupportLabel, list[int]]:
    """The support label of ``segment.py``: a Slicer ``.seg.nrrd`` (its segments chosen by name or label
    value, :func:`~inference.segmentations.read_seg_nrrd`) or a label map (:func:`read_scan`; label values
    only). Returns it with the organs' label values."""
    path = Path(path)
    if is_seg_nrrd(path):
        if not path.is_file():
            raise FileNotFoundError(f"scan not found: {path}")
        support = read_seg_nrrd(path, [str(s) for s in selectors])
        return support, support.labels
    names = [s for s in selectors if not str(s).lstrip("-").isdigit()]
    if names:
        raise ValueError(
            f"--label {names[0]!r}: segment names need a Slicer segmentation ({SEG_SUFFIX}); {path} is a "
            "label map, so give label values"
        )
    return read_scan(path, series, constant_ok=True), check_labels([int(s) for s in selectors])


def check_query(
    scan: Volume,
    query_range: tuple[int, int] | None,
    layout: AxisMap | None,
    source: str | os.PathLike = "query",
) -> tuple[int, int] | None:
    """A query scan (:func:`check_scan`) and its known organ extent ``[z0, z1)`` on the scan's own slice
    axis, if given: inside the scan and, when the ``layout`` the scan is brought into is known, along the
    model's slice axis (:func:`check_slice_axis`). Returns the range as ints, or None."""
    check_scan(scan, source)
    if query_range is None:
        return None
    z0, z1 = (int(v) for v in query_range)
    depth = scan.shape[0]
    if not 0 <= z0 < z1 <= depth:
        raise ValueError(f"{source}: query range {z0}:{z1} is outside its {depth} slices (0:{depth})")
    if layout is not None:
        check_slice_axis((z0, z1), layout, source)
    return z0, z1


def check_slice_axis(query_range: tuple[int, int] | None, layout: AxisMap, source: str | os.PathLike) -> None:
    """A query range selects model slices only when the scan's slice axis stays the slice axis in the
    ``layout`` the scan is brought into (:meth:`inference.presets.Preset.layout`)."""
    if query_range is not None and not layout.keeps_slice_axis:
        raise ValueError(
            f"{source}: its slice axis is not the model's, so a query range along it does not select model "
            "slices; omit the range for this query"
        )


def as_volume(image: sitk.Image | Volume, what: str) -> Volume:
    """A :class:`Volume` from a SimpleITK image or a Volume (a ``TypeError`` for anything else)."""
    if isinstance(image, Volume):
        return image
    if isinstance(image, sitk.Image):
        return Volume.from_sitk(image, what)
    raise TypeError(f"{what}: expected a SimpleITK image or an inference.Volume, got {type(image).__name__}")
