"""Array transforms shared by the loaders and inference: per-volume normalisation, slice resizing, channels.

Shapes: volumes and stacks of slices are ``(N, H, W)``; the model takes ``(N, 3, H, W)``.
"""

from __future__ import annotations

import os

import cv2
import numpy as np

#: channels one OpenCV call accepts (CV_CN_MAX: 512 in OpenCV 4, 128 in OpenCV 5)
CV_MAX_CHANNELS = 128


def normalize_volume(image: np.ndarray, path: str | os.PathLike = "<array>") -> np.ndarray:
    """method.md §1 normalisation: ``(img - mean) / std`` over the whole volume, as float32."""
    image64 = image.astype(np.float64, copy=False)
    std = float(image64.std())
    if not np.isfinite(std) or std == 0.0:
        raise ValueError(f"{path}: cannot normalise a constant or non-finite volume (std={std})")
    return ((image64 - image64.mean()) / std).astype(np.float32)


def resize_slices(array: np.ndarray, size: int | None, nearest: bool) -> np.ndarray:
    """Resize every slice of ``(N, H, W)`` to ``(N, size, size)``: bilinear for images, nearest for labels.

    ``size=None`` or a size equal to ``H`` and ``W`` returns the input unchanged.
    """
    if array.ndim != 3:
        raise ValueError(f"resize_slices: expected (N, H, W), got shape {array.shape}")
    if size is None or array.shape[1:] == (size, size):
        return array
    if int(size) < 1:
        raise ValueError(f"resize_slices: size must be a positive int, got {size!r}")
    interpolation = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    if array.shape[0] == 0:
        return np.zeros((0, size, size), dtype=array.dtype)
    work = array if nearest or array.dtype == np.float32 else array.astype(np.float32)
    # one cv2 call takes at most CV_MAX_CHANNELS channels: slices go in as channel chunks
    out = np.empty((array.shape[0], size, size), dtype=work.dtype)
    for start in range(0, array.shape[0], CV_MAX_CHANNELS):
        chunk = np.ascontiguousarray(work[start : start + CV_MAX_CHANNELS].transpose(1, 2, 0))
        if nearest and chunk.dtype not in (np.uint8, np.uint16, np.int16, np.float32):
            chunk = chunk.astype(np.float32)
        resized = cv2.resize(chunk, (size, size), interpolation=interpolation)
        out[start : start + CV_MAX_CHANNELS] = resized.reshape(size, size, -1).transpose(2, 0, 1)
    return out


def to_three_channels(slices: np.ndarray) -> np.ndarray:
    """Repeat the single channel: ``(N, H, W) -> (N, 3, H, W)`` (method.md §1)."""
    return np.repeat(slices[:, None], 3, axis=1)
