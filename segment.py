"""Segment your own scans with a trained model (DIFD or another method of docs/methods.md), from one labelled
support scan.

Example (the shared CHAOST2 copy; liver and spleen of case 1 segmented in cases 2 and 3)::

    python segment.py --checkpoint runs/CHAOST2_setting1/fold0/snapshots/40000.pth \\
        --support-image ../shared/data/CHAOST2/chaos_MR_T2_normalized/image_1.nii.gz \\
        --support-label ../shared/data/CHAOST2/chaos_MR_T2_normalized/label_1.nii.gz --label 1 --label 4 \\
        --query ../shared/data/CHAOST2/chaos_MR_T2_normalized/image_2.nii.gz \\
                ../shared/data/CHAOST2/chaos_MR_T2_normalized/image_3.nii.gz --out seg_out

Scans: NIfTI (``.nii``, ``.nii.gz``), any 3-D file SimpleITK reads (``.nrrd``, ``.mha``, ...) or a DICOM
series folder (``--series UID`` picks one where a folder holds several; missing, duplicated or unevenly
spaced slices are refused). The support label: a label map on the support's grid or a voxel-aligned part
of it, or a 3D Slicer segmentation (``.seg.nrrd``; ``--label`` then names segments, or gives their
values). For each query ``Q`` it writes
``OUT/<Q>.nii.gz`` (the ``--label`` values, 0 elsewhere, on exactly the query's voxel grid),
``OUT/<Q>.seg.nrrd`` (the same map as a 3D Slicer segmentation: one named, coloured segment per organ),
for a DICOM query ``OUT/<Q>_seg.dcm`` (a DICOM SEG referencing the source series, for PACS viewers),
``OUT/<Q>_overlays/`` (axial PNGs per organ, radiological orientation) and, last, ``OUT/report.json``
(per query and organ: voxels, mL, slice range, support slices used; checkpoint path and SHA-256, preset,
timings); a run that stops early leaves no report.json. Every file is written under a temporary name and
renamed. Existing outputs are refused unless ``--overwrite``, except those of a run that did not finish
(killed, or stopped by a full disk): ``OUT/.segment-running.json`` marks a run in progress until its
report.json is written, and a rerun of the same command replaces what such a run left.

The work is done by :mod:`inference` (``inference.segment`` / ``inference.Segmenter`` take and return
SimpleITK images or arrays with geometry); this file only parses the command line and writes the files.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dataloaders import Volume
from inference.dicom import series_files, write_dicom_seg
from inference.outputs import palette_rgb, write_json, write_label_map, write_overlays
from inference.prediction import DEFAULT_BATCH_SIZE
from inference.presets import PRESETS
from inference.scans import (
    check_query,
    check_slice_axis,
    check_support,
    read_scan,
    read_support_label,
    scan_name,
)
from inference.segmentations import SEG_SUFFIX, write_seg_nrrd
from inference.segmenter import Segmenter
from models import load_plugins
from utils import pid_alive, remove_stale_temporaries, run_cli, timestamp

#: The marker of a run in progress in the output folder, removed once report.json is written: outputs
#: beside it are those of a run that was killed, which a rerun replaces without --overwrite.
RUNNING = ".segment-running.json"


def parse_range(text: str) -> tuple[int, int]:
    """``'Z0:Z1'`` → ``(Z0, Z1)``: slices ``Z0 .. Z1 - 1`` of the query's own slice axis."""
    try:
        z0, z1 = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected Z0:Z1 (two integers), got {text!r}") from None
    if not 0 <= z0 < z1:
        raise argparse.ArgumentTypeError(f"expected 0 <= Z0 < Z1, got {text!r}")
    return z0, z1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Segment organs in scans with a trained few-shot model, from one labelled support scan.",
    )
    parser.add_argument(
        "--checkpoint", required=True, type=Path, help="a snapshot of this project or an official state dict"
    )
    parser.add_argument(
        "--method",
        default=None,
        help="the method the checkpoint holds (default: the one a snapshot records, or the one whose "
        "network an official state dict is); a checkpoint of another method is refused",
    )
    parser.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="MODULE_OR_FILE",
        help="a module or .py file that registers a method of your own (docs/methods.md); repeatable",
    )
    parser.add_argument(
        "--support-image", required=True, type=Path, help="support scan (file or DICOM folder)"
    )
    parser.add_argument(
        "--support-label",
        required=True,
        type=Path,
        help="its label map (on its grid or a voxel-aligned part of it), or a 3D Slicer .seg.nrrd",
    )
    parser.add_argument(
        "--label",
        required=True,
        action="append",
        help="label value to segment, or a segment's name in a .seg.nrrd (repeat for more)",
    )
    parser.add_argument("--query", required=True, type=Path, nargs="+", help="scans to segment")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="preprocessing of the model's dataset (default: the dataset the checkpoint records)",
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    parser.add_argument(
        "--precision", choices=("fp32", "bf16"), default=None, help="default: bf16 on CUDA, fp32 elsewhere"
    )
    parser.add_argument(
        "--query-range",
        type=parse_range,
        nargs="+",
        default=None,
        metavar="Z0:Z1",
        help="known organ extent (slices Z0..Z1-1 of the query file), one for all queries or one per query; "
        "default: estimated from each query",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument(
        "--series",
        action="append",
        default=[],
        metavar="UID",
        help="DICOM series to read where a folder holds several",
    )
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="query slices per forward")
    parser.add_argument("--n-part", type=int, default=3, help="support slices per organ (the protocol's 3)")
    parser.add_argument(
        "--keep-orientation",
        action="store_true",
        help="take the arrays as stored in the training layout, ignoring direction matrices (files whose "
        "direction is wrong, e.g. the published SABS copies)",
    )
    return parser


@dataclass(frozen=True)
class QueryOutputs:
    """The files of one query ``Q`` in the output folder (module docstring)."""

    name: str
    label_map: Path
    segmentation: Path
    overlays: Path
    dicom_seg: Path | None

    def files(self) -> list[Path]:
        dicom = [self.dicom_seg] if self.dicom_seg else []
        return [self.label_map, self.segmentation, self.overlays, *dicom]


def output_paths(queries: Sequence[Path], out: Path) -> dict[Path, QueryOutputs]:
    """Per query its output files (a DICOM SEG for a DICOM folder only); two queries of one name are an
    error."""
    paths, seen = {}, {}
    for query in queries:
        name = scan_name(query)
        if name in seen:
            raise ValueError(
                f"queries {seen[name]} and {query} would both write {out / name}.nii.gz; rename one"
            )
        seen[name] = query
        paths[query] = QueryOutputs(
            name,
            out / f"{name}.nii.gz",
            out / f"{name}{SEG_SUFFIX}",
            out / f"{name}_overlays",
            out / f"{name}_seg.dcm" if query.is_dir() else None,
        )
    return paths


def main(argv: Sequence[str] | None = None) -> Path:
    """Run the command; returns the path of report.json. Bad input raises before anything is written."""
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    outputs = output_paths(args.query, args.out)
    report_path = args.out / "report.json"
    existing = [p for files in outputs.values() for p in files.files() if p.exists()]
    existing += [report_path] if report_path.exists() else []
    unfinished = None if args.overwrite else unfinished_run(args.out)
    if existing and not args.overwrite and unfinished is None:
        raise FileExistsError(
            f"outputs exist (pass --overwrite to replace them): {[str(p) for p in existing]}"
        )
    if unfinished is not None:
        print(f"{args.out}: replacing the outputs of a segment.py that did not finish ({unfinished})")
    ranges = args.query_range or [None]
    if len(ranges) not in (1, len(args.query)):
        raise ValueError(
            f"--query-range: give one range for all queries or one per query ({len(args.query)})"
        )
    ranges = ranges * len(args.query) if len(ranges) == 1 else ranges

    # Every input is read and checked before anything is written (the checks of the library itself).
    series = tuple(args.series)
    sources = (str(args.support_image), str(args.support_label))
    support_image = read_scan(args.support_image, series)
    support_label, labels = read_support_label(args.support_label, args.label, series)
    support_label = check_support(support_image, support_label, labels, sources)
    # Each query is read here to check it and again later to segment it, so that memory holds one at a time.
    directions = {}
    for query, query_range in zip(args.query, ranges, strict=True):
        scan = read_scan(query, series)
        check_query(scan, query_range, None, query)
        directions[query] = scan.geometry.direction

    clock = time.perf_counter()
    load_plugins(args.plugin)
    segmenter = Segmenter.from_checkpoint(
        args.checkpoint,
        preset=args.preset,
        method=args.method,
        device=args.device,
        precision=args.precision,
        batch_size=args.batch_size,
        n_part=args.n_part,
    )
    load_seconds = time.perf_counter() - clock
    for query, query_range in zip(args.query, ranges, strict=True):
        layout = segmenter.preset.layout(directions[query], not args.keep_orientation)
        check_slice_axis(query_range, layout, query)
    checkpoint_id = (args.checkpoint.name, segmenter.checkpoint.sha256)
    names = {v: support_label.names.get(v, f"label {v}") for v in labels}
    colours = {v: support_label.colours.get(v, palette_rgb(i)) for i, v in enumerate(labels)}
    support = segmenter.prepare_support(
        support_image, support_label, labels, reorient=not args.keep_orientation, sources=sources
    )
    args.out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(args.out)
    write_json({"pid": os.getpid(), "host": socket.gethostname(), "started": timestamp()}, args.out / RUNNING)
    report_path.unlink(missing_ok=True)  # a stale report must not describe this run's outputs
    report = {
        "checkpoint": segmenter.checkpoint.report(),
        "preset": segmenter.preset.name,
        "preset_source": "--preset" if args.preset else "checkpoint",
        "image_size": segmenter.image_size,
        "device": str(segmenter.device),
        "precision": segmenter.precision,
        "channels_last": segmenter.channels_last,
        "n_part": segmenter.n_part,
        "batch_size": segmenter.batch_size,
        "reorient": not args.keep_orientation,
        "support": {
            "image": str(args.support_image),
            "label": str(args.support_label),
            "organs": {
                str(value): {
                    "name": names[value],
                    "slices": organ.source_slices,
                    "labelled_slices": organ.n_labelled,
                }
                for value, organ in support.organs.items()
            },
        },
        "queries": {},
        "timings_s": {"load_model": load_seconds, "support": support.seconds},
    }
    for query, query_range in zip(args.query, ranges, strict=True):
        files = outputs[query]
        clock = time.perf_counter()
        scan = read_scan(query, series)
        read_seconds = time.perf_counter() - clock
        result = segmenter.segment_volume(support, scan, query_range, not args.keep_orientation, str(query))
        clock = time.perf_counter()
        label_map = Volume(result.label_map, result.geometry)
        write_label_map(label_map, files.label_map)
        write_seg_nrrd(label_map, labels, names, colours, files.segmentation)
        overlays = write_overlays(scan, label_map, labels, files.overlays)
        if files.dicom_seg is not None:
            sources = series_files(query, series)  # the order the scan was read in: slice k = file k
            write_dicom_seg(label_map, labels, names, sources, checkpoint_id, files.dicom_seg)
        else:
            print(f"{files.name}: not a DICOM series, so no DICOM SEG (NIfTI and .seg.nrrd written)")
        write_seconds = time.perf_counter() - clock
        name = files.name
        report["queries"][name] = {
            "input": str(query),
            "label_map": str(files.label_map),
            "segmentation": str(files.segmentation),
            "dicom_seg": None if files.dicom_seg is None else str(files.dicom_seg),
            "overlays": [str(files.overlays / f) for f in overlays],
            "shape_zyx": list(scan.shape),
            "spacing_xyz": list(scan.geometry.spacing),
            "voxel_ml": scan.voxel_ml,
            "query_range": None if query_range is None else list(query_range),
            "organs": {str(value): entry for value, entry in result.organs.items()},
            "timings_s": {"read": read_seconds, **result.timings, "write": write_seconds},
        }
        found = ", ".join(f"{v}: {e['volume_ml']:.1f} mL" for v, e in result.organs.items())
        print(f"{name}: {found} -> {files.label_map}, {files.segmentation.name}", flush=True)
    report["timings_s"]["total"] = time.perf_counter() - started
    write_json(report, report_path)
    (args.out / RUNNING).unlink()
    print(f"report: {report_path}", flush=True)
    return report_path


def unfinished_run(out: Path) -> str | None:
    """How the segment.py that left :data:`RUNNING` in ``out`` and did not finish is described, or None
    when there is no such marker; a live one on this machine is an error (two runs, one folder)."""
    try:
        marker = json.loads((out / RUNNING).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        message = f"{out / RUNNING}: unreadable ({err}); delete it if no segment.py writes {out}"
        raise ValueError(message) from err
    said = f"pid {marker.get('pid')} on {marker.get('host')}, started {marker.get('started')}"
    if marker.get("host") != socket.gethostname():
        raise FileExistsError(
            f"{out} is being written by a segment.py on another machine ({said}), or was left by one that "
            f"did not finish: pass --overwrite to replace its outputs"
        )
    if marker.get("pid") != os.getpid() and pid_alive(int(marker.get("pid", 0))):
        raise FileExistsError(f"{out} is being written by another segment.py ({said})")
    return said


if __name__ == "__main__":
    run_cli(main, "segment.py")
