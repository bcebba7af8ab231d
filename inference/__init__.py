"""Inference on a user's own scans (``segment.py``): presets, the segmenter, the outputs.

``segment(checkpoint, support_image, support_label, labels, queries)`` takes SimpleITK images or
:class:`Volume` objects (a ``(Z, H, W)`` array with its geometry) and returns, per query, the label map on
the query's own grid and its per-organ figures. Needs SimpleITK.
"""

from inference.presets import PRESETS, Preset, get_preset
from inference.segmenter import CheckpointInfo, Segmentation, Segmenter, segment
from inference.volumes import AxisMap, Volume, read_scan

__all__ = [
    "PRESETS",
    "AxisMap",
    "CheckpointInfo",
    "Preset",
    "Segmentation",
    "Segmenter",
    "Volume",
    "get_preset",
    "read_scan",
    "segment",
]
