"""Supervoxel pseudo-labels for a dataset (method.md §2), one ``superpix-MIDDLE_<id>.nii.gz`` per image.

For each ``<data_root>/<DATASET>/<image_folder>/image_<id>.nii.gz``:

1. rescale the volume to 0-255 (``255 * (v - min) / (max - min)``, float64);
2. 3D Felzenszwalb segmentation (``felzenszwalb_3d_cy``) with ``scale = 1``, no smoothing,
   ``min_size = n_sv`` and the voxel spacing ``(pixdim[3], pixdim[1], pixdim[2])`` read from the NIfTI
   header as text, as the published pipeline did (``7.99``, not the float32 ``7.989999771...``);
3. per slice, a foreground mask: the largest 8-connected component of ``slice > 10`` with its holes
   filled (an empty slice keeps an empty mask); supervoxel 0 becomes ``max + 1`` and every voxel
   outside the mask becomes 0 (background).

The result is int32 on the image's grid. The published files carry identity geometry (spacing 1, origin
0); the files written here carry the image's spacing, origin and direction instead, so they overlay the
image in any viewer. Loaders use only the arrays, which are identical either way.

Command line (run from the repository root; the extension must be built first with
``python data/supervoxels/setup.py build_ext --inplace``)::

    python data/supervoxels/generate_supervoxels.py --dataset CMR --data-root ../shared/data \
        [--ids 1 5] [--n-sv 1000] [--out DIR] [--jobs 2]

Existing output files are replaced, so the command can be re-run. Every option is checked (errors name
it) before anything is read or any folder made; each file is written under a temporary name and renamed,
and a failed run leaves no temporary file and no empty output folder of its own making.
"""

from __future__ import annotations

import argparse
import os
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from skimage.measure import label as connected_components

from dataloaders import Geometry, read_volume, write_volume
from dataloaders.datasets import DATASETS, DatasetInfo, get_dataset_info
from dataloaders.volume import require_simpleitk
from utils import run_cli

try:
    from data.supervoxels.felzenszwalb_3d_cy import felzenszwalb_3d
except ImportError as err:  # the compiled extension is a build output, not in git
    raise ImportError(
        "the supervoxel extension is not built; run from the repository root: "
        "python data/supervoxels/setup.py build_ext --inplace"
    ) from err

sitk = require_simpleitk("supervoxel generation (data/supervoxels/generate_supervoxels.py)")

#: Foreground threshold on the 0-255 volume (published value).
FOREGROUND_THRESHOLD = 10.0


def rescale_to_255(volume: np.ndarray, path: str | os.PathLike = "<array>") -> np.ndarray:
    """Min-max rescale a volume to 0-255 in float64. Shape: ``(Z, H, W)`` -> ``(Z, H, W)``."""
    volume = np.asarray(volume, dtype=np.float64)
    low, high = volume.min(), volume.max()
    if not high > low:
        raise ValueError(f"{path}: constant volume (all voxels {low}), cannot make supervoxels")
    return 255 * (volume - low) / (high - low)


def read_spacing_zyx(path: str | os.PathLike) -> tuple[float, float, float]:
    """Voxel spacing ``(pixdim[3], pixdim[1], pixdim[2])`` from the NIfTI header, parsed from its text form.

    The published supervoxels were computed from these decimal strings; SimpleITK's ``GetSpacing`` gives
    the float32 header values instead, which changes the z-edge weights in their last bits and with them
    the order of tied edges.
    """
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.LoadPrivateTagsOn()
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise ValueError(f"cannot read the header of {path}: {str(err).strip().splitlines()[-1]}") from err
    keys = ("pixdim[3]", "pixdim[1]", "pixdim[2]")
    missing = [key for key in keys if not reader.HasMetaDataKey(key)]
    if missing:
        raise ValueError(f"{path}: expected a NIfTI header with {keys}, missing {missing}")
    return tuple(float(reader.GetMetaData(key)) for key in keys)


def foreground_mask_2d(slice_255: np.ndarray, threshold: float = FOREGROUND_THRESHOLD) -> np.ndarray:
    """Body mask of one slice: largest 8-connected component of ``slice > threshold``, holes filled.

    Shape: ``(H, W)`` -> ``(H, W)`` bool. A slice with nothing above the threshold gives an empty mask.
    """
    above = slice_255 > threshold
    if not above.any():
        return above
    components = connected_components(above, connectivity=2)
    largest = np.argmax(np.bincount(components.ravel())[1:]) + 1  # first one on ties
    return ndi.binary_fill_holes(components == largest)


def mask_supervoxels(labels: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """Move supervoxel 0 to ``max + 1``, then zero everything outside ``foreground``.

    Shape: ``(Z, H, W)`` labels and bool mask -> ``(Z, H, W)`` int32 (0 = background).
    """
    if labels.shape != foreground.shape:
        raise ValueError(f"labels {labels.shape} and foreground mask {foreground.shape} differ in shape")
    out = labels.astype(np.int32, copy=True)
    out[out == 0] = out.max() + 1
    out[~foreground] = 0
    return out


def compute_supervoxels(image_path: str | os.PathLike, n_sv: int) -> tuple[np.ndarray, Geometry]:
    """Supervoxels of one image file. Returns the ``(Z, H, W)`` int32 labels and the image geometry."""
    volume, geometry = read_volume(image_path)
    volume_255 = rescale_to_255(volume, image_path)
    labels = felzenszwalb_3d(volume_255, read_spacing_zyx(image_path), min_size=int(n_sv), scale=1.0)
    foreground = np.stack([foreground_mask_2d(s) for s in volume_255])
    return mask_supervoxels(labels, foreground), geometry


def list_image_ids(dataset: str | DatasetInfo, data_root: str | os.PathLike) -> dict[int, Path]:
    """``{case id: image path}`` of every image of ``dataset`` under ``data_root``, sorted by id."""
    info = get_dataset_info(dataset)
    folder = Path(data_root) / info.name / info.image_folder
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{info.name}: image folder not found: {folder} "
            f"(expected <data_root>/{info.name}/{info.image_folder}/)"
        )
    prefix, suffix = info.image_pattern.split("{id}")
    pattern = re.compile(re.escape(prefix) + r"(\d+)" + re.escape(suffix) + r"\Z")
    found = {int(m.group(1)): folder / m.group(0) for m in map(pattern.match, os.listdir(folder)) if m}
    if not found:
        raise FileNotFoundError(f"{info.name}: no files matching {info.image_pattern!r} in {folder}")
    return dict(sorted(found.items()))


def select_cases(
    dataset: str | DatasetInfo, data_root: str | os.PathLike, ids: Sequence[int] | None = None
) -> dict[int, Path]:
    """The requested cases (all when ``ids`` is None); an id without an image file is an error."""
    images = list_image_ids(dataset, data_root)
    if ids is None:
        return images
    missing = [i for i in ids if i not in images]
    if missing:
        folder = next(iter(images.values())).parent
        raise FileNotFoundError(
            f"--ids: no image for case id(s) {missing} in {folder}; available ids: {sorted(images)}"
        )
    return {int(i): images[int(i)] for i in ids}


@dataclass(frozen=True)
class CaseResult:
    case_id: int
    path: Path
    n_labels: int
    seconds: float


def _generate_case(case_id: int, image_path: Path, n_sv: int, target: Path) -> CaseResult:
    start = time.perf_counter()
    labels, geometry = compute_supervoxels(image_path, n_sv)
    write_volume(labels, geometry, target)  # atomic: an interrupted run never leaves a truncated file
    return CaseResult(case_id, target, int(len(np.unique(labels))), time.perf_counter() - start)


def run_cases(
    worker: Callable[..., object], tasks: Sequence[tuple], jobs: int
) -> list:
    """Run ``worker(*task)`` for every task, in a process pool when ``jobs > 1``; results in task order."""
    if jobs == 1 or len(tasks) <= 1:
        return [worker(*task) for task in tasks]
    with ProcessPoolExecutor(max_workers=min(jobs, len(tasks))) as pool:
        futures = [pool.submit(worker, *task) for task in tasks]
        return [future.result() for future in futures]


def check_options(
    dataset: str,
    data_root: str | os.PathLike,
    n_sv: int | None,
    jobs: int,
    out: str | os.PathLike | None = None,
) -> DatasetInfo:
    """Check the command's values before anything is read or made; each error names its option (the
    data root and ``--ids`` are checked by :func:`select_cases`, which also runs before any folder is
    made)."""
    try:
        info = get_dataset_info(dataset)
    except ValueError as err:
        raise ValueError(f"--dataset: {err}") from None
    if n_sv is not None and (isinstance(n_sv, bool) or not isinstance(n_sv, Integral) or n_sv < 1):
        raise ValueError(f"--n-sv: expected a positive integer, got {n_sv!r}")
    if isinstance(jobs, bool) or not isinstance(jobs, Integral) or jobs < 1:
        raise ValueError(f"--jobs: expected a positive integer, got {jobs!r}")
    if out is not None:
        blocker = next((p for p in (Path(out), *Path(out).parents) if p.exists()), None)
        if blocker is not None and not blocker.is_dir():
            raise ValueError(f"--out: expected a folder, but {blocker} is a file")
    return info


def generate(
    dataset: str,
    data_root: str | os.PathLike,
    ids: Sequence[int] | None = None,
    n_sv: int | None = None,
    out: str | os.PathLike | None = None,
    jobs: int = 1,
) -> list[CaseResult]:
    """Write the supervoxels of the selected cases; returns one :class:`CaseResult` per case.

    Every value is checked, and the cases found, before the output folder is made; a folder made here is
    removed again when the run fails before writing anything into it (an empty ``supervoxels_<n>/`` would
    turn the loaders' "folder not found" into "every case lacks this file").
    """
    info = check_options(dataset, data_root, n_sv, jobs, out)
    n_sv = info.n_sv if n_sv is None else int(n_sv)
    cases = select_cases(info, data_root, ids)
    out_dir = Path(out) if out is not None else Path(data_root) / info.name / info.supervoxel_folder(n_sv)
    made = [p for p in (out_dir, *out_dir.parents) if not p.exists()]
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = [
        (case_id, path, n_sv, out_dir / info.supervoxel_pattern.format(id=case_id))
        for case_id, path in cases.items()
    ]
    try:
        return run_cases(_generate_case, tasks, jobs)
    except BaseException:
        for folder in made:  # innermost first; only folders this run made and left empty
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise


def build_parser(description: str, n_sv: bool = True) -> argparse.ArgumentParser:
    """The options both pseudo-label commands share (``n_sv=False``: without ``--n-sv``, for the 2-D
    superpixels, whose sizes are fixed)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--dataset", required=True, help=f"one of {sorted(DATASETS)}")
    parser.add_argument("--data-root", required=True, type=Path, help="folder holding CHAOST2/, SABS/, CMR/")
    parser.add_argument("--ids", type=int, nargs="+", default=None, help="case ids (default: all)")
    if n_sv:
        parser.add_argument("--n-sv", type=int, default=None, help="min_size (default: the dataset's n_sv)")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (default: <root>/<DATASET>/supervoxels_<n_sv>)"
    )
    args = parser.parse_args(argv)
    try:
        results = generate(args.dataset, args.data_root, args.ids, args.n_sv, args.out, args.jobs)
    except (ValueError, OSError) as err:
        parser.error(str(err))
    for result in results:
        print(f"{args.dataset} case {result.case_id}: {result.n_labels} labels (incl. 0), "
              f"{result.seconds:.1f} s -> {result.path}")
    return 0


if __name__ == "__main__":
    run_cli(main, "generate_supervoxels.py")
