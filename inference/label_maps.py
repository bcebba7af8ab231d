"""Stage 4 of inference: each organ's probabilities in the model's frame → one label map on the scan's own
grid, with its per-organ figures.

The model's foreground probability of each organ, on a grid whose physical placement is known
(:class:`~inference.frames.ModelFrame`), is resampled linearly (SimpleITK, identity transform) onto the scan's
own voxel grid, 0 (background) outside the model's field of view, then thresholded at 0.5 (the protocol's
argmax, ties to background). With several organs, a voxel whose foreground probability exceeds 0.5 for more
than one takes the organ with the highest probability (the first of the labels on an exact tie).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dataloaders import Geometry, Volume
from inference.frames import ModelFrame
from inference.presets import sitk


@dataclass
class Segmentation:
    """One query's result: ``label_map (Z, H, W)`` on the query's own grid (0 = background, else the
    organ's label value), per-organ figures (:func:`to_label_map`) and timings in seconds."""

    label_map: np.ndarray
    geometry: Geometry
    organs: dict[int, dict[str, Any]]
    timings: dict[str, float] = field(default_factory=dict)


def to_scan_grid(probability: np.ndarray, frame: ModelFrame) -> np.ndarray:
    """Resample ``(Z', s, s)`` probabilities of ``frame`` linearly onto the scan's own grid →
    ``(Z, H, W)`` float32 (0 outside the model's field of view)."""
    if probability.shape != frame.slices.shape:
        raise ValueError(f"expected probabilities of shape {frame.slices.shape}, got {probability.shape}")
    moving = frame.geometry.apply_to(sitk.GetImageFromArray(np.asarray(probability, dtype=np.float32)))
    reference = sitk.Image([int(v) for v in frame.source_shape[::-1]], sitk.sitkUInt8)
    frame.source_geometry.apply_to(reference)
    resampled = sitk.Resample(moving, reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(resampled)


def label_dtype(labels: Sequence[int]) -> np.dtype:
    """Smallest unsigned integer type holding every label value."""
    top = max(labels)
    return np.dtype(np.uint8 if top <= 255 else np.uint16 if top <= 65535 else np.uint32)


def combine_labels(
    probabilities: Iterable[tuple[int, np.ndarray]], shape: tuple[int, ...], labels: Sequence[int]
) -> np.ndarray:
    """One label map from per-organ foreground probabilities: a voxel takes the organ of highest
    probability among those above 0.5 (the argmax with ties to background; the earlier organ on an exact
    tie), else 0. Consumes ``(value, (Z, H, W) probability)`` pairs one at a time (bounded memory)."""
    label_map = np.zeros(shape, dtype=label_dtype(labels))
    best = np.full(shape, 0.5, dtype=np.float32)
    for value, prob in probabilities:
        wins = prob > best
        label_map[wins] = value
        best[wins] = prob[wins]
    return label_map


def to_label_map(
    organ_probs: dict[int, np.ndarray], placements: dict[int, dict[str, Any]], frame: ModelFrame, scan: Volume
) -> Segmentation:
    """The label map of ``scan`` from the organs' probabilities in ``frame`` (module docstring), and per
    organ: ``voxels``, ``volume_ml``, ``slice_range`` ([first, last] slice of the label map holding it, or
    None) and its ``placements`` entry (:func:`inference.prediction.predict_organs`). Consumes
    ``organ_probs``."""
    labels = list(organ_probs)
    label_map = combine_labels(
        ((value, to_scan_grid(organ_probs.pop(value), frame)) for value in labels), scan.shape, labels
    )
    organs = {}
    for value in labels:
        mask = label_map == value
        voxels = int(np.count_nonzero(mask))
        present = np.flatnonzero(mask.any(axis=(1, 2)))
        organs[value] = {
            "voxels": voxels,
            "volume_ml": voxels * scan.voxel_ml,
            "slice_range": None if present.size == 0 else [int(present[0]), int(present[-1])],
            **placements[value],
        }
    return Segmentation(label_map, scan.geometry, organs)
