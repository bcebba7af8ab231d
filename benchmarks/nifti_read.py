"""Read time per volume: the guarded ``read_volume`` (gzip CRC-32, truncation and non-finite checks) against
the libraries' own unchecked reads, both backends, measured in one run::

    python benchmarks/nifti_read.py --dataset CHAOST2 --repeats 5

"unchecked" is what each backend costs without any check (``SimpleITK.ReadImage`` + ``GetArrayFromImage``;
``nibabel.load`` + the unscaled data transposed to ``(Z, H, W)``), a lower bound on the reads before the
checks existed. "checked" is ``dataloaders.nifti.read_volume``; "checked, zlib" the same with libdeflate
switched off (what a host without the ``deflate`` package gets). Each figure is the median over the
repeats of the mean over the volumes, the variants interleaved volume by volume so that machine load
hits them alike; ratio = checked / unchecked.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from dataloaders import nifti
from dataloaders.cases import dataset_folders
from dataloaders.nifti import read_volume
from utils import resolve_data_root


def unchecked_sitk(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def unchecked_nibabel(path: Path) -> np.ndarray:
    import nibabel as nib

    return np.ascontiguousarray(np.asarray(nib.load(str(path)).dataobj.get_unscaled()).T)


def checked_zlib(path: Path, backend: str) -> np.ndarray:
    fast, nifti._deflate = nifti._deflate, None
    try:
        return read_volume(path, backend=backend)[0]
    finally:
        nifti._deflate = fast


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="CHAOST2", choices=["CHAOST2", "SABS", "CMR"])
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--kind", default="image", choices=["image", "label"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    image_dir, _ = dataset_folders(args.dataset, resolve_data_root(args.data_root))
    files = sorted(image_dir.glob(f"{args.kind}_*.nii.gz"))
    if not files:
        raise SystemExit(f"no {args.kind}_*.nii.gz in {image_dir}")
    variants: dict[str, Callable[[Path], np.ndarray]] = {
        "sitk unchecked": unchecked_sitk,
        "sitk checked": lambda p: read_volume(p, backend="sitk")[0],
        "sitk checked, zlib": lambda p: checked_zlib(p, "sitk"),
        "nibabel unchecked": unchecked_nibabel,
        "nibabel checked": lambda p: read_volume(p, backend="nibabel")[0],
        "nibabel checked, zlib": lambda p: checked_zlib(p, "nibabel"),
    }
    for path in files[:1]:  # warm-up and a sanity check: every variant gives the same voxels
        reference = unchecked_sitk(path)
        for name, read in variants.items():
            assert np.array_equal(read(path), reference), name
    means: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        totals = dict.fromkeys(variants, 0.0)
        for path in files:
            for name, read in variants.items():
                start = time.perf_counter()
                read(path)
                totals[name] += time.perf_counter() - start
        for name in variants:
            means[name].append(1e3 * totals[name] / len(files))
    ms = {name: statistics.median(values) for name, values in means.items()}
    size = sum(p.stat().st_size for p in files) / len(files) / 2**20
    print(
        f"{args.dataset} {args.kind}s: {len(files)} volumes, {size:.1f} MiB compressed on average, "
        f"{args.repeats} repeats; libdeflate {'present' if nifti._deflate else 'ABSENT'}"
    )
    for backend in ("sitk", "nibabel"):
        base = ms[f"{backend} unchecked"]
        print(
            f"{backend:8s} unchecked {base:6.1f} ms | checked {ms[f'{backend} checked']:6.1f} ms "
            f"(ratio {ms[f'{backend} checked'] / base:.2f}) | checked, zlib "
            f"{ms[f'{backend} checked, zlib']:6.1f} ms (ratio {ms[f'{backend} checked, zlib'] / base:.2f})"
        )


if __name__ == "__main__":
    main()
