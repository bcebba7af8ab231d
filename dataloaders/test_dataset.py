"""Evaluation protocol of spec section 5 (Ouyang et al.) for one fold and one test class.

The fold's volumes (in sorted-position order) are split into the support volume, the ``supp_idx``-th, and
the query volumes, the others in order. Only slices that contain the test class are used:

* support: ``n_part`` slices of the support volume's labelled slices, at positions
  :func:`support_slice_indices` ``(count, n_part)`` among them;
* query: its labelled slices split into ``n_part`` contiguous chunks, :func:`chunk_bounds`; chunk ``k`` is
  predicted with support slice ``k``.

Usage in a test script::

    ds = TestDataset('CHAOST2', root, eval_fold=0, test_label=1, image_size=None)
    supp = ds.support()        # imgs (n_part, 3, h, w), masks (n_part, h, w)
    for query in ds:           # one dict per query volume
        for k, (start, end) in enumerate(query['chunks']):
            # predict query['imgs'][start:end] with supp['imgs'][k:k+1], supp['masks'][k:k+1]
        # compare with query['labels'] (Zc, H, W) at native resolution

With ``image_size`` set, model inputs (support images and masks, query images) are resized to
``image_size x image_size`` (bilinear images, nearest masks), while query ``labels`` stay at the native
``H x W``: the caller upsamples its predictions (e.g. probabilities bilinearly, before the argmax) back to
``native_shape[1:]`` before scoring or saving. Volumes are normalised over the whole native volume
(spec section 1) before slices are selected.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import torch

from .datasets import DatasetInfo, get_dataset_info
from .io import (
    CaseFiles,
    CaseVolume,
    check_case,
    list_cases,
    normalize_volume,
    read_case,
    resize_slices,
    to_three_channels,
)


def support_slice_indices(count: int, n: int) -> np.ndarray:
    """Positions (among ``count`` labelled slices) of the ``n`` support slices, ``(n,)`` int64.

    Spec section 5: fraction ``1/(2n) + i (1 - 1/n) / (n - 1)`` for ``i = 0..n-1``, position
    ``int(fraction * count)``; for ``n = 1`` the rule's limit, fraction ``1/2`` (as the official code).
    With ``count < n`` positions repeat.
    """
    if count < 1 or n < 1:
        raise ValueError(f"support_slice_indices: need count >= 1 and n >= 1, got count={count}, n={n}")
    if n == 1:
        fractions = np.array([0.5])
    else:
        fractions = 1 / (n * 2) + (1.0 - 1.0 / n) / (n - 1) * np.arange(n)
    return (fractions * count).astype(np.int64)


def chunk_bounds(count: int, n_part: int) -> list[tuple[int, int]]:
    """``n_part`` contiguous chunks ``[start, end)`` of ``count`` query slices, at
    ``linspace(0, count, n_part + 1)`` cast to int (spec section 5). Chunks may be empty when
    ``count < n_part``."""
    if count < 0 or n_part < 1:
        raise ValueError(f"chunk_bounds: need count >= 0 and n_part >= 1, got count={count}, n_part={n_part}")
    edges = np.linspace(0, count, n_part + 1).astype(np.int64)
    return [(int(edges[k]), int(edges[k + 1])) for k in range(n_part)]


class TestDataset:
    """Support slices and query volumes of fold ``eval_fold`` for class ``test_label``.

    ``support()`` -> dict ``imgs (n_part, 3, h, w)`` float32, ``masks (n_part, h, w)`` float32 {0,1},
    ``case_id`` int, ``slice_indices (n_part,)`` int64 (slice indices in the support volume),
    ``n_labelled`` int.

    ``ds[i]`` (query volume ``i``; ``len(ds)`` queries; iterating yields them in order) -> dict ``case_id``,
    ``imgs (Zc, 3, h, w)`` float32 of its ``Zc`` labelled slices, ``labels (Zc, H, W)`` int64 {0,1} at native
    resolution, ``slice_indices (Zc,)`` int64, ``chunks`` list of ``n_part`` ``(start, end)``,
    ``chunk_support`` list (support slice of each chunk), ``geometry`` (:class:`~dataloaders.io.Geometry`),
    ``native_shape (Z, H, W)``, ``native_image (Z, H, W)`` (the image as stored, for displays). A query
    volume without the class has ``Zc = 0`` and only empty chunks; the caller decides how to score it.
    """

    __test__ = False  # not a pytest test class despite its name

    def __init__(
        self,
        dataset: str | DatasetInfo,
        data_root: str | os.PathLike,
        eval_fold: int,
        test_label: int,
        supp_idx: int = 0,
        n_part: int = 3,
        image_size: int | None = None,
    ) -> None:
        self.info = get_dataset_info(dataset)
        (self.test_label,) = self.info.validate_labels([test_label], "test_label")
        if n_part < 1:
            raise ValueError(f"n_part must be >= 1, got {n_part}")
        if image_size is not None and int(image_size) < 1:
            raise ValueError(f"image_size must be None or a positive int, got {image_size!r}")
        self.n_part = int(n_part)
        self.image_size = None if image_size is None else int(image_size)
        cases = list_cases(self.info, data_root)
        fold_cases = [cases[p] for p in self.info.fold(eval_fold) if p < len(cases)]
        if len(fold_cases) < 2:
            raise ValueError(
                f"{self.info.name} fold {eval_fold}: needs a support and at least one query volume, found "
                f"{len(fold_cases)} of positions {self.info.fold(eval_fold)} among {len(cases)} cases"
            )
        if not -len(fold_cases) <= supp_idx < len(fold_cases):
            raise ValueError(
                f"supp_idx {supp_idx} out of range for the {len(fold_cases)} volumes of fold {eval_fold}"
            )
        for case in fold_cases:
            check_case(case)
        self.support_case: CaseFiles = fold_cases[supp_idx]
        self.query_cases: list[CaseFiles] = [c for c in fold_cases if c is not self.support_case]
        self._support = self._load_support()

    def _labelled(self, case: CaseFiles) -> tuple[CaseVolume, np.ndarray, np.ndarray, np.ndarray]:
        """The case as read, its normalised image, binary label and the labelled slice indices."""
        volume = read_case(case, self.info)
        image = normalize_volume(volume.image, case.image)
        label = (volume.label == self.test_label).astype(np.int64)
        return volume, image, label, np.flatnonzero(label.any(axis=(1, 2)))

    def _load_support(self) -> dict[str, torch.Tensor | int]:
        _, image, label, labelled = self._labelled(self.support_case)
        if len(labelled) == 0:
            raise ValueError(
                f"support volume {self.support_case.label} has no {self.info.class_name(self.test_label)} "
                f"(label {self.test_label}) voxels; choose another supp_idx"
            )
        slices = labelled[support_slice_indices(len(labelled), self.n_part)]
        imgs = resize_slices(image[slices], self.image_size, nearest=False)
        masks = resize_slices(label[slices].astype(np.float32), self.image_size, nearest=True)
        return {
            "imgs": torch.from_numpy(to_three_channels(imgs)),
            "masks": torch.from_numpy(np.ascontiguousarray(masks)),
            "case_id": self.support_case.case_id,
            "slice_indices": torch.from_numpy(slices.astype(np.int64)),
            "n_labelled": int(len(labelled)),
        }

    def support(self) -> dict[str, torch.Tensor | int]:
        """The ``n_part`` support slices and masks (see the class docstring); a fresh dict each call."""
        return dict(self._support)

    def __len__(self) -> int:
        return len(self.query_cases)

    def __getitem__(self, index: int) -> dict[str, object]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"query index {index} out of range for {len(self)} query volumes")
        case = self.query_cases[index]
        volume, image, label, labelled = self._labelled(case)
        imgs = resize_slices(image[labelled], self.image_size, nearest=False)
        return {
            "case_id": case.case_id,
            "imgs": torch.from_numpy(to_three_channels(imgs)),
            "labels": torch.from_numpy(label[labelled]),
            "slice_indices": torch.from_numpy(labelled.astype(np.int64)),
            "chunks": chunk_bounds(len(labelled), self.n_part),
            "chunk_support": list(range(self.n_part)),
            "geometry": volume.geometry,
            "native_shape": tuple(int(v) for v in image.shape),
            "native_image": volume.image,
        }

    def __iter__(self) -> Iterator[dict[str, object]]:
        for index in range(len(self)):
            yield self[index]
