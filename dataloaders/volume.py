"""The one volume type of the project: a ``(Z, H, W)`` array with its geometry, and its exact reorientation.

Axis order: ``(Z, H, W)`` = (slice, row, column), SimpleITK's ``GetArrayFromImage`` order, the order every
array of this project uses. Geometry is kept as SimpleITK reports it: ``spacing`` and ``origin`` in
``(x, y, z)`` order (millimetres), ``direction`` the row-major 3x3 cosine matrix as 9 floats (columns = world
directions of the array axes x, y, z), all in ITK's LPS world frame.

:class:`Volume` carries a scan through training (:mod:`dataloaders.cases`), evaluation and inference
(:mod:`inference`). :class:`AxisMap` is a signed axis permutation: it brings a volume into another array
layout (a dataset's training layout, or the radiological display layout) by transposing and flipping the
array and rewriting the geometry, so that every voxel keeps its physical position and nothing is
interpolated. SimpleITK is needed only by the conversions (:meth:`Volume.to_sitk`, ``from_sitk``).
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import SimpleITK as sitk

#: ITK's world frame is LPS, nibabel's RAS: the first two world axes change sign.
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])
#: Identity direction: LPS, the layout of radiological display (anterior up, patient's right on the left).
LPS_DIRECTION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
#: Tolerance of :meth:`Geometry.matches`: relative to the spacing (spacing, origin) and absolute (cosines).
GEOMETRY_TOLERANCE = 1e-4


def require_simpleitk(purpose: str) -> ModuleType:
    """The SimpleITK module, or ``ImportError`` saying that ``purpose`` needs it."""
    try:
        import SimpleITK
    except ImportError as err:
        raise ImportError(
            f"{purpose} needs SimpleITK (pip install SimpleITK, pinned in requirements.txt); training and "
            "testing do not (they read NIfTI with nibabel when SimpleITK is missing)"
        ) from err
    return SimpleITK


@dataclass(frozen=True)
class Geometry:
    """Physical placement of a volume, in SimpleITK's ``(x, y, z)`` order."""

    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @classmethod
    def from_image(cls, image: sitk.Image | sitk.ImageFileReader) -> Geometry:
        return cls(
            spacing=tuple(float(v) for v in image.GetSpacing()),
            origin=tuple(float(v) for v in image.GetOrigin()),
            direction=tuple(float(v) for v in image.GetDirection()),
        )

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        """Copy this geometry onto ``image`` (in place) and return it."""
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    @classmethod
    def from_ras_affine(cls, affine: np.ndarray) -> Geometry:
        """Geometry of a nibabel ``(4, 4)`` voxel-to-RAS affine (no shear: columns are spacing x cosines)."""
        lps = RAS_TO_LPS @ np.asarray(affine, dtype=np.float64)[:3]
        spacing = np.linalg.norm(lps[:, :3], axis=0)
        direction = lps[:, :3] / spacing
        return cls(
            spacing=tuple(float(v) for v in spacing),
            origin=tuple(float(v) for v in lps[:, 3]),
            direction=tuple(float(v) for v in direction.ravel()),
        )

    def ras_affine(self) -> np.ndarray:
        """The ``(4, 4)`` voxel-to-RAS affine nibabel writes for this geometry."""
        affine = np.eye(4)
        affine[:3, :3] = np.asarray(self.direction, dtype=np.float64).reshape(3, 3) * np.asarray(self.spacing)
        affine[:3, 3] = self.origin
        affine[:3] = RAS_TO_LPS @ affine[:3]
        return affine

    @property
    def is_default(self) -> bool:
        """Spacing 1, origin 0 and identity direction: what a file without geometry carries (the published
        supervoxels were written so)."""
        return (
            self.spacing == (1.0, 1.0, 1.0)
            and self.origin == (0.0, 0.0, 0.0)
            and (self.direction == LPS_DIRECTION)
        )

    def matches(self, other: Geometry, tolerance: float = GEOMETRY_TOLERANCE) -> bool:
        """Spacing, origin and direction equal within ``tolerance`` (relative to the spacing for spacing
        and origin, absolute for the direction cosines)."""
        spacing = np.asarray(self.spacing)
        return bool(
            np.allclose(self.spacing, other.spacing, rtol=tolerance, atol=0)
            and np.all(np.abs(np.subtract(self.origin, other.origin)) <= tolerance * spacing.max())
            and np.allclose(self.direction, other.direction, atol=tolerance)
        )

    def describe(self) -> str:
        """Spacing, origin and direction, rounded, for error messages."""
        return (
            f"spacing {tuple(round(v, 4) for v in self.spacing)}, "
            f"origin {tuple(round(v, 3) for v in self.origin)}, "
            f"direction {tuple(round(v, 3) for v in self.direction)}"
        )


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
        sitk = require_simpleitk("Volume.to_sitk")
        return self.geometry.apply_to(sitk.GetImageFromArray(np.ascontiguousarray(self.array)))

    @classmethod
    def from_sitk(cls, image: sitk.Image, source: str | os.PathLike = "<image>") -> Volume:
        """The array and geometry of a scalar 3-D SimpleITK image; anything else is a ``ValueError``."""
        sitk = require_simpleitk("Volume.from_sitk")
        if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
            raise ValueError(
                f"{source}: expected a scalar 3-D image, found {image.GetDimension()} dimensions with "
                f"{image.GetNumberOfComponentsPerPixel()} component(s) per voxel (size {image.GetSize()})"
            )
        return cls(sitk.GetArrayFromImage(image), Geometry.from_image(image))

    def same_grid(self, other: Volume, tolerance: float = GEOMETRY_TOLERANCE) -> bool:
        """Same shape and geometry (:meth:`Geometry.matches` within ``tolerance``)."""
        return self.shape == other.shape and self.geometry.matches(other.geometry, tolerance)

    def describe(self) -> str:
        """Shape (Z, H, W), spacing, origin and direction, rounded, for error messages."""
        return f"shape (Z,H,W)={self.shape}, {self.geometry.describe()}"


def check_finite(array: np.ndarray, source: str | os.PathLike = "<array>") -> None:
    """Raise ``ValueError`` if a floating-point ``array`` holds NaN or ±Inf voxels.

    The message names ``source``, counts the non-finite voxels by kind and gives the first one's index in
    the array's own axis order (``(z, y, x)`` for the project's volumes). Integer arrays pass unchecked.
    """
    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.floating):
        return
    bad = ~np.isfinite(array)
    if not bad.any():
        return
    n_bad = int(np.count_nonzero(bad))
    n_nan = int(np.count_nonzero(np.isnan(array)))
    n_pos = int(np.count_nonzero(np.isposinf(array)))
    first = tuple(int(v) for v in np.unravel_index(int(np.argmax(bad)), array.shape))
    raise ValueError(
        f"{source}: {n_bad} non-finite voxel(s) of {array.size} (NaN {n_nan}, +Inf {n_pos}, "
        f"-Inf {n_bad - n_nan - n_pos}); the first at index {first} of shape {array.shape}"
    )


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
