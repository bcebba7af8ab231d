"""Per-dataset facts in one table (method.md §1 and §5).

Every fact a loader, a training script or a report needs about CHAOST2, SABS and CMR lives here: label
values and names, the on-disk label remap (CMR stores 200/500/600), folder names and file patterns, the
supervoxel size ``n_sv``, the number of volumes, the five overlapping folds and the test classes. Nothing
here assumes an image size (CHAOST2/CMR slices are 256x256, the published SABS ones 257x257).

Folds are *positions* (0-based) in the list of cases sorted by integer case id, not case ids. Neighbouring
folds deliberately share one volume and fold 4 also holds position 0 (method.md §1, fold table). Within a fold
the volumes keep the sorted-position order, so the ``supp_idx``-th volume of fold 4 is position 0.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

N_FOLDS = 5


def overlapping_folds(n_volumes: int, step: int, n_folds: int = N_FOLDS) -> tuple[tuple[int, ...], ...]:
    """The lineage's fold rule: fold ``k`` holds positions ``k*step .. k*step+step`` (inclusive, clipped to
    the list), so neighbouring folds share one volume; the last fold also holds position 0.

    ``overlapping_folds(20, 4)`` gives CHAOST2's ``0-4, 4-8, 8-12, 12-16, 16-19 + 0``.
    """
    if n_volumes < 1 or step < 1 or n_folds < 1:
        raise ValueError(f"overlapping_folds: expected positive sizes, got {n_volumes=}, {step=}, {n_folds=}")
    folds = []
    for k in range(n_folds):
        positions = set(range(k * step, min(k * step + step + 1, n_volumes)))
        if k == n_folds - 1:
            positions.add(0)
        folds.append(tuple(sorted(positions)))
    return tuple(folds)


@dataclass(frozen=True)
class DatasetInfo:
    """Facts about one benchmark. Label values are the class values *after* the on-disk remap."""

    name: str
    description: str
    #: folder under ``<data_root>/<name>/`` holding ``image_<id>.nii.gz`` and ``label_<id>.nii.gz``
    image_folder: str
    #: default supervoxel size; supervoxels live in ``<data_root>/<name>/supervoxels_<n_sv>/``
    n_sv: int
    #: volumes of the full benchmark (a local copy may hold fewer, e.g. the 8-case SABS copy)
    n_volumes: int
    #: class value -> name, background (0) excluded
    label_names: Mapping[int, str]
    #: on-disk value -> class value, for values that differ (CMR: 200 -> 1, 500 -> 2, 600 -> 3)
    label_remap: Mapping[int, int]
    #: classes evaluated (method.md §5), in the order results are reported
    test_labels: tuple[int, ...]
    #: positions in the id-sorted case list, one tuple per fold
    folds: tuple[tuple[int, ...], ...]
    image_pattern: str = "image_{id}.nii.gz"
    label_pattern: str = "label_{id}.nii.gz"
    supervoxel_pattern: str = "superpix-MIDDLE_{id}.nii.gz"
    supervoxel_prefix: str = "supervoxels_"

    def supervoxel_folder(self, n_sv: int | None = None) -> str:
        """Folder name of the supervoxels made with ``n_sv`` (default: the dataset's)."""
        return f"{self.supervoxel_prefix}{self.n_sv if n_sv is None else int(n_sv)}"

    @property
    def n_folds(self) -> int:
        return len(self.folds)

    def fold(self, eval_fold: int) -> tuple[int, ...]:
        """Positions of fold ``eval_fold`` (sorted)."""
        try:
            index = -1 if isinstance(eval_fold, bool) else operator.index(eval_fold)
        except TypeError:
            index = -1
        if not 0 <= index < self.n_folds:
            raise ValueError(
                f"{self.name}: eval_fold must be an int in 0..{self.n_folds - 1}, got {eval_fold!r}"
            )
        return self.folds[index]

    def class_name(self, value: int) -> str:
        """Report name of class ``value`` (``'BG'`` for 0)."""
        if value == 0:
            return "BG"
        if value not in self.label_names:
            raise ValueError(f"{self.name}: unknown class value {value}; known: {sorted(self.label_names)}")
        return self.label_names[value]

    def validate_labels(self, labels: object, what: str) -> tuple[int, ...]:
        """Check that ``labels`` (e.g. ``exclude_label``) are class values of this dataset."""
        values = tuple(int(v) for v in labels)  # type: ignore[union-attr]
        unknown = [v for v in values if v not in self.label_names]
        if unknown:
            raise ValueError(
                f"{self.name}: {what} holds unknown class values {unknown}; known: {dict(self.label_names)}"
            )
        return values


def _frozen(mapping: dict[int, object]) -> Mapping:
    return MappingProxyType(dict(mapping))


DATASETS: Mapping[str, DatasetInfo] = _frozen(
    {
        "CHAOST2": DatasetInfo(
            name="CHAOST2",
            description="Abd-MRI: CHAOS challenge, MR T2-SPIR",
            image_folder="chaos_MR_T2_normalized",
            n_sv=5000,
            n_volumes=20,
            label_names=_frozen({1: "LIVER", 2: "RK", 3: "LK", 4: "SPLEEN"}),
            label_remap=_frozen({}),
            test_labels=(1, 2, 3, 4),
            folds=overlapping_folds(20, 4),
        ),
        "SABS": DatasetInfo(
            name="SABS",
            description="Abd-CT: Synapse multi-atlas abdomen CT",
            image_folder="sabs_CT_normalized",
            n_sv=5000,
            n_volumes=30,
            label_names=_frozen(
                {
                    1: "SPLEEN",
                    2: "RK",
                    3: "LK",
                    4: "GALLBLADDER",
                    5: "ESOPHAGUS",
                    6: "LIVER",
                    7: "STOMACH",
                    8: "AORTA",
                    9: "IVC",
                    10: "PS_VEIN",
                    11: "PANCREAS",
                    12: "AG_R",
                    13: "AG_L",
                }
            ),
            label_remap=_frozen({}),
            test_labels=(1, 2, 3, 6),
            folds=overlapping_folds(30, 6),
        ),
        "CMR": DatasetInfo(
            name="CMR",
            description="Card-MRI: MS-CMRSeg 2019, bSSFP",
            image_folder="cmr_MR_normalized",
            n_sv=1000,
            n_volumes=35,
            label_names=_frozen({1: "LV-MYO", 2: "LV-BP", 3: "RV"}),
            label_remap=_frozen({200: 1, 500: 2, 600: 3}),
            # method.md §5 reports LV-BP, LV-MYO, RV in this order
            test_labels=(2, 1, 3),
            folds=overlapping_folds(35, 7),
        ),
    }
)


def get_dataset_info(name: str | DatasetInfo) -> DatasetInfo:
    """Look up a dataset by its config name; a :class:`DatasetInfo` passes through (tests use synthetic
    ones). Unknown names raise ``ValueError`` listing the known ones."""
    if isinstance(name, DatasetInfo):
        return name
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {sorted(DATASETS)}")
    return DATASETS[name]
