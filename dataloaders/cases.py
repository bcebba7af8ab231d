"""The files of a dataset paired by case id, checked against each other, and read into one :class:`Case`.

Files of a dataset ``<data_root>/<NAME>/<image_folder>/image_<id>.nii.gz``, ``label_<id>.nii.gz`` and
``<data_root>/<NAME>/supervoxels_<n_sv>/superpix-MIDDLE_<id>.nii.gz`` (method.md §1) are paired by the integer
``<id>`` in their names (the official code paired them by position in three separately sorted lists). A file
without its partner, partners of different shapes or geometries, or a damaged file is an error naming the
files. Geometry: a label must lie on its image's grid (spacing, origin and direction within
:data:`~dataloaders.volume.GEOMETRY_TOLERANCE`); a supervoxel file too, or carry the default geometry
(spacing 1, origin 0, identity direction), as the published supervoxels do: their voxels were computed on
the image's grid, which is the geometry the case then uses.

Two kinds of pseudo-label (``pseudo_labels``): ``'supervoxels_3d'`` (default, the ADNet lineage's, above)
and ``'superpixels_2d'`` (SSL-ALPNet's, per slice, written by ``data/superpixels/generate_superpixels.py``
to ``<data_root>/<NAME>/superpixels_2d/superpix-MIDDLE_<id>.nii.gz`` on the image's grid and geometry; the
default geometry is not accepted for them, as that command always writes the image's).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .datasets import DatasetInfo, get_dataset_info
from .nifti import read_header, read_volume
from .volume import Geometry, Volume

#: Kinds of pseudo-label file a case can carry, the folder of the 2-D kind, and the command making each.
PSEUDO_LABELS = ("supervoxels_3d", "superpixels_2d")
SUPERPIXEL_2D_FOLDER = "superpixels_2d"
_MAKERS = {
    "supervoxels_3d": "data/supervoxels/generate_supervoxels.py",
    "superpixels_2d": "data/superpixels/generate_superpixels.py",
}
_NOUNS = {"supervoxels_3d": "supervoxel", "superpixels_2d": "2-D superpixel"}


def check_pseudo_labels(pseudo_labels: str) -> str:
    """``pseudo_labels`` if it is a known kind, else ``ValueError`` naming the known ones."""
    if pseudo_labels not in PSEUDO_LABELS:
        raise ValueError(f"pseudo_labels must be one of {PSEUDO_LABELS}, got {pseudo_labels!r}")
    return pseudo_labels


@dataclass(frozen=True)
class CaseFiles:
    """The files of one case; ``supervoxel`` (the pseudo-label file, of kind ``pseudo_labels``) is None when
    pseudo-labels were not asked for."""

    case_id: int
    image: Path
    label: Path
    supervoxel: Path | None = None
    pseudo_labels: str = "supervoxels_3d"


@dataclass
class Case:
    """One case in memory: ``image``, ``label`` and ``supervoxel`` volumes, each ``(Z, H, W)`` on one grid.

    ``image`` is float32 in stored units (not normalised), ``label`` uint8 class values after the dataset's
    remap (None when it was not read), ``supervoxel`` int32 ids (0 = background) or None. The label keeps its
    file's geometry (checked to match the image's); supervoxels take the image's (theirs may be the default
    geometry).
    """

    case_id: int
    image: Volume
    label: Volume | None
    supervoxel: Volume | None
    files: CaseFiles

    @property
    def geometry(self) -> Geometry:
        """The case's geometry: its image's."""
        return self.image.geometry


def _ids_in(folder: Path, pattern: str) -> dict[int, Path]:
    """Map case id -> path for the files in ``folder`` whose names match ``pattern`` (``{id}`` = digits)."""
    prefix, suffix = pattern.split("{id}")
    regex = re.compile(re.escape(prefix) + r"(\d+)" + re.escape(suffix) + r"\Z")
    found = {}
    for path in folder.iterdir():
        match = regex.match(path.name)
        if match:
            found[int(match.group(1))] = path
    return found


def dataset_folders(
    dataset: str | DatasetInfo,
    data_root: str | os.PathLike,
    n_sv: int | None = None,
    pseudo_labels: str = "supervoxels_3d",
) -> tuple[Path, Path]:
    """``(image_folder, pseudo_label_folder)`` of ``dataset`` under ``data_root`` (existence not checked);
    ``n_sv`` names the folder of the 3-D kind only."""
    info = get_dataset_info(dataset)
    base = Path(data_root) / info.name
    if check_pseudo_labels(pseudo_labels) == "superpixels_2d":
        return base / info.image_folder, base / SUPERPIXEL_2D_FOLDER
    return base / info.image_folder, base / info.supervoxel_folder(n_sv)


def list_cases(
    dataset: str | DatasetInfo,
    data_root: str | os.PathLike,
    supervoxels: bool = False,
    n_sv: int | None = None,
    pseudo_labels: str = "supervoxels_3d",
) -> list[CaseFiles]:
    """Every case of ``dataset`` under ``data_root``, sorted by integer case id.

    Images, labels and (with ``supervoxels=True``) pseudo-label files of kind ``pseudo_labels`` are paired by
    case id; any file whose partner is missing raises ``FileNotFoundError`` naming the missing file. Fold
    positions index this list.
    """
    info = get_dataset_info(dataset)
    image_dir, sv_dir = dataset_folders(info, data_root, n_sv, pseudo_labels)
    if not image_dir.is_dir():
        raise FileNotFoundError(
            f"{info.name}: image folder not found: {image_dir} "
            f"(expected <data_root>/{info.name}/{info.image_folder}/)"
        )
    images = _ids_in(image_dir, info.image_pattern)
    labels = _ids_in(image_dir, info.label_pattern)
    if not images:
        raise FileNotFoundError(f"{info.name}: no files matching {info.image_pattern!r} in {image_dir}")
    groups = [(images, image_dir, info.image_pattern), (labels, image_dir, info.label_pattern)]
    if supervoxels:
        if not sv_dir.is_dir():
            raise FileNotFoundError(
                f"{info.name}: {_NOUNS[pseudo_labels]} folder not found: {sv_dir} "
                f"(make it with {_MAKERS[pseudo_labels]} --dataset {info.name})"
            )
        groups.append((_ids_in(sv_dir, info.supervoxel_pattern), sv_dir, info.supervoxel_pattern))
    all_ids = set().union(*(found for found, _, _ in groups))
    for found, folder, pattern in groups:
        missing = sorted(all_ids - set(found))
        if missing:
            others = [f for f, _, _ in groups if missing[0] in f]
            raise FileNotFoundError(
                f"{info.name}: missing {folder / pattern.format(id=missing[0])} "
                f"(partner of {others[0][missing[0]]}); {len(missing)} case(s) lack this file: {missing}"
            )
    sv_files = groups[2][0] if supervoxels else {}
    return [
        CaseFiles(
            case_id=i,
            image=images[i],
            label=labels[i],
            supervoxel=sv_files.get(i),
            pseudo_labels=pseudo_labels,
        )
        for i in sorted(all_ids)
    ]


def check_partner(
    image: Path,
    shape: tuple[int, ...],
    geometry: Geometry,
    partner: Path,
    partner_shape: tuple[int, ...],
    partner_geometry: Geometry,
    default_ok: bool = False,
) -> None:
    """Refuse a partner file (label or supervoxels) whose shape or geometry is not its image's.

    ``default_ok``: the partner may carry the default geometry instead (published supervoxels). The
    errors name both files and both values.
    """
    if partner_shape != shape:
        raise ValueError(
            f"shape mismatch: {partner} has (Z,H,W)={partner_shape}, its image {image} has {shape}"
        )
    if partner_geometry.matches(geometry) or (default_ok and partner_geometry.is_default):
        return
    raise ValueError(
        f"geometry mismatch: {partner} has {partner_geometry.describe()}; its image {image} has "
        f"{geometry.describe()}"
        + (
            " (supervoxel files may also carry the default geometry: spacing 1, origin 0, identity)"
            if default_ok
            else ""
        )
    )


def _partners(case: CaseFiles) -> list[tuple[Path, bool]]:
    """The files to check against the image, each with whether the default geometry is accepted: the label,
    and the pseudo-labels when listed (the default geometry for the published 3-D supervoxels only)."""
    if case.supervoxel is None:
        return [(case.label, False)]
    return [(case.label, False), (case.supervoxel, case.pseudo_labels == "supervoxels_3d")]


def check_case(case: CaseFiles) -> tuple[tuple[int, int, int], Geometry]:
    """Read the headers of a case's files and check that their shapes and geometries agree (without reading
    voxels). Returns the image's shape and geometry."""
    shape, geometry = read_header(case.image)
    for path, default_ok in _partners(case):
        check_partner(case.image, shape, geometry, path, *read_header(path), default_ok=default_ok)
    return shape, geometry


def remap_labels(
    label: np.ndarray, dataset: str | DatasetInfo, path: str | os.PathLike = "<array>"
) -> np.ndarray:
    """Turn stored label values into class values (uint8), applying the dataset's on-disk remap.

    Values already equal to a class value are kept, so CMR labels stored as 1/2/3 load as well as the
    published 200/500/600. Non-integer or unknown values raise ``ValueError`` naming ``path``.
    """
    info = get_dataset_info(dataset)
    values = np.unique(label)
    if not np.array_equal(values, np.rint(values)):
        raise ValueError(
            f"{path}: label values must be integers, found {values[values != np.rint(values)][:5]}"
        )
    table = {0: 0, **{v: v for v in info.label_names}, **dict(info.label_remap)}
    unknown = [int(v) for v in values if int(v) not in table]
    if unknown:
        raise ValueError(
            f"{path}: unknown label values {unknown} for {info.name}; expected 0, {sorted(info.label_names)}"
            + (f" or stored values {sorted(info.label_remap)}" if info.label_remap else "")
        )
    out = np.zeros(label.shape, dtype=np.uint8)
    for v in values:
        if table[int(v)] != 0:
            out[label == v] = table[int(v)]
    return out


def read_case(case: CaseFiles, dataset: str | DatasetInfo, label: bool = True) -> Case:
    """Read image, label (remapped) and, when listed, supervoxels of one case; shapes and geometries must
    agree (:func:`check_partner`). ``label=False`` leaves the label file unread (``Case.label`` None)."""
    image, geometry = read_volume(case.image)
    read = {}
    for path, default_ok in _partners(case):
        if path == case.label and not label:
            continue
        array, partner_geometry = read_volume(path)
        check_partner(case.image, image.shape, geometry, path, array.shape, partner_geometry, default_ok)
        read[path] = Volume(array, partner_geometry)
    supervoxel = None
    if case.supervoxel is not None:
        ids = read[case.supervoxel].array
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"{case.supervoxel}: supervoxel ids must be integers, found dtype {ids.dtype}")
        supervoxel = Volume(ids.astype(np.int32, copy=False), geometry)
    remapped = None
    if label:
        stored = read[case.label]
        remapped = Volume(remap_labels(stored.array, dataset, case.label), stored.geometry)
    return Case(
        case_id=case.case_id,
        image=Volume(image.astype(np.float32, copy=False), geometry),
        label=remapped,
        supervoxel=supervoxel,
        files=case,
    )
