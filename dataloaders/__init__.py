"""Data on disk to model inputs: the dataset table, the volume type, NIfTI I/O, case pairing, transforms,
episode augmentation, training episodes and the test protocol (method.md §1, §3, §5)."""

from .augment import (
    GammaParams,
    GeometryParams,
    apply_gamma,
    apply_geometry,
    identity_gamma,
    identity_geometry,
    sample_gamma,
    sample_geometry,
)
from .cases import Case, CaseFiles, check_case, list_cases, read_case, remap_labels
from .datasets import DATASETS, DatasetInfo, get_dataset_info
from .nifti import read_header, read_volume, write_volume
from .test_dataset import TestDataset, chunk_bounds, support_slice_indices
from .train_dataset import TrainDataset, worker_init_fn
from .transforms import normalize_volume, resize_slices, to_three_channels
from .volume import AxisMap, Geometry, Volume, check_finite

__all__ = [
    "DATASETS",
    "AxisMap",
    "Case",
    "CaseFiles",
    "DatasetInfo",
    "GammaParams",
    "Geometry",
    "GeometryParams",
    "TestDataset",
    "TrainDataset",
    "Volume",
    "apply_gamma",
    "apply_geometry",
    "check_case",
    "check_finite",
    "chunk_bounds",
    "get_dataset_info",
    "identity_gamma",
    "identity_geometry",
    "list_cases",
    "normalize_volume",
    "read_case",
    "read_header",
    "read_volume",
    "remap_labels",
    "resize_slices",
    "sample_gamma",
    "sample_geometry",
    "support_slice_indices",
    "to_three_channels",
    "worker_init_fn",
    "write_volume",
]
