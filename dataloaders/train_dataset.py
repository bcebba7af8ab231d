"""Self-supervised episodic sampler of method.md §3 (1-way, S-shot, Q-query episodes).

Randomness: episode ``i`` is drawn from ``np.random.default_rng([seed, i])`` and from nothing else, so
``dataset[i]`` depends only on ``(seed, i)``: the same seed gives the same episodes whatever the number of
DataLoader workers, their order or the process they run in; seeding needs no ``worker_init_fn`` (workers
draw different episodes because they receive different indices). Pass :func:`worker_init_fn` anyway: it
limits OpenCV to one thread per worker, which is faster. ``len(dataset)`` is the number of episodes (the
official schedule: ``n_steps = 40000`` episodes at batch 1); iterating a second time repeats them.

Episode ``i`` (method.md §3):

1. pick a usable training volume uniformly, then, up to ``max_tries`` times, a class uniformly among the
   classes present in it (supervoxel ids > 0, or ground-truth labels other than the test labels with
   ``use_gt=True``);
2. Setting 2: slices holding any (``exclusion='any'``, default) or all (``'all'``, the official code) of
   ``exclude_label`` (per the ground truth) are not candidates;
3. the candidate slices holding the class are split into runs of consecutive slice indices (an excluded
   slice breaks a run); runs shorter than ``S + Q`` are dropped; a run is picked uniformly, then a start in
   it, giving ``S + Q`` consecutive slices: the first ``S`` are supports, the rest queries;
4. the draw is rejected while the class covers fewer than ``min_size`` pixels on both of the first two
   slices;
5. with probability 0.5 the slice order is reversed;
6. with ``augment``: gamma, then geometry, each applied to the queries with probability 0.5, else to the
   supports (parameters from :mod:`dataloaders.augment`);
7. masks are the binary mask of the drawn class.

A volume in which no class can give an episode (step 3 and 4 can never succeed) is left out of step 1; if
no volume is usable the constructor says so. Volumes are read, normalised (method.md §1) and, with
``image_size``, resized once at construction (bilinear images, nearest supervoxels/labels), so a bad data
root fails before training; ``min_size`` counts pixels at the working size.

``sampling='ssl_alpnet'`` draws SSL-ALPNet's episodes instead (its ``GenericSuperDatasetv2``; the law of
the slice and id in :mod:`dataloaders.ssl_alpnet_sampling`), 1 support and 1 query only:

1. one slice of the training volumes, with the official law (uniform, a slice without pseudo-label id
   passing to the next; Setting 2 redraws a slice holding an excluded class per the ground truth, with
   ``exclusion`` as above; the official is ``'any'``);
2. an id uniform in ``1 .. max_id - 1`` of that slice (the largest never, an id absent from it giving an
   empty mask, as the official);
3. support and query are that slice and mask, each augmented independently (with ``augment``). The
   augmentation is NOT the official's (its affine, elastic and gamma transforms of ``augutils.py`` with its
   own ranges): it is ours (:mod:`dataloaders.augment`: gamma, then geometry, both always applied, each with
   its own draw for the support and for the query).

With ``image_size``, ``max_id`` is the stored slice's and the mask is taken at the working size (a small
superpixel may vanish there). ``min_size``, ``max_tries`` and the slice reversal do not apply to it (the
official has no such step); the normalisation is ours (method.md §1) and slices are not cropped to 256 px
(the official crops them).
``pseudo_labels`` picks the pseudo-label files (``'supervoxels_3d'``, the ADNet lineage's, or
``'superpixels_2d'``, SSL-ALPNet's, :mod:`dataloaders.cases`) for either sampling.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from .augment import apply_gamma, apply_geometry, sample_gamma, sample_geometry
from .cases import Case, check_pseudo_labels, list_cases, read_case
from .datasets import DatasetInfo, get_dataset_info
from .ssl_alpnet_sampling import SliceVolume, slice_law
from .transforms import normalize_volume, resize_slices, to_three_channels

EXCLUSION_MODES = ("any", "all")
#: Episode samplers: the ADNet lineage's (method.md §3) and SSL-ALPNet's.
SAMPLINGS = ("adnet", "ssl_alpnet")
#: The official ``min_size`` (method.md §3, step 4), in pixels of a 256 x 256 slice.
MIN_SIZE_AT_256 = 200


def scaled_min_size(image_size: int | None) -> int:
    """``min_size`` for slices resized to ``image_size`` (None: native): the official 200 pixels at 256 px,
    scaled with the slice area, at least 1 (64 px: 12)."""
    if image_size is None:
        return MIN_SIZE_AT_256
    return max(1, MIN_SIZE_AT_256 * int(image_size) ** 2 // 256**2)


def worker_init_fn(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: one OpenCV thread per worker process.

    Seeding needs nothing here (episodes depend on ``(seed, index)`` only). OpenCV's own thread pool inside
    each worker oversubscribes the cores (docs/speed.md, "Loader throughput").
    """
    cv2.setNumThreads(1)


@dataclass
class _Volume:
    """One training volume prepared for sampling.

    ``image (Z, h, w)`` float32 normalised; ``class_index (Z, h, w)`` uint16, 0 = no class, ``k + 1`` =
    ``classes[k]``; ``counts (Z, K)`` pixels of each class per slice; ``allowed (Z,)`` slices left by the
    Setting 2 exclusion; ``runs[k]`` ``(R, 2)`` int array of ``[first_slice, length]`` of the runs of class
    ``k`` that are at least ``S + Q`` long.
    """

    case_id: int
    image: np.ndarray
    class_index: np.ndarray
    classes: np.ndarray
    counts: np.ndarray
    allowed: np.ndarray
    runs: list[np.ndarray]


def _runs(mask: np.ndarray, min_length: int) -> np.ndarray:
    """``[first, length]`` rows of the runs of True in a 1-D mask that are at least ``min_length`` long."""
    padded = np.concatenate([[False], mask, [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    starts, ends = edges[0::2], edges[1::2]
    keep = ends - starts >= min_length
    return np.stack([starts[keep], (ends - starts)[keep]], axis=1)


class TrainDataset(Dataset):
    """Episodes for self-supervised training (method.md §3).

    ``__getitem__`` returns a dict: ``supp_imgs (S, 3, H, W)`` float32, ``supp_masks (S, H, W)`` float32
    {0,1}, ``qry_imgs (Q, 3, H, W)`` float32, ``qry_labels (Q, H, W)`` int64 {0,1}, ``class_id`` int (the
    supervoxel id or label value drawn), ``case_id`` int and ``slice_indices (S + Q,)`` int64 (slice indices
    in the volume, supports first, after any reversal). ``H = W = image_size`` when it is set, else native.

    Extra arguments beyond the shared contract: ``n_sv`` (supervoxel folder ``supervoxels_<n_sv>``, default
    the dataset's), ``case_ids`` (restrict training to these case ids, all of them outside ``eval_fold``;
    for small runs and tests), ``test_labels`` (the classes ``use_gt`` never draws; default the dataset's),
    ``max_tries`` (class/run draws per episode before giving up), ``held_out`` (draw from the volumes of
    fold ``eval_fold`` instead, the ones training never sees, reading their images and supervoxels only,
    never their labels: the label-free validation of :mod:`engine.evaluation`), ``pseudo_labels`` and
    ``sampling`` (module docstring).
    """

    def __init__(
        self,
        dataset: str | DatasetInfo,
        data_root: str | os.PathLike,
        eval_fold: int,
        n_shot: int = 1,
        n_query: int = 1,
        use_gt: bool = False,
        exclude_label: Sequence[int] | None = None,
        exclusion: str = "any",
        min_size: int = 200,
        image_size: int | None = None,
        augment: bool = True,
        seed: int = 0,
        length: int = 40000,
        n_sv: int | None = None,
        case_ids: Sequence[int] | None = None,
        test_labels: Sequence[int] | None = None,
        max_tries: int = 10000,
        held_out: bool = False,
        pseudo_labels: str = "supervoxels_3d",
        sampling: str = "adnet",
    ) -> None:
        self.info = get_dataset_info(dataset)
        self.pseudo_labels = check_pseudo_labels(pseudo_labels)
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
        self.sampling = sampling
        if sampling == "ssl_alpnet" and (n_shot != 1 or n_query != 1 or use_gt):
            raise ValueError(
                "sampling='ssl_alpnet' draws 1 support and 1 query from pseudo-labels: expected n_shot=1, "
                f"n_query=1, use_gt=False; got n_shot={n_shot}, n_query={n_query}, use_gt={use_gt}"
            )
        if held_out and (use_gt or exclude_label is not None):
            raise ValueError(
                "held_out episodes read the held-out volumes' images and supervoxels only: use_gt and "
                f"exclude_label need their labels (got use_gt={use_gt}, exclude_label={exclude_label})"
            )
        if n_shot < 1 or n_query < 1:
            raise ValueError(f"n_shot and n_query must be >= 1, got n_shot={n_shot}, n_query={n_query}")
        if exclusion not in EXCLUSION_MODES:
            raise ValueError(f"exclusion must be one of {EXCLUSION_MODES}, got {exclusion!r}")
        if length < 1 or max_tries < 1 or min_size < 0:
            raise ValueError(
                f"expected length >= 1, max_tries >= 1, min_size >= 0; got {length}, {max_tries}, {min_size}"
            )
        if image_size is not None and int(image_size) < 1:
            raise ValueError(f"image_size must be None or a positive int, got {image_size!r}")
        if int(seed) < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.n_shot, self.n_query = int(n_shot), int(n_query)
        self.use_gt = bool(use_gt)
        self.exclude_label = (
            None if exclude_label is None else self.info.validate_labels(exclude_label, "exclude_label")
        )
        self.exclusion = exclusion
        self.min_size = int(min_size)
        self.image_size = None if image_size is None else int(image_size)
        self.augment = bool(augment)
        self.seed = int(seed)
        self.length = int(length)
        self.max_tries = int(max_tries)
        self.test_labels = self.info.validate_labels(
            self.info.test_labels if test_labels is None else test_labels, "test_labels"
        )
        self.eval_fold = eval_fold
        self.held_out = bool(held_out)
        self.volumes = self._load(data_root, eval_fold, n_sv, case_ids)

    # ---------------------------------------------------------------- construction
    def _load(
        self, data_root: str | os.PathLike, eval_fold: int, n_sv: int | None, case_ids: Sequence[int] | None
    ) -> list[_Volume]:
        info = self.info
        test_positions = set(info.fold(eval_fold))
        cases = list_cases(
            info, data_root, supervoxels=not self.use_gt, n_sv=n_sv, pseudo_labels=self.pseudo_labels
        )
        if len(cases) != info.n_volumes:
            warnings.warn(
                f"{info.name}: found {len(cases)} of its {info.n_volumes} volumes under {data_root}; folds "
                "refer to positions in the sorted list of the volumes present",
                stacklevel=3,
            )
        role = "held-out" if self.held_out else "training"
        training = [case for pos, case in enumerate(cases) if (pos in test_positions) == self.held_out]
        if case_ids is not None:
            by_id = {case.case_id: case for case in training}
            unknown = sorted(set(int(i) for i in case_ids) - set(by_id))
            if unknown:
                raise ValueError(
                    f"{info.name}: case_ids {unknown} are not {role} cases of fold {eval_fold}; "
                    f"{role} cases: {sorted(by_id)}"
                )
            training = [by_id[int(i)] for i in sorted(set(int(i) for i in case_ids))]
        if not training:
            raise ValueError(f"{info.name}: no {role} volumes for fold {eval_fold} among {len(cases)} cases")
        read = (read_case(case, info, label=not self.held_out) for case in training)
        if self.sampling == "ssl_alpnet":
            return self._prepare_slices([self._slice_volume(case) for case in read])
        volumes = [self._prepare(case) for case in read]
        usable = [v for v in volumes if any(len(r) for r in v.runs) and self._has_valid_start(v)]
        if not usable:
            raise ValueError(
                f"{info.name} fold {eval_fold}: no episode can be drawn from any of the {len(volumes)} "
                f"{role} volumes (cases {[case.case_id for case in training]}): no class spans "
                f"{self.n_shot + self.n_query} consecutive candidate slices with at least {self.min_size} "
                f"pixels on one of the first two (use_gt={self.use_gt}, exclude_label={self.exclude_label}, "
                f"exclusion={self.exclusion!r}, image_size={self.image_size})"
            )
        return usable

    def _prepare(self, case: Case) -> _Volume:
        source = (case.label if self.use_gt else case.supervoxel).array
        path = case.files.label if self.use_gt else case.files.supervoxel
        if source.min() < 0:
            raise ValueError(f"{path}: class ids must be >= 0, found {source.min()}")
        present = np.flatnonzero(np.bincount(source.ravel()))
        classes = present[present > 0]
        if self.use_gt:
            classes = classes[~np.isin(classes, self.test_labels)]
        lookup = np.zeros(int(source.max()) + 1, dtype=np.uint16)
        lookup[classes] = np.arange(1, len(classes) + 1, dtype=np.uint16)
        class_index = resize_slices(lookup[source], self.image_size, nearest=True)
        image = resize_slices(
            normalize_volume(case.image.array, case.files.image), self.image_size, nearest=False
        )

        n_slices, n_classes = class_index.shape[0], len(classes)
        flat = (np.arange(n_slices)[:, None] * (n_classes + 1) + class_index.reshape(n_slices, -1)).ravel()
        counts = np.bincount(flat, minlength=n_slices * (n_classes + 1)).reshape(n_slices, n_classes + 1)[
            :, 1:
        ]

        allowed = self._allowed(case)
        window = self.n_shot + self.n_query
        runs = [_runs((counts[:, k] > 0) & allowed, window) for k in range(n_classes)]
        return _Volume(case.case_id, image, class_index, classes, counts, allowed, runs)

    def _allowed(self, case: Case) -> np.ndarray:
        """``(Z,)`` bool: the slices Setting 2 leaves (all without ``exclude_label``), per ground truth."""
        if self.exclude_label is None:
            return np.ones(case.image.array.shape[0], dtype=bool)
        holds = np.stack([(case.label.array == v).any(axis=(1, 2)) for v in self.exclude_label], axis=1)
        return ~(holds.any(axis=1) if self.exclusion == "any" else holds.all(axis=1))

    def _slice_volume(self, case: Case) -> SliceVolume:
        ids = case.supervoxel.array
        return SliceVolume(
            case_id=case.case_id,
            source=case.files.supervoxel,
            image=resize_slices(
                normalize_volume(case.image.array, case.files.image), self.image_size, nearest=False
            ),
            ids=resize_slices(ids, self.image_size, nearest=True),
            max_ids=ids.reshape(ids.shape[0], -1).max(axis=1),
            allowed=self._allowed(case),
        )

    def _prepare_slices(self, volumes: list[SliceVolume]) -> list[SliceVolume]:
        """SSL-ALPNet sampling: the law over all slices in load order (``slice_p``), the owner of each."""
        owner = np.concatenate([np.full(len(v.max_ids), k) for k, v in enumerate(volumes)])
        max_ids = np.concatenate([v.max_ids for v in volumes])
        try:
            self.slice_p = slice_law(max_ids, np.concatenate([v.allowed for v in volumes]))
        except ValueError as error:
            raise ValueError(
                f"{self.info.name} fold {self.eval_fold}, cases {[v.case_id for v in volumes]}: {error}"
            ) from None
        self.slice_owner = owner
        self.slice_z = np.concatenate([np.arange(len(v.max_ids)) for v in volumes])
        one = np.flatnonzero((self.slice_p > 0) & (max_ids == 1))
        if len(one):
            volume = volumes[owner[one[0]]]
            raise ValueError(
                f"{volume.source}: slice {self.slice_z[one[0]]} has largest id 1 (pseudo_labels="
                f"{self.pseudo_labels!r}): the official randint(1, max_id) has no id to draw (the "
                f"notebook's files never have one); {len(one)} such slice(s)"
            )
        return volumes

    def _ssl_alpnet_episode(self, rng: np.random.Generator) -> dict[str, torch.Tensor | int]:
        """SSL-ALPNet's episode (module docstring): one slice, one id, two independent augmentations."""
        j = int(rng.choice(len(self.slice_p), p=self.slice_p))
        volume, z = self.volumes[self.slice_owner[j]], int(self.slice_z[j])
        class_id = int(rng.integers(1, volume.max_ids[z]))
        pair = []
        for _ in range(2):  # support, then query
            image = volume.image[z : z + 1]
            mask = (volume.ids[z : z + 1] == class_id).astype(np.float32)
            if self.augment:
                image = apply_gamma(image, sample_gamma(rng))
                image, mask = apply_geometry(image, mask, sample_geometry(rng, image.shape))
            pair.append((image, mask))
        (supp_img, supp_mask), (qry_img, qry_mask) = pair
        return {
            "supp_imgs": torch.from_numpy(to_three_channels(supp_img)),
            "supp_masks": torch.from_numpy(np.ascontiguousarray(supp_mask, dtype=np.float32)),
            "qry_imgs": torch.from_numpy(to_three_channels(qry_img)),
            "qry_labels": torch.from_numpy(qry_mask.astype(np.int64)),
            "class_id": class_id,
            "case_id": int(volume.case_id),
            "slice_indices": torch.tensor([z, z], dtype=torch.int64),
        }

    def _has_valid_start(self, volume: _Volume) -> bool:
        """Whether some class, run and start pass step 4 (so the rejection loop can end)."""
        for k, runs in enumerate(volume.runs):
            for first, length in runs:
                starts = np.arange(first, first + length - (self.n_shot + self.n_query) + 1)
                sizes = np.maximum(volume.counts[starts, k], volume.counts[starts + 1, k])
                if (sizes >= self.min_size).any():
                    return True
        return False

    # ---------------------------------------------------------------- sampling
    def __len__(self) -> int:
        return self.length

    def _draw_slices(self, rng: np.random.Generator, volume: _Volume) -> tuple[int, np.ndarray]:
        """Steps 1-4 within one volume: returns the class index ``k`` and ``S + Q`` slice indices."""
        window = self.n_shot + self.n_query
        no_run = too_small = 0
        for _ in range(self.max_tries):
            k = int(rng.integers(len(volume.classes)))
            runs = volume.runs[k]
            if len(runs) == 0:
                no_run += 1
                continue
            first, length = runs[int(rng.integers(len(runs)))]
            start = int(first + rng.integers(length - window + 1))
            if max(volume.counts[start, k], volume.counts[start + 1, k]) < self.min_size:
                too_small += 1
                continue
            return k, np.arange(start, start + window)
        raise RuntimeError(
            f"{self.info.name} case {volume.case_id}: no episode after {self.max_tries} tries: {no_run} "
            f"drawn classes had no run of {window} consecutive candidate slices, {too_small} drawn windows "
            f"had fewer than {self.min_size} class pixels on both of their first two slices (raise max_tries "
            "or lower min_size)"
        )

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        if not 0 <= index < self.length:
            raise IndexError(f"episode index {index} out of range 0..{self.length - 1}")
        rng = np.random.default_rng([self.seed, int(index)])
        if self.sampling == "ssl_alpnet":
            return self._ssl_alpnet_episode(rng)
        volume = self.volumes[int(rng.integers(len(self.volumes)))]
        k, slices = self._draw_slices(rng, volume)
        if rng.random() < 0.5:
            slices = slices[::-1].copy()
        images = volume.image[slices]  # (S+Q, h, w)
        masks = (volume.class_index[slices] == k + 1).astype(np.float32)
        supp_imgs, qry_imgs = images[: self.n_shot], images[self.n_shot :]
        supp_masks, qry_masks = masks[: self.n_shot], masks[self.n_shot :]
        if self.augment:
            params = sample_gamma(rng)
            if rng.random() < 0.5:
                qry_imgs = apply_gamma(qry_imgs, params)
            else:
                supp_imgs = apply_gamma(supp_imgs, params)
            to_query = rng.random() < 0.5
            if to_query:
                qry_imgs, qry_masks = apply_geometry(
                    qry_imgs, qry_masks, sample_geometry(rng, qry_imgs.shape)
                )
            else:
                supp_imgs, supp_masks = apply_geometry(
                    supp_imgs, supp_masks, sample_geometry(rng, supp_imgs.shape)
                )
        return {
            "supp_imgs": torch.from_numpy(to_three_channels(supp_imgs)),
            "supp_masks": torch.from_numpy(np.ascontiguousarray(supp_masks, dtype=np.float32)),
            "qry_imgs": torch.from_numpy(to_three_channels(qry_imgs)),
            "qry_labels": torch.from_numpy(qry_masks.astype(np.int64)),
            "class_id": int(volume.classes[k]),
            "case_id": int(volume.case_id),
            "slice_indices": torch.from_numpy(slices.astype(np.int64)),
        }
