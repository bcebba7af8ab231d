"""Scans for inference: reading any 3-D scan with its geometry, checking it, and reorienting it exactly.

A :class:`Volume` is a ``(Z, H, W)`` array (slice, row, column: the project's axis order) with its
:class:`~dataloaders.io.Geometry` (SimpleITK's ``(x, y, z)`` spacing and origin, row-major direction, LPS
world frame). :func:`read_scan` reads NIfTI through :func:`dataloaders.io.read_volume` (so every check of
the project's NIfTI reader applies), any other 3-D format SimpleITK reads (``.nrrd``, ``.mha``, ...) through
SimpleITK, and a folder as a DICOM series; every image read passes :func:`dataloaders.io.check_finite`.

:class:`AxisMap` is a signed axis permutation: it brings a volume into another array layout (the training
layout of a dataset, or the radiological display layout) by transposing and flipping the array and
rewriting the geometry, so that every voxel keeps its physical position and nothing is interpolated.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dataloaders.io import Geometry, check_finite, read_volume, require_simpleitk

sitk = require_simpleitk("segment.py (inference)")

#: File names read through dataloaders.io.read_volume.
NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: DICOM tag of the series description, shown when a folder holds several series.
_SERIES_DESCRIPTION_TAG = "0008|103e"
#: Identity direction: LPS, the layout of radiological display (anterior up, patient's right on the left).
LPS_DIRECTION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


@dataclass
class Volume:
    """A 3-D scan: ``array (Z, H, W)`` and its geometry (``(x, y, z)`` order, see module docstring)."""

    array: np.ndarray
    geometry: Geometry

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in self.array.shape)

    @property
    def voxel_ml(self) -> float:
        """Volume of one voxel in millilitres (spacing in mm)."""
        return float(np.prod(self.geometry.spacing)) / 1000.0

    def to_sitk(self) -> sitk.Image:
        """A SimpleITK image with this array and geometry."""
        return self.geometry.apply_to(sitk.GetImageFromArray(np.ascontiguousarray(self.array)))

    @classmethod
    def from_sitk(cls, image: sitk.Image, source: str | os.PathLike = "<image>") -> Volume:
        """The array and geometry of a scalar 3-D SimpleITK image; anything else is a ``ValueError``."""
        if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
            raise ValueError(
                f"{source}: expected a scalar 3-D image, found {image.GetDimension()} dimensions with "
                f"{image.GetNumberOfComponentsPerPixel()} component(s) per voxel (size {image.GetSize()})"
            )
        return cls(sitk.GetArrayFromImage(image), Geometry.from_image(image))

    def same_grid(self, other: Volume, tolerance: float = 1e-4) -> bool:
        """Same shape, and spacing, origin and direction equal within ``tolerance`` (relative to the
        spacing for the origin)."""
        if self.shape != other.shape:
            return False
        a, b = self.geometry, other.geometry
        spacing = np.asarray(a.spacing)
        return bool(
            np.allclose(a.spacing, b.spacing, rtol=tolerance, atol=0)
            and np.all(np.abs(np.subtract(a.origin, b.origin)) <= tolerance * spacing.max())
            and np.allclose(a.direction, b.direction, atol=tolerance)
        )


def describe_grid(volume: Volume) -> str:
    """Shape (Z, H, W), spacing, origin and direction, rounded, for error messages."""
    g = volume.geometry
    return (
        f"shape (Z,H,W)={volume.shape}, spacing {tuple(round(v, 4) for v in g.spacing)}, "
        f"origin {tuple(round(v, 3) for v in g.origin)}, direction {tuple(round(v, 3) for v in g.direction)}"
    )


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


def dicom_series(folder: str | os.PathLike) -> dict[str, list[str]]:
    """The DICOM series of ``folder``: ``{series instance UID: sorted file names}`` (GDCM's order)."""
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


def read_dicom_series(folder: Path, series: tuple[str, ...] = ()) -> sitk.Image:
    """Read the one DICOM series of ``folder``, or the one whose UID is among ``series``.

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
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(found[chosen[0]])
    try:
        return reader.Execute()
    except RuntimeError as err:
        raise ValueError(f"cannot read the DICOM series {chosen[0]} of {folder}: {_last_line(err)}") from err


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
        volume = Volume.from_sitk(read_dicom_series(path, tuple(series)), path)
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
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


@dataclass(frozen=True)
class AxisMap:
    """A signed permutation of the three array axes (ITK ``(x, y, z)`` order: column, row, slice).

    Output axis ``i`` is input axis ``perm[i]``, reversed when ``flip[i]``. :meth:`apply` rearranges a
    volume's array and rewrites its geometry so that every voxel keeps its physical position.
    """

    perm: tuple[int, int, int] = (0, 1, 2)
    flip: tuple[bool, bool, bool] = (False, False, False)

    @classmethod
    def closest(cls, direction: tuple[float, ...], reference: tuple[float, ...]) -> AxisMap:
        """The signed permutation whose output axes point closest to ``reference``'s axes.

        Both are row-major 3x3 direction matrices (columns = world directions of the array axes x, y, z).
        Maximises the sum over output axes of the cosine between the reference axis and the chosen signed
        input axis; the identity wins ties.
        """
        source = np.asarray(direction, dtype=np.float64).reshape(3, 3)
        target = np.asarray(reference, dtype=np.float64).reshape(3, 3)
        cosines = target.T @ source  # [i, j] = cos(reference axis i, input axis j)
        best, best_score = cls(), -np.inf
        for perm in itertools.permutations(range(3)):
            picked = cosines[range(3), perm]
            score = float(np.abs(picked).sum())
            if score > best_score + 1e-9:
                best = cls(tuple(perm), tuple(bool(v < 0) for v in picked))
                best_score = score
        return best

    @property
    def is_identity(self) -> bool:
        return self.perm == (0, 1, 2) and not any(self.flip)

    def apply(self, volume: Volume) -> Volume:
        """The volume in the output layout: array transposed and flipped, geometry rewritten (exact)."""
        shape_xyz = volume.array.shape[::-1]
        # numpy axis of ITK axis a is 2 - a; output numpy axis 2 - i comes from input numpy axis 2 - perm[i]
        array = np.transpose(volume.array, [2 - self.perm[i] for i in (2, 1, 0)])
        flips = [2 - i for i in range(3) if self.flip[i]]
        if flips:
            array = np.flip(array, axis=flips)
        g = volume.geometry
        direction = np.asarray(g.direction, dtype=np.float64).reshape(3, 3)
        spacing = np.asarray(g.spacing, dtype=np.float64)
        start = np.array([shape_xyz[self.perm[i]] - 1 if self.flip[i] else 0 for i in range(3)], dtype=float)
        index = np.zeros(3)
        index[list(self.perm)] = start  # input index (x, y, z) of the output's first voxel
        origin = np.asarray(g.origin) + direction @ (index * spacing)
        signs = np.where(self.flip, -1.0, 1.0)
        new_direction = direction[:, list(self.perm)] * signs
        geometry = Geometry(
            spacing=tuple(float(spacing[p]) for p in self.perm),
            origin=tuple(float(v) for v in origin),
            direction=tuple(float(v) for v in new_direction.ravel()),
        )
        return Volume(np.ascontiguousarray(array), geometry)

    def source_slice(self, index: int, source_shape: tuple[int, int, int]) -> int:
        """Index, along the input axis that becomes the output slice axis, of output slice ``index``."""
        n = source_shape[2 - self.perm[2]]
        return n - 1 - index if self.flip[2] else index

    @property
    def keeps_slice_axis(self) -> bool:
        """True when the output slices are the input's slices (possibly in reverse order)."""
        return self.perm[2] == 2
