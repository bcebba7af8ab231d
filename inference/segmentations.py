"""3D Slicer segmentations (``.seg.nrrd``) in and out, and support labels on a part of their image's grid.

A support label is a :class:`SupportLabel`: one or more integer label maps ("layers", as Slicer stores
overlapping segments) on the support image's grid, and per requested organ the layer and value that hold
it. A plain label map is one layer whose organs are the requested values.

Slicer's file is read with ``slicerio`` (the Slicer project's reader): its voxels are ``(i, j, k)`` or, with
overlapping segments, ``(layer, i, j, k)``, placed by a 4 × 4 ``ijkToLPS`` matrix; segments carry a name, a
colour, a layer and a label value. By default Slicer crops the array to the segments' extent, so the file's
grid is a part of the image's: :func:`place_on_grid` puts any label whose grid is a voxel-aligned sub-grid
of the image (same spacing and direction, origin on the image's lattice, inside it) back onto the image's
grid exactly, and refuses anything else naming both geometries.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dataloaders import Geometry, Volume
from dataloaders.volume import GEOMETRY_TOLERANCE
from utils import write_atomically

SEG_SUFFIX = ".seg.nrrd"


@dataclass
class SupportLabel:
    """The support's organs: ``layers (L, Z, H, W)`` integer label maps with their ``geometry``;
    ``organs[value] = (layer, value in that layer)`` for every requested organ, keyed by the value the
    outputs give it; ``names`` and ``colours`` (RGB in [0, 1]) per organ where the file has them."""

    layers: np.ndarray
    geometry: Geometry
    organs: dict[int, tuple[int, int]]
    names: dict[int, str]
    colours: dict[int, tuple[float, float, float]]

    @classmethod
    def from_label_map(cls, label: Volume, labels: Sequence[int]) -> SupportLabel:
        """One layer: the organs are the requested values of ``label``."""
        return cls(label.array[None], label.geometry, {v: (0, v) for v in labels}, {}, {})

    @property
    def labels(self) -> list[int]:
        return list(self.organs)

    def mask(self, value: int) -> np.ndarray:
        """``(Z, H, W)`` bool mask of one organ."""
        layer, stored = self.organs[value]
        return self.layers[layer] == stored

    def layer_volume(self, layer: int) -> Volume:
        return Volume(self.layers[layer], self.geometry)


def is_seg_nrrd(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(SEG_SUFFIX)


def _geometry_from_ijk_to_lps(matrix: np.ndarray) -> Geometry:
    axes = np.asarray(matrix, dtype=float)[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    origin = np.asarray(matrix, dtype=float)[:3, 3]
    return Geometry(tuple(spacing), tuple(origin), tuple((axes / spacing).ravel()))


def _ijk_to_lps(geometry: Geometry) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, :3] = np.reshape(geometry.direction, (3, 3)) * np.asarray(geometry.spacing)
    matrix[:3, 3] = geometry.origin
    return matrix


def _describe_segments(segments: list[dict]) -> str:
    return "; ".join(
        f"{s.get('name', s.get('id'))!r} (value {s.get('labelValue', 1)}, layer {s.get('layer', 0)})"
        for s in segments
    )


def read_seg_nrrd(path: Path, selectors: Sequence[str]) -> SupportLabel:
    """The segments of a Slicer ``.seg.nrrd`` named by ``selectors``: each a segment name or a label value.

    Organs keep their label values when the chosen segments' values are distinct, else (segments of
    several layers share a value) they are numbered 1..n in the order of ``selectors``. A selector that
    names no segment, or a value several segments share, is a ``ValueError`` listing the file's segments.
    """
    import slicerio

    try:
        segmentation = slicerio.read_segmentation(str(path))
    except Exception as err:  # slicerio raises IOError, KeyError, ValueError for malformed headers
        raise ValueError(f"cannot read {path} as a Slicer segmentation: {err}") from err
    voxels = np.asarray(segmentation["voxels"])
    if voxels.ndim not in (3, 4) or not np.issubdtype(voxels.dtype, np.integer):
        raise ValueError(
            f"{path}: expected integer (i, j, k) or (layer, i, j, k) voxels, found {voxels.dtype} "
            f"{voxels.shape}"
        )
    layers = voxels.transpose(2, 1, 0)[None] if voxels.ndim == 3 else voxels.transpose(0, 3, 2, 1)
    segments = segmentation.get("segments", [])
    chosen = []
    for selector in selectors:
        named = [s for s in segments if s.get("name") == selector]
        if not named and str(selector).isdigit():
            named = [s for s in segments if s.get("labelValue", 1) == int(selector)]
        if len(named) != 1:
            problem = "names no segment" if not named else f"matches {len(named)} segments (give its name)"
            held = _describe_segments(segments) or "no segments"
            raise ValueError(f"{path}: --label {selector!r} {problem}; the file holds {held}")
        if named[0] in chosen:
            raise ValueError(f"{path}: segment {named[0].get('name')!r} requested twice")
        chosen.append(named[0])
    stored = [int(s.get("labelValue", 1)) for s in chosen]
    values = stored if len(set(stored)) == len(stored) else list(range(1, len(chosen) + 1))
    return SupportLabel(
        np.ascontiguousarray(layers),
        _geometry_from_ijk_to_lps(segmentation["ijkToLPS"]),
        {v: (int(s.get("layer", 0)), sv) for v, s, sv in zip(values, chosen, stored, strict=True)},
        {v: str(s.get("name", s.get("id"))) for v, s in zip(values, chosen, strict=True)},
        {v: tuple(s["color"]) for v, s in zip(values, chosen, strict=True) if "color" in s},
    )


def place_on_grid(label: SupportLabel, image: Volume, sources: tuple[str, str]) -> SupportLabel:
    """``label`` on ``image``'s grid: as it is when the grids match; zero-padded when its grid is a
    voxel-aligned sub-grid of the image's (module docstring); else a ``ValueError`` naming both geometries."""
    shape = label.layers.shape[1:]
    if shape == image.shape and label.geometry.matches(image.geometry):
        return label
    own, other = image.geometry, label.geometry
    # the label's origin in the image's voxel coordinates (x, y, z), and its axes in image voxels
    axes = np.reshape(own.direction, (3, 3)) * np.asarray(own.spacing)
    start = np.linalg.solve(axes, np.subtract(other.origin, own.origin))
    corner = np.rint(start).astype(int)
    aligned = (
        np.allclose(own.spacing, other.spacing, rtol=GEOMETRY_TOLERANCE, atol=0)
        and np.allclose(own.direction, other.direction, atol=GEOMETRY_TOLERANCE)
        and np.all(np.abs(start - corner) <= GEOMETRY_TOLERANCE * 10)
    )
    size = np.asarray(shape[::-1])  # (x, y, z)
    inside = bool(np.all(corner >= 0) and np.all(corner + size <= np.asarray(image.shape[::-1])))
    if not (aligned and inside):
        image_source, label_source = sources
        why = "is not on the image's voxel lattice" if not aligned else "reaches outside the image"
        raise ValueError(
            f"support image and label are on different grids: {image_source} has {image.describe()}; "
            f"{label_source} has shape (Z,H,W)={tuple(shape)}, {other.describe()} (the label's grid {why})"
        )
    x, y, z = corner
    layers = np.zeros((label.layers.shape[0], *image.shape), dtype=label.layers.dtype)
    layers[:, z : z + shape[0], y : y + shape[1], x : x + shape[2]] = label.layers
    return SupportLabel(layers, own, label.organs, label.names, label.colours)


def write_seg_nrrd(
    label_map: Volume,
    labels: Sequence[int],
    names: dict[int, str],
    colours: dict[int, tuple[float, float, float]],
    path: Path,
) -> Path:
    """Write a label map as a Slicer segmentation on its own grid: one segment per organ (label value =
    the organ's value, its name and colour), all in layer 0 (the organs of a label map do not overlap)."""
    import slicerio

    voxels = np.ascontiguousarray(label_map.array.transpose(2, 1, 0))  # (Z, H, W) -> (i, j, k)
    segmentation = slicerio.create_segmentation(voxels.shape, _ijk_to_lps(label_map.geometry), voxels.dtype)
    segmentation["voxels"] = voxels
    for value in labels:
        where = np.nonzero(voxels == value)
        extent = [int(f(a)) for a in where for f in (np.min, np.max)] if where[0].size else [0, -1] * 3
        segmentation["segments"].append(
            {
                "id": f"Segment_{value}",
                "name": names[value],
                "color": [float(c) for c in colours[value]],
                "labelValue": int(value),
                "layer": 0,
                "extent": extent,
            }
        )

    def write(tmp: Path) -> None:
        slicerio.write_segmentation(str(tmp), segmentation)

    return write_atomically(path, write, what="Slicer segmentation", keep_suffix=True)
