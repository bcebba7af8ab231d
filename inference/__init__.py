"""Inference on a user's own scans (``segment.py``), a straight pipeline of four stages per query:
:mod:`~inference.scans` (read and check) → :mod:`~inference.frames` (into the model's frame) →
:mod:`~inference.prediction` (probabilities) → :mod:`~inference.label_maps` (back onto the scan's grid),
run by :class:`~inference.segmenter.Segmenter`; :mod:`~inference.outputs` writes the files.

``segment(checkpoint, support_image, support_label, labels, queries)`` takes SimpleITK images or
:class:`Volume` objects (a ``(Z, H, W)`` array with its geometry) and returns, per query, the label map on the
query's own grid and its per-organ figures; the support label may be a :class:`SupportLabel` (a 3D Slicer
segmentation's segments, :func:`read_support_label`). Needs SimpleITK.
"""

from dataloaders import AxisMap, Volume
from inference.label_maps import Segmentation
from inference.presets import PRESETS, Preset, get_preset
from inference.scans import read_scan, read_support_label
from inference.segmentations import SupportLabel
from inference.segmenter import CheckpointInfo, Segmenter, segment

__all__ = [
    "PRESETS",
    "AxisMap",
    "CheckpointInfo",
    "Preset",
    "Segmentation",
    "Segmenter",
    "SupportLabel",
    "Volume",
    "get_preset",
    "read_scan",
    "read_support_label",
    "segment",
]
