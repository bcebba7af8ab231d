"""The one overlay renderer: a slice in grey with coloured outlines (and optionally fills) of masks.

``test.py`` draws the ground truth (green) and the prediction (red) on the middle labelled slice of a query
(:func:`engine.evaluation.save_overlay`); ``segment.py`` draws every organ found in radiological orientation
(:mod:`inference.outputs`). Both call :func:`render_overlay` and write through :func:`write_png`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from utils import write_atomically

#: BGR, as OpenCV writes them.
Colour = tuple[int, int, int]


def grey_window(image: np.ndarray) -> np.ndarray:
    """``(H, W)`` slice → uint8 grey, windowed from its 1st to its 99th percentile."""
    low, high = np.percentile(image, [1, 99])
    grey = np.clip((image.astype(np.float32) - low) / max(float(high - low), 1e-6), 0, 1)
    return (grey * 255).astype(np.uint8)


def render_overlay(
    image: np.ndarray,
    masks: Sequence[tuple[np.ndarray, Colour]],
    size: tuple[int, int],
    smooth: bool = False,
    fill_alpha: float = 0.0,
) -> np.ndarray:
    """The BGR picture of one slice with the outline of each mask in its colour.

    Shapes: ``image`` and every mask ``(H, W)``; ``size`` is the picture's ``(width, height)``. The grey
    image is scaled with linear interpolation when ``smooth`` (else nearest), the masks with nearest;
    ``fill_alpha > 0`` also fills each mask with its colour at that opacity before outlining it.
    """
    if image.ndim != 2 or any(mask.shape != image.shape for mask, _ in masks):
        shapes = [image.shape, *(mask.shape for mask, _ in masks)]
        raise ValueError(f"render_overlay: expected (H, W) arrays of one shape, got {shapes}")
    interpolation = cv2.INTER_LINEAR if smooth else cv2.INTER_NEAREST
    canvas = cv2.cvtColor(
        cv2.resize(grey_window(image), size, interpolation=interpolation), cv2.COLOR_GRAY2BGR
    )
    for mask, colour in masks:
        big = cv2.resize(np.asarray(mask, dtype=np.uint8), size, interpolation=cv2.INTER_NEAREST)
        if fill_alpha > 0:
            fill = big.astype(bool)
            tint = np.array(colour, dtype=np.float32)
            canvas[fill] = ((1 - fill_alpha) * canvas[fill] + fill_alpha * tint).astype(np.uint8)
        contours, _ = cv2.findContours(big, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(canvas, contours, -1, colour, 1)
    return canvas


def write_png(picture: np.ndarray, path: str | os.PathLike) -> Path:
    """Write a picture as PNG through :func:`utils.write_atomically`."""
    ok, encoded = cv2.imencode(".png", picture)
    if not ok:
        raise OSError(f"could not write {path}: PNG encoding failed")
    return write_atomically(path, lambda tmp: tmp.write_bytes(encoded.tobytes()), what="picture")
