"""Benchmarks of ``segment.py`` (the inference package): speed, support placement, geometry round trip.

Usage (from the repository root)::

    python -m benchmarks.segment speed [--checkpoint CKPT] [--repeats 2] [--threads 2]
    python -m benchmarks.segment placement --checkpoint CKPT [--fold 0] [--supp-idx 0] [--labels 1 2 3 4]
    python -m benchmarks.segment roundtrip --checkpoint CKPT [--cases 2 3]
    python -m benchmarks.segment extents --checkpoint CKPT [--cases 10 13 15 19 20 21 22 31]

``speed``: seconds per query volume of 256 x 256 x 36 (CHAOST2 case 3; support case 1, liver) at the native
256 px, on the chosen device, for ``test.py``'s per-volume path
(``engine.evaluation.predict_query_volume``: each of the 3 chunks in one forward with its support slice,
supports re-encoded with every chunk) over all 36
slices, and for the inference path over the same 36 slices (``query_range=(0, 36)``: preprocessing, one
encoding per slice in batches, the head per chunk against the supports encoded once, probabilities back to
the query grid) and with its default GT-free placement (a first pass over every slice, then the other
chunks). The once-per-run support encoding is printed apart. Both paths start from the volume in memory
(file reading excluded). Medians of ``--repeats`` interleaved runs; the ratios come from one run.
ResNet-101 with random weights unless ``--checkpoint`` (only the estimated extent, hence the GT-free
work, depends on the weights).

``placement``: per query volume of the fold, Dice of the GT-free default against the protocol's
ground-truth placement, for each class; the model, the support volume (the fold's ``supp_idx``-th) and its
slices are the same. Columns: ``test.py`` (the protocol path itself: ``TestDataset`` and
``predict_query_volume``, Dice over the labelled slices, which is the whole volume's since the prediction is
0 elsewhere); ``given`` (the inference path with the ground truth's slice extent as ``query_range``: the
protocol's placement through the inference pipeline, whole volume); ``GT-free`` (whole volume, so false
positives outside the organ's slices count); ``GT-free lab.`` (the same prediction on the labelled slices
only, which isolates the placement from the extent estimate).

``extents``: how well two GT-free extent rules find each class's slices in CHAOST2 volumes (default: 8
*training* volumes of fold 0, where a rule may be chosen without looking at the test volumes), support case
1: ``window`` (the default, :func:`inference.prediction.estimate_extent`: the support organ's length in mm,
placed where the first pass holds the most foreground probability) and ``run`` (the longest run of slices
whose first-pass area reaches 10 % of the smallest support mask, one missing slice bridged). Printed: the
mean intersection-over-union of each rule's ``[first, last]`` slices with the ground truth's.

``roundtrip``: each query volume against a copy of itself on another grid (``tests/segment_fixtures.py``:
axes swapped and reversed, 1.1 mm in-plane, 20 mm cut from each side): Dice of the two label maps after
resampling the copy's onto the original's grid (nearest), over the copy's field of view.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from dataloaders import TestDataset, chunk_bounds, get_dataset_info, list_cases, normalize_volume, read_case
from engine.evaluation import predict_query_volume
from engine.metrics import dice_iou
from engine.snapshots import latest_snapshot
from inference.frames import to_model_frame
from inference.prediction import PRESENCE_FRACTION, estimate_extent
from inference.segmenter import Segmenter
from models import build_difd, load_difd
from tests.segment_fixtures import copy_on_other_grid
from utils import resolve_data_root

SPEED_SUPPORT_CASE, SPEED_QUERY_CASE, SPEED_LABEL = 1, 3, 1


def _case(info, root: Path, case_id: int):
    cases = {case.case_id: case for case in list_cases(info, root)}
    return read_case(cases[case_id], info)


def _dice(pred: np.ndarray, truth: np.ndarray) -> float:
    return dice_iou(pred.astype(np.uint8), truth.astype(np.uint8))[0]


def speed(args: argparse.Namespace) -> None:
    root = resolve_data_root(args.data_root)
    info = get_dataset_info("CHAOST2")
    torch.manual_seed(0)
    if args.checkpoint is not None:  # any DIFD weights (a 64-px snapshot runs at 256 px as well)
        model, _ = load_difd(args.checkpoint)
    else:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*randomly initialised.*")
            model = build_difd()
    # native 256 px whatever size the weights were trained at
    segmenter = Segmenter(
        model, "chaos_mr", None, args.device, precision=args.precision, batch_size=args.batch_size
    )
    device = segmenter.device
    support_case, query_case = _case(info, root, SPEED_SUPPORT_CASE), _case(info, root, SPEED_QUERY_CASE)
    query = query_case.image
    depth = query.shape[0]

    # test.py's inputs: TestDataset's support (fold 0, supp_idx 0 = case 1) and the query's 36 slices
    support = TestDataset(info, root, 0, SPEED_LABEL, supp_idx=0, n_part=3, image_size=None).support()
    assert support["case_id"] == SPEED_SUPPORT_CASE
    image = normalize_volume(query.array)
    protocol_query = {
        "imgs": torch.from_numpy(np.repeat(image[:, None], 3, axis=1).astype(np.float32)),
        "labels": torch.zeros(query.shape, dtype=torch.int64),
        "chunks": chunk_bounds(depth, 3),
        "chunk_support": [0, 1, 2],
    }
    clock = time.perf_counter()
    prepared = segmenter.prepare_support(support_case.image, support_case.label, [SPEED_LABEL])
    support_seconds = time.perf_counter() - clock

    times: dict[str, list[float]] = {"test.py path": [], "segment, given range": [], "segment, GT-free": []}
    extent = None
    for repeat in range(args.repeats + args.warmup):
        runs = {
            "test.py path": lambda: predict_query_volume(
                segmenter.model, support, protocol_query, device, segmenter.precision
            ),
            "segment, given range": lambda: segmenter.segment_volume(prepared, query, (0, depth)),
            "segment, GT-free": lambda: segmenter.segment_volume(prepared, query),
        }
        for name, run in runs.items():
            clock = time.perf_counter()
            result = run()
            if repeat >= args.warmup:
                times[name].append(time.perf_counter() - clock)
            if name == "segment, GT-free":
                extent = result.organs[SPEED_LABEL]["extent"]
    base = statistics.median(times["test.py path"])
    print(
        f"device {device}, {torch.get_num_threads()} threads, precision {segmenter.precision}, "
        f"channels_last {segmenter.channels_last}, batch {segmenter.batch_size}; query CHAOST2 case "
        f"{SPEED_QUERY_CASE} {query.shape[::-1]} (x, y, z), support case {SPEED_SUPPORT_CASE}, label "
        f"{SPEED_LABEL}; weights: {args.checkpoint or 'random'}; medians of {args.repeats} runs"
    )
    print(f"support encoding (once per run, 3 slices): {support_seconds:.2f} s")
    print(f"{'path':<24} {'s / volume':>11} {'vs test.py':>11}  runs")
    for name, values in times.items():
        runs = " ".join(f"{v:.1f}" for v in values)
        print(
            f"{name:<24} {statistics.median(values):11.2f} {base / statistics.median(values):10.2f}x  {runs}"
        )
    print(f"GT-free estimated extent: slices {extent} of 0..{depth - 1}")


def placement(args: argparse.Namespace) -> None:
    root = resolve_data_root(args.data_root)
    segmenter = Segmenter.from_checkpoint(args.checkpoint, device=args.device, batch_size=args.batch_size)
    config = segmenter.checkpoint.config or {}
    info = get_dataset_info(config.get("dataset", "CHAOST2"))
    supp_idx = config.get("supp_idx", 0) if args.supp_idx is None else args.supp_idx
    labels = args.labels or list(info.test_labels)
    print(
        f"checkpoint {args.checkpoint} (step {segmenter.checkpoint.step}, image_size "
        f"{segmenter.image_size}); {info.name} fold {args.fold}, supp_idx {supp_idx}; Dice in %"
    )
    print(
        "| class | query case | labelled slices | GT-free extent | test.py | given | GT-free | GT-free lab. |"
    )
    print("|---|---|---|---|---|---|---|---|")
    means: dict[str, list[float]] = {}
    for label in labels:
        name = info.class_name(label)
        protocol = TestDataset(info, root, args.fold, label, supp_idx, 3, segmenter.image_size)
        support = protocol.support()
        cases = {case.case_id: case for case in list_cases(info, root)}
        support_case = read_case(cases[support["case_id"]], info)
        prepared = segmenter.prepare_support(support_case.image, support_case.label, [label])
        if prepared.organs[label].slices != support["slice_indices"].tolist():
            raise RuntimeError(
                f"{name}: the inference path chose support slices {prepared.organs[label].slices}, the "
                f"protocol {support['slice_indices'].tolist()}: the comparison would not be fair"
            )
        for query in protocol:
            case = read_case(cases[query["case_id"]], info)
            truth = case.label.array == label
            labelled = np.flatnonzero(truth.any(axis=(1, 2)))
            if labelled.size == 0:
                continue
            protocol_dice = _dice(
                predict_query_volume(segmenter.model, support, query, segmenter.device).numpy(),
                query["labels"].numpy(),
            )
            volume = case.image
            given = segmenter.segment_volume(prepared, volume, (int(labelled[0]), int(labelled[-1]) + 1))
            free = segmenter.segment_volume(prepared, volume)
            row = {
                "test.py": protocol_dice,
                "given": _dice(given.label_map == label, truth),
                "GT-free": _dice(free.label_map == label, truth),
                "GT-free lab.": _dice(free.label_map[labelled] == label, truth[labelled]),
            }
            for key, value in row.items():
                means.setdefault(f"{name} {key}", []).append(value)
            cells = " | ".join(f"{100 * v:.1f}" for v in row.values())
            extent = free.organs[label]["extent"]
            print(f"| {name} | {case.case_id} | {labelled[0]}-{labelled[-1]} | {extent} | {cells} |")
    for label in labels:
        name = info.class_name(label)
        cells = " | ".join(
            f"{100 * statistics.mean(means[f'{name} {k}']):.1f}"
            for k in ("test.py", "given", "GT-free", "GT-free lab.")
        )
        print(f"| {name} | mean | | | {cells} |")


def _run_extent(areas: np.ndarray, min_pixels: float) -> tuple[int, int] | None:
    """The alternative rule: the longest run of slices with ``areas >= min_pixels`` (gaps of one bridged)."""
    present = np.flatnonzero(areas >= min_pixels)
    if present.size == 0:
        return None
    breaks = np.flatnonzero(np.diff(present) > 2)
    starts = np.concatenate([[present[0]], present[breaks + 1]])
    ends = np.concatenate([present[breaks], [present[-1]]]) + 1
    best = int(np.argmax(ends - starts))
    return int(starts[best]), int(ends[best])


def _aligned_extent(soft: np.ndarray, length: int) -> tuple[int, int]:
    """The window of ``length`` slices whose 3 chunks hold the most probability from their own support slice:
    ``soft (3, Z)`` per-slice probability sums of the passes with support slices 0, 1, 2."""
    depth = soft.shape[1]
    length = max(1, min(length, depth))
    running = np.concatenate([np.zeros((3, 1)), np.cumsum(soft, axis=1)], axis=1)
    totals = [
        sum(running[k, a + e] - running[k, a + b] for k, (b, e) in enumerate(chunk_bounds(length, 3)))
        for a in range(depth - length + 1)
    ]
    start = int(np.argmax(totals))
    return start, start + length


def _slice_iou(extent: tuple[int, int] | None, truth: np.ndarray) -> float:
    """IoU of ``[start, end)`` with the ground truth's ``[first, last + 1)``; 0 for no extent."""
    if extent is None:
        return 0.0
    first, last = int(truth[0]), int(truth[-1]) + 1
    inter = max(0, min(extent[1], last) - max(extent[0], first))
    return inter / (max(extent[1], last) - min(extent[0], first))


def extents(args: argparse.Namespace) -> None:
    root = resolve_data_root(args.data_root)
    segmenter = Segmenter.from_checkpoint(args.checkpoint, device=args.device, batch_size=args.batch_size)
    info = get_dataset_info("CHAOST2")
    cases = {case.case_id: case for case in list_cases(info, root)}
    support_case = read_case(cases[1], info)
    labels = list(info.test_labels)
    prepared = segmenter.prepare_support(support_case.image, support_case.label, labels)
    scores: dict[str, dict[int, list[float]]] = {"window": {}, "run": {}, "aligned": {}}
    for case_id in args.cases:
        case = read_case(cases[case_id], info)
        volume = case.image
        layout = segmenter.preset.layout(volume.geometry.direction)
        frame = to_model_frame(volume, segmenter.preset, segmenter.image_size, layout)
        feats, thresholds = segmenter.runner.encode_slices(frame.slices)
        for label in labels:
            truth = np.flatnonzero((case.label.array == label).any(axis=(1, 2)))
            organ = prepared.organs[label]
            passes = [segmenter.runner.predict(organ.encoded.episode(k), feats, thresholds) for k in range(3)]
            first_pass = passes[segmenter.n_part // 2]
            length = round(organ.length_mm / frame.geometry.spacing[2])
            window = estimate_extent(first_pass.sum(axis=(1, 2)), length)
            run = _run_extent((first_pass > 0.5).sum(axis=(1, 2)), PRESENCE_FRACTION * organ.min_area)
            soft = np.stack([p.sum(axis=(1, 2)) for p in passes])  # (3, Z)
            aligned = _aligned_extent(soft, length)
            for rule, extent in (("window", window), ("run", run), ("aligned", aligned)):
                scores[rule].setdefault(label, []).append(_slice_iou(extent, truth))
    print(
        f"checkpoint {args.checkpoint} (step {segmenter.checkpoint.step}); support CHAOST2 case 1; "
        f"query cases {args.cases}; mean slice-extent IoU with the ground truth"
    )
    for rule, per_label in scores.items():
        cells = ", ".join(
            f"{info.class_name(label)} {statistics.mean(v):.2f}" for label, v in per_label.items()
        )
        print(f"{rule:<7} {cells}")


def roundtrip(args: argparse.Namespace) -> None:
    root = resolve_data_root(args.data_root)
    segmenter = Segmenter.from_checkpoint(args.checkpoint, device=args.device, batch_size=args.batch_size)
    folder = root / "CHAOST2" / get_dataset_info("CHAOST2").image_folder
    support = (sitk.ReadImage(str(folder / "image_1.nii.gz")), sitk.ReadImage(str(folder / "label_1.nii.gz")))
    print(
        f"checkpoint {args.checkpoint} (step {segmenter.checkpoint.step}); support case 1, "
        f"labels {args.labels}"
    )
    for case in args.cases:
        query = sitk.ReadImage(str(folder / f"image_{case}.nii.gz"))
        copy = copy_on_other_grid(query, 1.1, 20.0)
        (original, _), (moved, _) = segmenter.segment(*support, args.labels, [query, copy])
        back = sitk.GetArrayFromImage(
            sitk.Resample(moved, original, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        )
        field = sitk.GetArrayFromImage(
            sitk.Resample(moved * 0 + 1, original, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        ).astype(bool)
        reference = sitk.GetArrayFromImage(original)
        cells = []
        for label in args.labels:
            cells.append(
                f"label {label}: Dice {100 * _dice(back == label, (reference == label) & field):.1f} % "
                f"({int(np.count_nonzero((reference == label) & field))} vs "
                f"{int(np.count_nonzero(back == label))} voxels)"
            )
        print(f"case {case}: copy {copy.GetSize()} at {copy.GetSpacing()[0]} mm; " + "; ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, function in (
        ("speed", speed),
        ("placement", placement),
        ("roundtrip", roundtrip),
        ("extents", extents),
    ):
        command = sub.add_parser(name)
        command.set_defaults(function=function)
        command.add_argument("--checkpoint", type=Path, default=None, required=name != "speed")
        command.add_argument("--device", default="cpu")
        command.add_argument("--data-root", default=None)
        command.add_argument("--batch-size", type=int, default=8)
        command.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    sub.choices["speed"].add_argument("--repeats", type=int, default=2)
    sub.choices["speed"].add_argument("--warmup", type=int, default=0)
    sub.choices["speed"].add_argument("--precision", choices=("fp32", "bf16"), default=None)
    sub.choices["placement"].add_argument("--fold", type=int, default=0)
    sub.choices["placement"].add_argument("--supp-idx", type=int, default=None)
    sub.choices["placement"].add_argument("--labels", type=int, nargs="+", default=None)
    sub.choices["roundtrip"].add_argument("--cases", type=int, nargs="+", default=[2, 3])
    sub.choices["roundtrip"].add_argument("--labels", type=int, nargs="+", default=[1])
    sub.choices["extents"].add_argument(
        "--cases", type=int, nargs="+", default=[10, 13, 15, 19, 20, 21, 22, 31]
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.checkpoint is not None and args.checkpoint.is_dir():
        args.checkpoint = latest_snapshot(args.checkpoint)
    args.function(args)


if __name__ == "__main__":
    main()
