"""Presets: each dataset's preprocessing (method.md §1b) as a user's scan needs it, made of the functions its
preprocessing command runs (:mod:`data.preprocessing`, :mod:`data.SABS.preprocess`).

A preset holds the dataset's training layout (the direction matrix its arrays were stored with) and its
intensity, spacing and crop/pad steps, which resample **in-plane only** (the scan keeps its slices, which
the 2-D model segments one by one). :mod:`inference.frames` applies them.

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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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
from dataloaders import AxisMap
from dataloaders.volume import require_simpleitk

sitk = require_simpleitk("segment.py (inference)")

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

    def layout(self, direction: tuple[float, ...], reorient: bool = True) -> AxisMap:
        """The signed permutation taking a scan of ``direction`` into the training layout (identity when
        ``reorient`` is False: the array is taken as already in that layout, whatever its direction says)."""
        return AxisMap.closest(direction, self.direction) if reorient else AxisMap()


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
