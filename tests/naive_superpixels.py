"""A loop-for-loop port of SSL-ALPNet's pseudo-label notebook (``data/pseudolabel_gen.ipynb``, scale
"MIDDLE"), written from reading it: the reference :mod:`data.superpixels.generate_superpixels` is tested
against.

Everything goes slice by slice and superpixel by superpixel, in the notebook's order, with its float arrays.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.measure import label
from skimage.segmentation import felzenszwalb


def body_mask(slice_2d: np.ndarray, threshold: float) -> np.ndarray:
    above = np.float32(slice_2d > threshold)
    if above.max() < 0.999:  # nothing above the threshold: the notebook returns the (empty) float mask
        return above
    components = label(above)
    largest = components == np.argmax(np.bincount(components.flat)[1:]) + 1
    return ndi.binary_fill_holes(largest)


def renumber(segments: np.ndarray, mask: np.ndarray) -> np.ndarray:
    segments = np.int32(segments)
    values = list(np.unique(segments))
    top = max(values)
    segments[segments == 0] = top + 1
    values.append(top)  # the notebook's list holds the largest id twice
    segments = segments * mask
    out = np.zeros(segments.shape)
    new = 1
    for value in values:
        if value == 0:
            continue
        out[segments == value] = new
        new += 1
    return out


def superpixels(volume: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """``(Z, H, W)`` image as stored -> float64 ``(masks, superpixels)``, as the notebook writes them."""
    raw = np.zeros(volume.shape)
    for z in range(volume.shape[0]):
        raw[z] = felzenszwalb(volume[z], min_size=400, sigma=1)
    masks = np.zeros(volume.shape)
    out = np.zeros(volume.shape)
    for z in range(volume.shape[0]):
        masks[z] = body_mask(volume[z], threshold)
        out[z] = renumber(raw[z], masks[z])
    return masks, out
