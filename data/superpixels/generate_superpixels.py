"""SSL-ALPNet's 2-D superpixel pseudo-labels for a dataset, one ``superpix-MIDDLE_<id>.nii.gz`` per image.

SSL-ALPNet (Ouyang et al., ECCV 2020) trains on superpixels computed slice by slice, not on the 3-D
supervoxels of the ADNet lineage (``data/supervoxels/``). Its notebook (``data/pseudolabel_gen.ipynb`` of
cheng-01037/Self-supervised-Fewshot-Medical-Image-Segmentation, scale "MIDDLE") does, for each image
``<data_root>/<DATASET>/<image_folder>/image_<id>.nii.gz`` read as it is on disk (no rescaling, the file's
dtype):

1. per slice, scikit-image's 2-D Felzenszwalb segmentation with ``scale=1, sigma=1, min_size=400``;
2. per slice, a body mask: the largest 8-connected component of ``slice > threshold`` with its holes filled
   (a slice with nothing above the threshold keeps an empty mask); the threshold is the notebook's per
   dataset (:data:`FOREGROUND_THRESHOLDS`);
3. per slice, the notebook's relabelling, reproduced exactly (:func:`relabel_superpixels`): superpixel 0 is
   dropped (it becomes background), every voxel outside the mask becomes 0, and the remaining ids
   ``1..K-1`` become ``1..K-2`` in order except the largest id ``K-1``, which becomes ``K``. The gap at
   ``K-1`` is the notebook's (its list of ids holds the largest one twice), kept so the files equal its own.

Outputs go to ``<data_root>/<DATASET>/superpixels_2d/`` by default, beside the ``supervoxels_<n>/`` folder of
the 3-D kind, under the file names the official loader reads (``superpix-MIDDLE_<id>.nii.gz``, and the
notebook's body masks ``fgmask_<id>.nii.gz``): int32 ids (the notebook writes float64; the values are the
same) and uint8 masks on the image's grid and geometry.

Command line (from the repository root)::

    python data/superpixels/generate_superpixels.py --dataset CHAOST2 --data-root ../shared/data \
        [--ids 1 5] [--out DIR] [--jobs 2]

The options are checked, and the cases found, before any folder is made; each file is written under a
temporary name and renamed, as the 3-D command does.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from skimage.segmentation import felzenszwalb

from data.supervoxels.generate_supervoxels import (
    CaseResult,
    build_parser,
    check_options,
    foreground_mask_2d,
    run_cases,
    select_cases,
)
from dataloaders import read_volume, write_volume
from dataloaders.cases import SUPERPIXEL_2D_FOLDER
from utils import run_cli

#: The notebook's ``fg_thresh`` per dataset, on the images as stored. CMR has none in the notebook (SSL-ALPNet
#: did not use it): it gets the other MR dataset's value.
FOREGROUND_THRESHOLDS = {"CHAOST2": 1e-4 + 50, "SABS": 1e-4, "CMR": 1e-4 + 50}
#: The notebook's "MIDDLE" scale.
FELZENSZWALB_2D = {"scale": 1, "sigma": 1, "min_size": 400}
#: Output folder under ``<data_root>/<DATASET>/`` and file names (those the official loader reads).
SUPERPIXEL_FOLDER = SUPERPIXEL_2D_FOLDER
SUPERPIXEL_PATTERN = "superpix-MIDDLE_{id}.nii.gz"
MASK_PATTERN = "fgmask_{id}.nii.gz"


def relabel_superpixels(segments: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The notebook's relabelling of one slice's superpixels (module docstring, step 3), without its loop.

    Shape: ``(H, W)`` int ids ``0..K-1`` and ``(H, W)`` bool mask -> ``(H, W)`` int32 (0 = background).
    """
    segments = np.asarray(segments, dtype=np.int64)
    ids = np.unique(segments)
    top = int(ids.max())
    kept = ids[ids != 0]  # superpixel 0 is moved out of every id the notebook renumbers
    new_ids = np.zeros(top + 1, dtype=np.int32)
    new_ids[kept] = np.arange(1, kept.size + 1, dtype=np.int32)
    if top != 0:
        new_ids[top] = kept.size + 1  # the largest id comes twice in the notebook's list: the second wins
    return np.where(mask & (segments != 0), new_ids[segments], 0).astype(np.int32)


def superpixels_of(volume: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Superpixels and body masks of a volume as stored: ``(Z, H, W)`` -> ``(Z, H, W)`` int32 ids and
    ``(Z, H, W)`` bool masks (steps 1-3 of the module docstring)."""
    masks = np.stack([foreground_mask_2d(s, threshold) for s in volume])
    labels = np.stack([
        relabel_superpixels(felzenszwalb(s, **FELZENSZWALB_2D), m) for s, m in zip(volume, masks, strict=True)
    ])
    return labels, masks


def compute_superpixels(image_path: str | Path, threshold: float) -> tuple[np.ndarray, np.ndarray, object]:
    """:func:`superpixels_of` one image file, and the image's geometry."""
    volume, geometry = read_volume(image_path)
    return (*superpixels_of(volume, threshold), geometry)


def _generate_case(
    case_id: int, image_path: Path, threshold: float, target: Path, mask_target: Path
) -> CaseResult:
    start = time.perf_counter()
    labels, masks, geometry = compute_superpixels(image_path, threshold)
    write_volume(masks.astype(np.uint8), geometry, mask_target)
    write_volume(labels, geometry, target)
    return CaseResult(case_id, target, int(len(np.unique(labels))), time.perf_counter() - start)


def generate(
    dataset: str,
    data_root: str | Path,
    ids: Sequence[int] | None = None,
    out: str | Path | None = None,
    jobs: int = 1,
) -> list[CaseResult]:
    """Write the 2-D superpixels (and masks) of the selected cases; one :class:`CaseResult` per case.

    A folder made here is removed again when the run fails before writing anything into it.
    """
    info = check_options(dataset, data_root, None, jobs, out)
    cases = select_cases(info, data_root, ids)
    out_dir = Path(out) if out is not None else Path(data_root) / info.name / SUPERPIXEL_FOLDER
    made = [p for p in (out_dir, *out_dir.parents) if not p.exists()]
    out_dir.mkdir(parents=True, exist_ok=True)
    threshold = FOREGROUND_THRESHOLDS[info.name]
    tasks = [
        (i, path, threshold, out_dir / SUPERPIXEL_PATTERN.format(id=i), out_dir / MASK_PATTERN.format(id=i))
        for i, path in cases.items()
    ]
    try:
        return run_cases(_generate_case, tasks, jobs)
    except BaseException:
        for folder in made:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(__doc__.splitlines()[0], n_sv=False)
    parser.add_argument(
        "--out", type=Path, default=None,
        help=f"output folder (default: <root>/<DATASET>/{SUPERPIXEL_FOLDER})",
    )
    args = parser.parse_args(argv)
    try:
        results = generate(args.dataset, args.data_root, args.ids, args.out, args.jobs)
    except (ValueError, OSError) as err:
        parser.error(str(err))
    for result in results:
        print(f"{args.dataset} case {result.case_id}: {result.n_labels} labels (incl. 0), "
              f"{result.seconds:.1f} s -> {result.path}")
    return 0


if __name__ == "__main__":
    run_cli(main, "generate_superpixels.py")
