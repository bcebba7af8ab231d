"""Data loading: dataset facts, volume I/O, episode augmentation, training episodes and the test protocol."""

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
from .datasets import DATASETS, DatasetInfo, get_dataset_info
from .io import (
    CaseFiles,
    CaseVolume,
    Geometry,
    list_cases,
    normalize_volume,
    read_case,
    read_volume,
    remap_labels,
    resize_slices,
    write_volume,
)
from .test_dataset import TestDataset, chunk_bounds, support_slice_indices
from .train_dataset import TrainDataset, worker_init_fn

__all__ = [
    "DATASETS",
    "CaseFiles",
    "CaseVolume",
    "DatasetInfo",
    "GammaParams",
    "Geometry",
    "GeometryParams",
    "TestDataset",
    "TrainDataset",
    "apply_gamma",
    "apply_geometry",
    "chunk_bounds",
    "get_dataset_info",
    "identity_gamma",
    "identity_geometry",
    "list_cases",
    "normalize_volume",
    "read_case",
    "read_volume",
    "remap_labels",
    "resize_slices",
    "sample_gamma",
    "sample_geometry",
    "support_slice_indices",
    "worker_init_fn",
    "write_volume",
]
