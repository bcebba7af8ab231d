"""What ``segment.py`` writes, each through :func:`utils.write_atomically`, so that an interrupted run leaves
no partial file: the label map (NIfTI, the query's geometry), the overlay PNGs, ``report.json``.

Overlays are drawn (:func:`engine.overlays.render_overlay`) in radiological orientation whatever the file's
direction matrix: the scan and its label map are brought (exactly, :class:`~dataloaders.volume.AxisMap`)
into the LPS layout, so that axial slices show anterior up and the patient's right on the image's left,
with square pixels in millimetres.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dataloaders import AxisMap, Volume, write_volume
from dataloaders.volume import LPS_DIRECTION
from engine.overlays import render_overlay, write_png
from utils import write_atomically

#: Overlay colours (BGR) of the 1st, 2nd, ... requested label.
PALETTE = ((0, 0, 255), (0, 200, 0), (255, 128, 0), (0, 220, 220), (255, 0, 255), (255, 255, 0))
#: Axial slices drawn per organ, evenly spread over the slices that hold it.
OVERLAY_SLICES = 3
#: Longer side of an overlay PNG in pixels (the slice is scaled to it, in square millimetres).
OVERLAY_SIDE = 512
#: Opacity of the organ fill.
FILL_ALPHA = 0.35


def palette_rgb(index: int) -> tuple[float, float, float]:
    """The overlay colour of the ``index``-th requested label as RGB in [0, 1] (for segmentation files)."""
    blue, green, red = PALETTE[index % len(PALETTE)]
    return (red / 255, green / 255, blue / 255)


def write_label_map(volume: Volume, path: Path) -> Path:
    """Write a label map as NIfTI with its geometry (:func:`dataloaders.nifti.write_volume`)."""
    return write_volume(volume.array, volume.geometry, path)


def write_json(data: dict[str, Any], path: Path) -> Path:
    """Write ``data`` as indented JSON."""
    return write_atomically(
        path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"), what="report"
    )


def draw_overlay(
    image: np.ndarray, label_map: np.ndarray, labels: Sequence[int], spacing_xy: tuple[float, float]
) -> np.ndarray:
    """One axial slice in grey with every organ filled (translucent) and outlined in its colour.

    Shapes: ``image``, ``label_map`` ``(H, W)`` in display layout; ``spacing_xy`` (column, row) in mm.
    Returns the BGR picture, scaled so that pixels are square and the longer side is
    :data:`OVERLAY_SIDE`.
    """
    height_mm, width_mm = image.shape[0] * spacing_xy[1], image.shape[1] * spacing_xy[0]
    scale = OVERLAY_SIDE / max(height_mm, width_mm)
    size = (max(1, round(width_mm * scale)), max(1, round(height_mm * scale)))
    masks = [(label_map == value, PALETTE[index % len(PALETTE)]) for index, value in enumerate(labels)]
    return render_overlay(image, masks, size, smooth=True, fill_alpha=FILL_ALPHA)


def write_overlays(scan: Volume, label_map: Volume, labels: Sequence[int], folder: Path) -> list[str]:
    """Write :data:`OVERLAY_SLICES` axial PNGs per organ present into ``folder`` (made as a whole through
    :func:`utils.write_atomically`). Names: ``label<value>_slice<k>.png``, ``k`` the slice index along the
    file's axis that is axial in display (the file's own slice index for an axial scan). Returns the file
    names."""
    to_display = AxisMap.closest(scan.geometry.direction, LPS_DIRECTION)
    image, labelled = to_display.apply(scan), to_display.apply(label_map)
    spacing_xy = labelled.geometry.spacing[:2]
    names: list[str] = []

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        for value in labels:
            present = np.flatnonzero((labelled.array == value).any(axis=(1, 2)))
            if present.size == 0:
                continue
            picks = sorted(
                set(np.linspace(present[0], present[-1], OVERLAY_SLICES + 2)[1:-1].round().astype(int))
            )
            for z in picks:
                source_index = to_display.source_slice(int(z), scan.shape)
                name = f"label{value}_slice{source_index}.png"
                write_png(draw_overlay(image.array[z], labelled.array[z], labels, spacing_xy), tmp / name)
                names.append(name)

    write_atomically(folder, write, what="overlays")
    return names
