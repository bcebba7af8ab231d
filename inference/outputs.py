"""What ``segment.py`` writes, each written under a temporary name and renamed, so that an interrupted run
leaves no partial file: the label map (NIfTI, the query's geometry), the overlay PNGs, ``report.json``.

Overlays are drawn in radiological orientation whatever the file's direction matrix: the scan and its label
map are brought (exactly, :class:`~inference.volumes.AxisMap`) into the LPS layout, so that axial slices
show anterior up and the patient's right on the image's left, with square pixels in millimetres.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from dataloaders.io import write_volume
from inference.volumes import LPS_DIRECTION, AxisMap, Volume

#: Overlay colours (BGR) of the 1st, 2nd, ... requested label.
PALETTE = ((0, 0, 255), (0, 200, 0), (255, 128, 0), (0, 220, 220), (255, 0, 255), (255, 255, 0))
#: Axial slices drawn per organ, evenly spread over the slices that hold it.
OVERLAY_SLICES = 3
#: Longer side of an overlay PNG in pixels (the slice is scaled to it, in square millimetres).
OVERLAY_SIDE = 512
#: Opacity of the organ fill.
FILL_ALPHA = 0.35


def temporary_path(path: Path) -> Path:
    """A hidden name beside ``path``, unique to this process, keeping its suffixes (writers pick the format
    from the name)."""
    return path.with_name(f".tmp{os.getpid()}-{path.name}")


def replace_atomically(tmp: Path, path: Path) -> None:
    """Move a finished temporary file or folder onto ``path`` (an existing folder there is removed first:
    a folder cannot be replaced in one step, so its old contents go just before the new ones arrive)."""
    if tmp.is_dir() and path.is_dir():
        shutil.rmtree(path)
    os.replace(tmp, path)


def write_label_map(volume: Volume, path: Path) -> Path:
    """Write a label map as NIfTI with its geometry, under a temporary name first."""
    tmp = temporary_path(path)
    try:
        write_volume(volume.array, volume.geometry, tmp)
        replace_atomically(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(data: dict[str, Any], path: Path) -> Path:
    """Write ``data`` as indented JSON, under a temporary name first."""
    tmp = temporary_path(path)
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        replace_atomically(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _grey(image: np.ndarray) -> np.ndarray:
    """``(H, W)`` slice → uint8, window from the 1st to the 99th percentile."""
    low, high = np.percentile(image, [1, 99])
    return (np.clip((image.astype(np.float32) - low) / max(float(high - low), 1e-6), 0, 1) * 255).astype(
        np.uint8
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
    canvas = cv2.cvtColor(cv2.resize(_grey(image), size, interpolation=cv2.INTER_LINEAR), cv2.COLOR_GRAY2BGR)
    for index, value in enumerate(labels):
        colour = np.array(PALETTE[index % len(PALETTE)], dtype=np.float32)
        mask = cv2.resize((label_map == value).astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
        fill = mask.astype(bool)
        canvas[fill] = ((1 - FILL_ALPHA) * canvas[fill] + FILL_ALPHA * colour).astype(np.uint8)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(canvas, contours, -1, tuple(int(c) for c in colour), 1)
    return canvas


def write_overlays(scan: Volume, label_map: Volume, labels: Sequence[int], folder: Path) -> list[str]:
    """Write :data:`OVERLAY_SLICES` axial PNGs per organ present into ``folder`` (built under a temporary
    name, then renamed). Names: ``label<value>_slice<k>.png``, ``k`` the slice index along the file's axis
    that is axial in display (the file's own slice index for an axial scan). Returns the file names."""
    to_display = AxisMap.closest(scan.geometry.direction, LPS_DIRECTION)
    image, labelled = to_display.apply(scan), to_display.apply(label_map)
    spacing_xy = labelled.geometry.spacing[:2]
    tmp = temporary_path(folder)
    names = []
    try:
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
                picture = draw_overlay(image.array[z], labelled.array[z], labels, spacing_xy)
                if not cv2.imwrite(str(tmp / name), picture):
                    raise OSError(f"could not write {tmp / name}")
                names.append(name)
        replace_atomically(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return names
