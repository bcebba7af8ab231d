"""A scan copied onto another grid, for the geometry round trip of ``tests/test_segment.py`` and
``benchmarks/segment.py``."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk


def copy_on_other_grid(image: sitk.Image, spacing_xy: float, crop_mm: float) -> sitk.Image:
    """``image`` resampled (linear, float32) onto a grid with the x and y axes swapped, rows and slices
    reversed, the in-plane spacing ``spacing_xy`` and ``crop_mm`` cut from each in-plane side: the same
    anatomy in another file. With the image's own spacing and no crop every voxel centre lands on an input
    voxel centre, so the copy is an exact re-indexing."""
    d = np.asarray(image.GetDirection()).reshape(3, 3)
    spacing, size = np.asarray(image.GetSpacing()), np.asarray(image.GetSize())
    extent = (size - 1) * spacing
    new_direction = np.stack([d[:, 1], -d[:, 0], -d[:, 2]], 1)
    new_spacing = np.array([spacing_xy, spacing_xy, spacing[2]])
    new_extent = np.array([extent[1] - 2 * crop_mm, extent[0] - 2 * crop_mm, extent[2]])
    new_size = np.floor(new_extent / new_spacing + 1e-6) + 1
    origin = np.asarray(image.GetOrigin()) + d @ np.array([extent[0] - crop_mm, crop_mm, extent[2]])
    return sitk.Resample(
        image,
        [int(v) for v in new_size],
        sitk.Transform(),
        sitk.sitkLinear,
        origin.tolist(),
        new_spacing.tolist(),
        new_direction.ravel().tolist(),
        0.0,
        sitk.sitkFloat32,
    )
