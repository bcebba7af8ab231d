"""Regenerate supervoxels in memory and compare them with the published files, voxel for voxel.

One line per case, then a summary; the exit status is 1 when any case differs. A differing case reports
the number of differing voxels and the adjusted Rand index (ARI) of the two partitions (1.0 = same
partition with other label values). Run from the repository root::

    python -m data.supervoxels.compare_published --dataset CMR --data-root ../shared/data \
        [--ids 4 13] [--jobs 2]

By default the published files are read from ``<root>/<DATASET>/supervoxels_<n_sv>``; ``--published``
names another folder.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.supervoxels.generate_supervoxels import (
    build_parser,
    check_options,
    compute_supervoxels,
    run_cases,
    select_cases,
)
from dataloaders import read_volume
from utils import run_cli


def adjusted_rand_index(labels_a: np.ndarray, labels_b: np.ndarray) -> float:
    """Adjusted Rand index (Hubert and Arabie) of two labelings of the same voxels. Shapes must agree."""
    if labels_a.shape != labels_b.shape:
        raise ValueError(f"labelings differ in shape: {labels_a.shape} vs {labels_b.shape}")
    _, a = np.unique(labels_a.ravel(), return_inverse=True)
    _, b = np.unique(labels_b.ravel(), return_inverse=True)
    _, pair_counts = np.unique(a.astype(np.int64) * (b.max() + 1) + b, return_counts=True)

    def pairs(counts: np.ndarray) -> float:
        counts = counts.astype(np.float64)
        return float(np.sum(counts * (counts - 1) / 2))

    index = pairs(pair_counts)
    rows, cols = pairs(np.bincount(a)), pairs(np.bincount(b))
    total = a.size * (a.size - 1) / 2
    expected = rows * cols / total if total else 0.0
    maximum = (rows + cols) / 2
    if maximum == expected:  # both labelings are a single segment or all singletons
        return 1.0
    return (index - expected) / (maximum - expected)


@dataclass(frozen=True)
class Comparison:
    case_id: int
    identical: bool
    n_differing: int
    ari: float
    n_labels: int
    n_labels_published: int
    seconds: float

    def line(self, dataset: str) -> str:
        head = f"{dataset} case {self.case_id}: "
        timing = f"({self.seconds:.1f} s)"
        if self.identical:
            return head + f"identical, {self.n_labels} labels incl. 0 {timing}"
        return head + (
            f"DIFFERS: {self.n_differing} voxels, ARI {self.ari:.6f}, "
            f"{self.n_labels} labels vs {self.n_labels_published} published {timing}"
        )


def compare_case(case_id: int, image_path: Path, published_path: Path, n_sv: int) -> Comparison:
    """Regenerate one case and compare it with its published supervoxel file."""
    published, _ = read_volume(published_path)
    start = time.perf_counter()
    labels, _ = compute_supervoxels(image_path, n_sv)
    seconds = time.perf_counter() - start
    if labels.shape != published.shape:
        raise ValueError(f"{published_path}: shape {published.shape} differs from its image's {labels.shape}")
    identical = bool(np.array_equal(labels, published))
    return Comparison(
        case_id=case_id,
        identical=identical,
        n_differing=int(np.count_nonzero(labels != published)),
        ari=1.0 if identical else adjusted_rand_index(labels, published),
        n_labels=int(len(np.unique(labels))),
        n_labels_published=int(len(np.unique(published))),
        seconds=seconds,
    )


def compare(
    dataset: str,
    data_root: str | os.PathLike,
    ids: Sequence[int] | None = None,
    n_sv: int | None = None,
    published: str | os.PathLike | None = None,
    jobs: int = 1,
) -> list[Comparison]:
    """Compare the selected cases with the published supervoxels; one :class:`Comparison` per case."""
    info = check_options(dataset, data_root, n_sv, jobs)
    n_sv = info.n_sv if n_sv is None else int(n_sv)
    default_folder = Path(data_root) / info.name / info.supervoxel_folder(n_sv)
    folder = default_folder if published is None else Path(published)
    if not folder.is_dir():
        option = "--published" if published is not None else "--n-sv (published folder)"
        raise FileNotFoundError(f"{option}: {info.name} supervoxel folder not found: {folder}")
    tasks = []
    for case_id, image_path in select_cases(info, data_root, ids).items():
        published_path = folder / info.supervoxel_pattern.format(id=case_id)
        if not published_path.is_file():
            raise FileNotFoundError(
                f"{info.name}: no published supervoxels for case {case_id}: {published_path}"
            )
        tasks.append((case_id, image_path, published_path, n_sv))
    return run_cases(compare_case, tasks, jobs)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(__doc__.splitlines()[0])
    parser.add_argument("--published", type=Path, default=None,
                        help="folder of the published files (default: <root>/<DATASET>/supervoxels_<n_sv>)")
    args = parser.parse_args(argv)
    try:
        results = compare(args.dataset, args.data_root, args.ids, args.n_sv, args.published, args.jobs)
    except (ValueError, OSError) as err:
        parser.error(str(err))
    for result in results:
        print(result.line(args.dataset))
    n_same = sum(r.identical for r in results)
    seconds = [r.seconds for r in results]
    print(
        f"{args.dataset}: {n_same}/{len(results)} cases identical to the published supervoxels; "
        f"min ARI {min(r.ari for r in results):.6f}; "
        f"{np.mean(seconds):.1f} s per volume (max {max(seconds):.1f} s, {args.jobs} job(s))"
    )
    return 0 if n_same == len(results) else 1


if __name__ == "__main__":
    run_cli(main, "compare_published.py")
