"""Evaluation protocol of method.md §5 (Ouyang et al.) for one fold and one test class.

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
(method.md §1) before slices are selected.

Before evaluating, :func:`check_fold_classes` finds, for every class at once, which of the fold's volumes
hold it (one read of each label file), so that a class missing from the support volume or from every query
volume is refused before any prediction is made, with the volumes that do hold it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from .cases import Case, CaseFiles, check_case, list_cases, read_case, remap_labels
from .datasets import DatasetInfo, get_dataset_info
from .nifti import read_volume
from .transforms import normalize_volume, resize_slices, to_three_channels


def support_slice_indices(count: int, n: int) -> np.ndarray:
    """Positions (among ``count`` labelled slices) of the ``n`` support slices, ``(n,)`` int64.

    method.md §5: fraction ``1/(2n) + i (1 - 1/n) / (n - 1)`` for ``i = 0..n-1``, position
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
    ``linspace(0, count, n_part + 1)`` cast to int (method.md §5). Chunks may be empty when
    ``count < n_part``."""
    if count < 0 or n_part < 1:
        raise ValueError(f"chunk_bounds: need count >= 0 and n_part >= 1, got count={count}, n_part={n_part}")
    edges = np.linspace(0, count, n_part + 1).astype(np.int64)
    return [(int(edges[k]), int(edges[k + 1])) for k in range(n_part)]


def fold_cases(info: DatasetInfo, data_root: str | os.PathLike, eval_fold: int) -> list[CaseFiles]:
    """The cases of fold ``eval_fold`` present under ``data_root``, in fold (sorted-position) order."""
    cases = list_cases(info, data_root)
    return [cases[p] for p in info.fold(eval_fold) if p < len(cases)]


def fold_split(
    info: DatasetInfo,
    data_root: str | os.PathLike,
    eval_fold: int,
    supp_idx: int,
    n_queries: int | None = None,
) -> tuple[CaseFiles, list[CaseFiles]]:
    """The support case (``supp_idx``-th of the fold) and the query cases (the others in fold order; the
    first ``n_queries`` of them when given)."""
    cases = fold_cases(info, data_root, eval_fold)
    if len(cases) < 2:
        raise ValueError(
            f"{info.name} fold {eval_fold}: needs a support and at least one query volume, found "
            f"{len(cases)} of positions {info.fold(eval_fold)} under {data_root}"
        )
    if not -len(cases) <= supp_idx < len(cases):
        raise ValueError(f"supp_idx {supp_idx} out of range for the {len(cases)} volumes of fold {eval_fold}")
    if n_queries is not None and n_queries < 1:
        raise ValueError(f"n_queries must be None or >= 1, got {n_queries!r}")
    support = cases[supp_idx]
    queries = [case for case in cases if case is not support]
    return support, queries[:n_queries]


def fold_class_presence(
    info: DatasetInfo, data_root: str | os.PathLike, eval_fold: int, labels: Sequence[int]
) -> dict[int, list[int]]:
    """For each class value of ``labels``: the case ids of the fold's volumes that hold it (fold order).

    Reads each of the fold's label files once (with the dataset's on-disk remap).
    """
    holders: dict[int, list[int]] = {int(label): [] for label in labels}
    for case in fold_cases(info, data_root, eval_fold):
        stored, _ = read_volume(case.label)
        present = set(np.unique(remap_labels(stored, info, case.label)).tolist())
        for label, ids in holders.items():
            if label in present:
                ids.append(case.case_id)
    return holders


def check_fold_classes(
    dataset: str | DatasetInfo,
    data_root: str | os.PathLike,
    eval_fold: int,
    labels: Sequence[int],
    supp_idx: int = 0,
    n_queries: int | None = None,
    key: str = "test_label",
) -> None:
    """Refuse, before any evaluation, the classes that the support volume or every query volume lacks.

    One ``ValueError`` lists every such class of ``labels`` (config key ``key``) with the fold's volumes
    that do hold it (and their ``supp_idx``), or says that none does. ``n_queries``: only the first query
    volumes are used (the ``validate_cases`` of a validation).
    """
    info = get_dataset_info(dataset)
    support, queries = fold_split(info, data_root, eval_fold, supp_idx, n_queries)
    fold_ids = [case.case_id for case in fold_cases(info, data_root, eval_fold)]
    query_ids = [case.case_id for case in queries]
    problems = []
    for label, holders in fold_class_presence(info, data_root, eval_fold, labels).items():
        if holders:
            where = "the fold's volumes holding it: " + ", ".join(
                f"case {i} (supp_idx={fold_ids.index(i)})" for i in holders
            )
        else:
            where = f"none of the fold's volumes (cases {fold_ids}) holds it"
        name = f"{info.class_name(label)} (label {label})"
        if support.case_id not in holders:
            problems.append(f"{name}: the support volume, case {support.case_id}, has none; {where}")
        elif not set(query_ids) & set(holders):
            problems.append(f"{name}: none of the query volumes used (cases {query_ids}) has it; {where}")
    if problems:
        raise ValueError(
            f"{key}: {info.name} fold {eval_fold} (support supp_idx={supp_idx}) cannot evaluate "
            f"{len(problems)} class(es):\n  " + "\n  ".join(problems)
        )


class TestDataset:
    """Support slices and query volumes of fold ``eval_fold`` for class ``test_label``.

    ``support()`` -> dict ``imgs (n_part, 3, h, w)`` float32, ``masks (n_part, h, w)`` float32 {0,1},
    ``case_id`` int, ``slice_indices (n_part,)`` int64 (slice indices in the support volume),
    ``n_labelled`` int.

    ``ds[i]`` (query volume ``i``; ``len(ds)`` queries; iterating yields them in order) -> dict ``case_id``,
    ``imgs (Zc, 3, h, w)`` float32 of its ``Zc`` labelled slices, ``labels (Zc, H, W)`` int64 {0,1} at native
    resolution, ``slice_indices (Zc,)`` int64, ``chunks`` list of ``n_part`` ``(start, end)``,
    ``chunk_support`` list (support slice of each chunk), ``geometry``
    (:class:`~dataloaders.volume.Geometry`), ``native_shape (Z, H, W)``, ``native_image (Z, H, W)`` (the
    image as stored, for displays). A query volume without the class has ``Zc = 0`` and only empty chunks;
    the caller decides how to score it.

    ``n_queries`` keeps the first query volumes only. ``preload=True`` reads every query volume once, here,
    and keeps its slices compactly (one channel, uint8 labels) for repeated evaluations (validation during
    training); its dicts then carry ``native_image=None``.
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
        n_queries: int | None = None,
        preload: bool = False,
    ) -> None:
        self.info = get_dataset_info(dataset)
        (self.test_label,) = self.info.validate_labels([test_label], "test_label")
        if n_part < 1:
            raise ValueError(f"n_part must be >= 1, got {n_part}")
        # An int only: a float such as 64.7 would otherwise be truncated silently.
        if image_size is not None and (
            isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1
        ):
            raise ValueError(f"image_size must be None or a positive int, got {image_size!r}")
        self.n_part = int(n_part)
        self.image_size = image_size
        self.data_root = data_root
        self.eval_fold = eval_fold
        self.support_case, self.query_cases = fold_split(self.info, data_root, eval_fold, supp_idx, n_queries)
        for case in (self.support_case, *self.query_cases):
            check_case(case)
        self._support = self._load_support()
        self._preloaded = (
            [self._read_query(case, keep_image=False) for case in self.query_cases] if preload else None
        )

    def _labelled(self, case: CaseFiles) -> tuple[Case, np.ndarray, np.ndarray, np.ndarray]:
        """The case as read, its normalised image, binary label and the labelled slice indices."""
        volume = read_case(case, self.info)
        image = normalize_volume(volume.image.array, case.image)
        label = (volume.label.array == self.test_label).astype(np.uint8)
        return volume, image, label, np.flatnonzero(label.any(axis=(1, 2)))

    def _load_support(self) -> dict[str, torch.Tensor | int]:
        _, image, label, labelled = self._labelled(self.support_case)
        if len(labelled) == 0:
            holders = fold_class_presence(self.info, self.data_root, self.eval_fold, [self.test_label])
            raise ValueError(
                f"support volume {self.support_case.label} has no {self.info.class_name(self.test_label)} "
                f"(label {self.test_label}) voxels; the fold's volumes holding it: "
                f"{holders[self.test_label] or 'none'} (case ids)"
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

    def _read_query(self, case: CaseFiles, keep_image: bool) -> dict[str, object]:
        """One query volume's labelled slices at the working size (one channel) and labels (uint8)."""
        volume, image, label, labelled = self._labelled(case)
        return {
            "case_id": case.case_id,
            "slices": resize_slices(image[labelled], self.image_size, nearest=False),
            "labels": label[labelled],
            "slice_indices": labelled.astype(np.int64),
            "geometry": volume.geometry,
            "native_shape": tuple(int(v) for v in image.shape),
            "native_image": volume.image.array if keep_image else None,
        }

    def __getitem__(self, index: int) -> dict[str, object]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"query index {index} out of range for {len(self)} query volumes")
        if self._preloaded is not None:
            query = self._preloaded[index]
        else:
            query = self._read_query(self.query_cases[index], keep_image=True)
        return {
            "case_id": query["case_id"],
            "imgs": torch.from_numpy(to_three_channels(query["slices"])),
            "labels": torch.from_numpy(query["labels"].astype(np.int64)),
            "slice_indices": torch.from_numpy(query["slice_indices"]),
            "chunks": chunk_bounds(len(query["slice_indices"]), self.n_part),
            "chunk_support": list(range(self.n_part)),
            "geometry": query["geometry"],
            "native_shape": query["native_shape"],
            "native_image": query["native_image"],
        }

    def __iter__(self) -> Iterator[dict[str, object]]:
        for index in range(len(self)):
            yield self[index]
