"""Stage 2 of inference: a scan into a model's frame (its preset's preprocessing, at the model's slice size).

1. **orientation**: the array is transposed/flipped (:class:`~dataloaders.volume.AxisMap`, exact, no
   interpolation) into the preset's training layout, the signed axis permutation whose axes point closest
   to the training data's direction matrix;
2. **intensity, spacing, crop/pad**: the preset's steps (:mod:`inference.presets`);
3. **normalisation and slice size**: the loaders' per-volume ``(v - mean) / std``
   (:func:`dataloaders.transforms.normalize_volume`) over the result, then every slice resized (bilinear)
   to the checkpoint's ``image_size`` (None: kept).

A :class:`ModelFrame` keeps the physical placement of the grid it makes, so that stage 4
(:mod:`inference.label_maps`) can resample the model's output back onto the scan's own grid.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from dataloaders import AxisMap, Geometry, Volume, normalize_volume, resize_slices
from inference.presets import Preset, sitk
from inference.segmentations import SupportLabel


def _model_geometry(frame: sitk.Image, size: tuple[int, int]) -> Geometry:
    """Geometry of the ``(Z, size_y, size_x)`` grid that bilinear resizing (``cv2.INTER_LINEAR``: sample
    ``i`` at input position ``(i + 0.5) * scale - 0.5``) makes of ``frame``'s slices."""
    width, height = frame.GetSize()[:2]
    scale = np.array([width / size[1], height / size[0], 1.0])
    spacing = np.asarray(frame.GetSpacing()) * scale
    shift = (scale - 1) / 2 * np.asarray(frame.GetSpacing())
    direction = np.asarray(frame.GetDirection()).reshape(3, 3)
    origin = np.asarray(frame.GetOrigin()) + direction @ shift
    return Geometry(
        spacing=tuple(float(v) for v in spacing),
        origin=tuple(float(v) for v in origin),
        direction=tuple(float(v) for v in frame.GetDirection()),
    )


@dataclass
class ModelFrame:
    """A scan in a model's domain.

    ``slices (Z', s, s)`` float32: normalised model input (one channel; the model takes it repeated to 3);
    ``geometry``: the physical placement of that grid; ``axis_map``: scan layout → training layout (the
    model's slice ``k`` is the scan's slice ``axis_map.source_slice(k, source_shape)``); ``source`` the scan's
    grid (shape and geometry) to map back to.
    """

    slices: np.ndarray
    geometry: Geometry
    axis_map: AxisMap
    source_shape: tuple[int, int, int]
    source_geometry: Geometry

    def model_range(self, query_range: tuple[int, int]) -> tuple[int, int]:
        """A range ``[z0, z1)`` on the scan's own slice axis (checked by
        :func:`inference.scans.check_query_range`) as the model frame's slices."""
        z0, z1 = query_range
        depth = self.source_shape[0]
        return (depth - z1, depth - z0) if self.axis_map.flip[2] else (z0, z1)

    def source_span(self, a: int, b: int) -> list[int]:
        """Model slices ``[a, b)`` as [first, last] indices along the scan's own corresponding axis."""
        return sorted(self.axis_map.source_slice(k, self.source_shape) for k in (a, b - 1))


def to_model_frame(
    volume: Volume,
    preset: Preset,
    image_size: int | None,
    axis_map: AxisMap,
    source: str | os.PathLike = "<scan>",
) -> ModelFrame:
    """Steps 1-3 of the module docstring on a scan; ``axis_map``: its layout change
    (:meth:`Preset.layout`); ``source`` names it in errors."""
    oriented = axis_map.apply(volume)
    frame = preset.image_steps(oriented.to_sitk())
    array = normalize_volume(sitk.GetArrayViewFromImage(frame), source)
    size = frame.GetSize()[1::-1] if image_size is None else (int(image_size), int(image_size))
    slices = resize_slices(array, image_size, nearest=False) if image_size is not None else array
    return ModelFrame(
        slices=np.ascontiguousarray(slices, dtype=np.float32),
        geometry=_model_geometry(frame, size),
        axis_map=axis_map,
        source_shape=volume.shape,
        source_geometry=volume.geometry,
    )


def support_to_model_frame(
    image: Volume,
    label: SupportLabel,
    preset: Preset,
    image_size: int | None,
    axis_map: AxisMap,
    source: str | os.PathLike = "<support>",
) -> tuple[ModelFrame, dict[int, np.ndarray]]:
    """The support image in the model's frame (:func:`to_model_frame`) and each organ's mask through the
    label side of the steps (per-value resampling, crop/pad with 0), at the crop size: ``{value: (Z', H',
    W') bool}``. Each layer of the label goes through the steps once, its requested organs numbered 1..n
    (so any integer values, CMR's 500, ..., fit the uint8 label steps)."""
    frame = to_model_frame(image, preset, image_size, axis_map, source)
    masks = {}
    for layer in sorted({layer for layer, _ in label.organs.values()}):
        stored = label.layers[layer]
        remapped = np.zeros(stored.shape, dtype=np.uint8)
        here = [(i, v) for i, (v, (lay, _)) in enumerate(label.organs.items(), start=1) if lay == layer]
        for index, value in here:
            remapped[stored == label.organs[value][1]] = index
        steps = preset.label_steps(frame.axis_map.apply(Volume(remapped, label.geometry)).to_sitk())
        array = sitk.GetArrayFromImage(steps)
        masks.update({value: array == index for index, value in here})
    return frame, {value: masks[value] for value in label.organs}


def masks_at_size(masks: np.ndarray, image_size: int | None) -> np.ndarray:
    """Binary ``(N, H', W')`` masks at the model size (nearest, as the test loader resizes them), float32."""
    return np.ascontiguousarray(resize_slices(masks.astype(np.float32), image_size, nearest=True))
