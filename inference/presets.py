"""Presets: a user's scan into a trained model's domain (spec section 1b) and its probabilities back.

A preset is the preprocessing of one dataset, made of the functions its preprocessing command runs
(:mod:`data.preprocessing`, :mod:`data.SABS.preprocess`), applied to one scan:

1. **orientation**: the array is transposed/flipped (:class:`~inference.volumes.AxisMap`, exact, no
   interpolation) into the training layout, the signed axis permutation whose axes point closest to the
   training data's direction matrix;
2. **intensity, spacing, crop/pad**: the dataset's steps, resampling **in-plane only** (the scan keeps its
   slices, which the 2-D model segments one by one);
3. **normalisation and slice size**: the loaders' per-volume ``(v - mean) / std``
   (:func:`dataloaders.io.normalize_volume`) over the result, then every slice resized (bilinear) to the
   checkpoint's ``image_size`` (None: kept).

Training layouts, read off the real copies (``../shared/data``; the arrays of all three have the patient's
left at high column indices, anterior at high row indices and superior at high slice indices):

* ``chaos_mr`` (CHAOST2): direction ``diag(1, -1, 1)`` ('LAS'; rows stored bottom-up, as ``dcm2nii`` wrote
  them) in all 20 volumes. Clip above the 99.5th percentile, 1.25 x 1.25 mm, centre crop/pad to 256 x 256
  with the minimum.
* ``cmr_mr`` (CMR): oblique short-axis stacks whose axes lie within 25 degrees of :data:`CMR_DIRECTION`, the
  mean direction of the 35 volumes (orthonormalised). Clip, 1.25 x 1.25 mm, crop/pad to 256 x 256.
* ``sabs_ct`` (SABS): 'LAS' as well, read off the anatomy (liver at low columns, kidneys at low rows):
  the published copies carry an identity direction that does not describe their arrays (give such files
  with ``reorient=False``). HU window [-125, 275] onto [0, 255]; the command's border cut and in-plane
  spacing factor, which assume Synapse's 512 x 512 slices (32 voxels of 512, spacing x 1.75): other sizes get
  the same field of view (a cut of 1/16 of each side and the spacing that brings the larger side to 256
  voxels); then a centre crop/pad with 0 to the training slice size 257 x 257 (a no-op for 512 x 512).

The way back (:meth:`ModelFrame.to_source`): the model's foreground probabilities, a ``(Z', s, s)`` grid
with a known physical geometry, are resampled linearly (SimpleITK, identity transform) onto the scan's own
voxel grid; 0 (background) outside the model's field of view.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from data.CHAOST2.preprocess import SPACING as CHAOS_SPACING
from data.CMR.preprocess import SPACING as CMR_SPACING
from data.preprocessing import (
    centre_crop_or_pad,
    inplane_grid,
    mr_image_steps,
    mr_label_steps,
    resampled_size,
)
from data.SABS.preprocess import BORDER, SPACING_FACTOR, cut_and_resample, normalise_intensity
from dataloaders.io import Geometry, normalize_volume, resize_slices
from inference.volumes import AxisMap, Volume, sitk

#: 'LAS': columns toward the patient's left, rows toward anterior, slices toward superior.
LAS_DIRECTION = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
#: Mean direction of the 35 CMR volumes (row-major; columns = array axes x, y, z), orthonormalised and
#: rounded; every volume's axes lie within 25 degrees of it (tests/test_segment.py recomputes it).
CMR_DIRECTION = (0.663, 0.384, -0.642, 0.727, -0.127, 0.675, -0.177, 0.914, 0.364)
#: In-plane size of the raw Synapse slices the SABS command's constants were made for.
SABS_RAW_SIZE = 512
#: SABS slice size after the command's steps on a 512 x 512 slice (the published 257 x 257).
SABS_SLICE_SIZE = tuple(
    resampled_size([SABS_RAW_SIZE - 2 * BORDER] * 2, [1.0, 1.0], [SPACING_FACTOR, SPACING_FACTOR])
)


def _mr_steps(spacing_xy: tuple[float, float]) -> tuple[Callable, Callable]:
    def image_steps(image: sitk.Image) -> sitk.Image:
        return mr_image_steps(image, *inplane_grid(image, spacing_xy))

    def label_steps(label: sitk.Image) -> sitk.Image:
        return mr_label_steps(label, *inplane_grid(label, spacing_xy))

    return image_steps, label_steps


def sabs_inplane(image: sitk.Image) -> tuple[tuple[int, int], tuple[float, float]]:
    """Border (x, y) and in-plane spacing of the SABS steps for this scan: the command's 32 voxels and
    spacing x 1.75 on a 512 x 512 slice, the same field of view for other sizes (module docstring).

    The spacing is ``1.75 * field / 512`` with ``field`` the larger in-plane extent in mm, which for
    512 voxels is the command's ``spacing * 1.75`` to the last bit (scaling by 512 is exact).
    """
    size = image.GetSize()[:2]
    border = tuple(int(round(BORDER * n / SABS_RAW_SIZE)) for n in size)
    field = max(float(n) * float(s) for n, s in zip(size, image.GetSpacing()[:2], strict=True))
    target = SPACING_FACTOR * field / SABS_RAW_SIZE
    return border, (target, target)


def _sabs_steps(image: sitk.Image, label: bool) -> sitk.Image:
    border, spacing_xy = sabs_inplane(image)
    width, height, depth = image.GetSize()
    spacing = (spacing_xy[0], spacing_xy[1], image.GetSpacing()[2])
    cut = (width - 2 * border[0], height - 2 * border[1])
    size = [*resampled_size(cut, image.GetSpacing()[:2], spacing_xy), depth]  # slices kept
    source = image if label else normalise_intensity(image)
    resampled = cut_and_resample(source, border, spacing, size, label=label)
    return centre_crop_or_pad(resampled, 0, SABS_SLICE_SIZE)


@dataclass(frozen=True)
class Preset:
    """One dataset's preprocessing for inference (module docstring).

    ``direction``: the training layout (row-major 3x3; columns = world directions of the array axes);
    ``image_steps`` / ``label_steps``: intensity, in-plane spacing and crop/pad of a scan already in that
    layout (SimpleITK images, geometry carried).
    """

    name: str
    dataset: str
    description: str
    direction: tuple[float, ...]
    image_steps: Callable[[sitk.Image], sitk.Image]
    label_steps: Callable[[sitk.Image], sitk.Image]


def _preset(name: str, dataset: str, description: str, direction, steps) -> Preset:
    return Preset(name, dataset, description, tuple(direction), *steps)


PRESETS = {
    preset.name: preset
    for preset in (
        _preset(
            "chaos_mr",
            "CHAOST2",
            "abdominal MR (CHAOS T2-SPIR): clip 99.5th percentile, 1.25 mm in-plane, 256 x 256",
            LAS_DIRECTION,
            _mr_steps(CHAOS_SPACING[:2]),
        ),
        _preset(
            "cmr_mr",
            "CMR",
            "cardiac MR (MS-CMRSeg bSSFP): clip 99.5th percentile, 1.25 mm in-plane, 256 x 256",
            CMR_DIRECTION,
            _mr_steps(CMR_SPACING[:2]),
        ),
        _preset(
            "sabs_ct",
            "SABS",
            "abdominal CT in HU (Synapse): window [-125, 275], border cut, spacing x 1.75, 257 x 257",
            LAS_DIRECTION,
            (lambda image: _sabs_steps(image, False), lambda label: _sabs_steps(label, True)),
        ),
    )
}
#: The preset of each dataset a snapshot records (config key ``dataset``).
DATASET_PRESETS = {preset.dataset: name for name, preset in PRESETS.items()}


def get_preset(name: str | Preset) -> Preset:
    """A preset by name; unknown names are a ``ValueError`` listing the known ones."""
    if isinstance(name, Preset):
        return name
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
    return PRESETS[name]


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

    def to_source(self, probability: np.ndarray) -> np.ndarray:
        """Resample ``(Z', s, s)`` probabilities linearly onto the scan's own grid → ``(Z, H, W)`` float32
        (0 outside the model's field of view)."""
        if probability.shape != self.slices.shape:
            raise ValueError(f"expected probabilities of shape {self.slices.shape}, got {probability.shape}")
        moving = self.geometry.apply_to(sitk.GetImageFromArray(np.asarray(probability, dtype=np.float32)))
        reference = sitk.Image([int(v) for v in self.source_shape[::-1]], sitk.sitkUInt8)
        self.source_geometry.apply_to(reference)
        resampled = sitk.Resample(moving, reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        return sitk.GetArrayFromImage(resampled)


def layout_map(volume: Volume, preset: Preset, reorient: bool = True) -> AxisMap:
    """The signed permutation taking ``volume`` into ``preset``'s training layout (identity when
    ``reorient`` is False: the array is taken as already in that layout, whatever its direction says)."""
    return AxisMap.closest(volume.geometry.direction, preset.direction) if reorient else AxisMap()


def to_model_frame(
    volume: Volume,
    preset: Preset,
    image_size: int | None,
    axis_map: AxisMap,
    source: str | os.PathLike = "<scan>",
) -> ModelFrame:
    """Steps 1-3 of the module docstring on a scan; ``source`` names it in errors."""
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


def label_to_model_frame(label: Volume, preset: Preset, axis_map: AxisMap) -> np.ndarray:
    """A label map through the label side of the steps (per-value resampling, crop/pad with 0), at the
    crop size: ``(Z', H', W')`` uint8. Masks go to the model size with :func:`masks_at_size`."""
    frame = preset.label_steps(axis_map.apply(label).to_sitk())
    return sitk.GetArrayFromImage(frame)


def masks_at_size(masks: np.ndarray, image_size: int | None) -> np.ndarray:
    """Binary ``(N, H', W')`` masks at the model size (nearest, as the test loader resizes them), float32."""
    return np.ascontiguousarray(resize_slices(masks.astype(np.float32), image_size, nearest=True))
