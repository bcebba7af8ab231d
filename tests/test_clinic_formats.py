"""segment.py's clinic formats (issue 26) on real CHAOST2 volumes: 3D Slicer segmentations (``.seg.nrrd``,
written and read back with ``slicerio``) as the support and as an output, DICOM series in and DICOM SEG out.

The command runs end to end with the nearest-prototype DIFD of ``tests/test_segment.py`` (tiny encoder,
64 px) injected in place of the checkpoint's network, on 6-slice queries, so that the files and their
geometry are what is tested and the run stays short.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import slicerio
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

import segment
from dataloaders import Geometry, Volume
from inference.scans import check_support, read_scan, read_support_label
from inference.segmentations import read_seg_nrrd
from inference.segmenter import CheckpointInfo, Segmenter
from tests.test_segment import CHAOS, dice, matching_difd

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LIVER, SPLEEN = 1, 4


@pytest.fixture(scope="module")
def chaos(data_root: Path) -> Path:
    return data_root / CHAOS


@pytest.fixture(scope="module")
def support(chaos) -> tuple[Volume, Volume]:
    return read_scan(chaos / "image_1.nii.gz"), read_scan(chaos / "label_1.nii.gz", constant_ok=True)


def ijk_to_lps(geometry: Geometry, corner_zyx=(0, 0, 0)) -> np.ndarray:
    """The 4 x 4 voxel (i, j, k) -> LPS matrix of a grid, its origin moved to voxel ``corner`` (z, y, x)."""
    matrix = np.eye(4)
    matrix[:3, :3] = np.reshape(geometry.direction, (3, 3)) * np.asarray(geometry.spacing)
    matrix[:3, 3] = geometry.origin
    matrix[:3, 3] = (matrix @ np.array([*corner_zyx[::-1], 1.0]))[:3]
    return matrix


def write_slicer_segmentation(
    path: Path, geometry: Geometry, segments: dict[str, np.ndarray], crop: bool = True
) -> Path:
    """A ``.seg.nrrd`` as 3D Slicer saves one, through slicerio: ``segments`` (name -> (Z, H, W) mask on
    the grid of ``geometry``) added in order (an overlapping one goes to a new layer), the array cropped to
    the segments' bounding box (Slicer's default) unless ``crop`` is False."""
    union = np.logical_or.reduce(list(segments.values()))
    if crop:
        nonzero = np.nonzero(union)
        box = tuple(slice(int(a.min()), int(a.max()) + 1) for a in nonzero)
    else:
        box = tuple(slice(0, n) for n in union.shape)
    corner = tuple(b.start for b in box)
    shape = tuple(b.stop - b.start for b in box)
    segmentation = slicerio.create_segmentation(shape[::-1], ijk_to_lps(geometry, corner))
    colours = ([0.85, 0.4, 0.3], [0.3, 0.6, 0.9], [0.9, 0.8, 0.2])
    for (name, mask), colour in zip(segments.items(), colours, strict=False):
        slicerio.add_segment(segmentation, mask[box].transpose(2, 1, 0), {"name": name, "color": colour})
    slicerio.write_segmentation(str(path), segmentation)
    return path


# ------------------------------------------------------------------------------------ support label
def test_cropped_layered_segmentation_lands_on_the_image_grid(tmp_path, support):
    image, label = support
    liver, spleen = label.array == LIVER, label.array == SPLEEN
    both = liver | spleen
    path = write_slicer_segmentation(
        tmp_path / "s.seg.nrrd", image.geometry, {"Liver": liver, "Liver and spleen": both}
    )
    stored = slicerio.read_segmentation(str(path))
    assert stored["voxels"].ndim == 4 and stored["voxels"].shape[1:] != image.shape[::-1]  # layered, cropped
    chosen, values = read_support_label(path, ["Liver and spleen", "Liver"])
    assert values == [1, 2]  # both segments hold value 1 (one per layer): numbered in the order asked
    placed = check_support(image, chosen, values, (str(image), str(path)))
    np.testing.assert_array_equal(placed.mask(1), both)
    np.testing.assert_array_equal(placed.mask(2), liver)
    assert placed.names == {1: "Liver and spleen", 2: "Liver"}

    single = write_slicer_segmentation(tmp_path / "l.seg.nrrd", image.geometry, {"Liver": liver, "S": spleen})
    chosen, values = read_support_label(single, ["2", "Liver"])  # by value and by name
    assert values == [2, 1]
    placed = check_support(image, chosen, values, ("image", "label"))
    np.testing.assert_array_equal(placed.mask(2), spleen)
    np.testing.assert_array_equal(placed.mask(1), liver)


def test_a_label_map_on_a_sub_grid_is_placed_exactly(tmp_path, support):
    image, label = support
    corner = (3, 40, 52)
    part = label.array[3:20, 40:200, 52:230]
    origin = tuple(ijk_to_lps(label.geometry, corner)[:3, 3])
    cropped = Volume(part, Geometry(label.geometry.spacing, origin, label.geometry.direction))
    placed = check_support(image, cropped, [LIVER], ("image", "label"))
    expected = np.zeros_like(label.array)
    expected[3:20, 40:200, 52:230] = part
    np.testing.assert_array_equal(placed.mask(LIVER), expected == LIVER)

    half_voxel = (
        np.asarray(origin)
        + 0.5 * np.asarray(label.geometry.spacing) * np.reshape(label.geometry.direction, (3, 3))[:, 0]
    )
    off = Volume(part, Geometry(label.geometry.spacing, tuple(half_voxel), label.geometry.direction))
    with pytest.raises(ValueError, match=r"different grids: image has shape .*; label has shape \(Z,H,W\)="
                       r"\(17, 160, 178\).*is not on the image's voxel lattice"):  # fmt: skip
        check_support(image, off, [LIVER], ("image", "label"))


def test_unknown_segments_list_what_the_file_holds(tmp_path, support):
    image, label = support
    path = write_slicer_segmentation(
        tmp_path / "s.seg.nrrd", image.geometry, {"Liver": label.array == LIVER, "Big": label.array > 0}
    )
    with pytest.raises(
        ValueError, match=r"--label 'Kidney' names no segment; the file holds 'Liver' \(value 1, layer 0\); "
        r"'Big' \(value 1, layer 1\)"
    ):  # fmt: skip
        read_seg_nrrd(path, ["Kidney"])
    with pytest.raises(ValueError, match=r"--label '1' matches 2 segments \(give its name\)"):
        read_seg_nrrd(path, ["1"])
    with pytest.raises(ValueError, match=r"segment names need a Slicer segmentation"):
        read_support_label(tmp_path / "label.nii.gz", ["Liver"])


# --------------------------------------------------------------------------------------- the command
@pytest.fixture(scope="module")
def matching_segmenter() -> Segmenter:
    return Segmenter(matching_difd(), "chaos_mr", image_size=64, device="cpu")


@pytest.fixture
def command(monkeypatch, tmp_path, matching_segmenter):
    """``segment.main`` with the matching model injected for any checkpoint (module docstring)."""
    checkpoint = tmp_path / "matching.pth"
    checkpoint.write_bytes(b"the injected model's stand-in")
    info = CheckpointInfo(checkpoint, "0" * 64, {"dataset": "CHAOST2", "image_size": 64}, 5, "difd", {})
    matching_segmenter.checkpoint = info
    monkeypatch.setattr(Segmenter, "from_checkpoint", classmethod(lambda cls, *a, **k: matching_segmenter))
    return lambda *argv: segment.main(["--checkpoint", str(checkpoint), *argv])


@pytest.fixture(scope="module")
def query(tmp_path_factory, chaos) -> Path:
    """Slices 10..15 of case 2 (``case2.nii.gz``), with their ground truth (``label2.nii.gz``)."""
    path = tmp_path_factory.mktemp("query") / "case2.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(chaos / "image_2.nii.gz"))[:, :, 10:16], str(path))
    sitk.WriteImage(
        sitk.ReadImage(str(chaos / "label_2.nii.gz"))[:, :, 10:16], str(path.parent / "label2.nii.gz")
    )
    return path


def assert_segmentation_file(
    path: Path, query: Path, label_map: np.ndarray, names: dict[int, str]
) -> dict[int, list[float]]:
    """The ``.seg.nrrd`` segment.py wrote, read back with slicerio: on the query's grid, one segment per
    organ with its name whose mask is the NIfTI's. Returns the colours by label value."""
    segmentation = slicerio.read_segmentation(str(path))
    grid = read_scan(query)
    np.testing.assert_allclose(segmentation["ijkToLPS"], ijk_to_lps(grid.geometry), atol=1e-5)
    assert segmentation["voxels"].shape == grid.shape[::-1]
    segments = segmentation["segments"]
    assert {s["labelValue"]: s["name"] for s in segments} == names
    for value, name in names.items():
        mask = slicerio.segment_mask(segmentation, name).transpose(2, 1, 0)
        np.testing.assert_array_equal(mask, label_map == value)
    return {s["labelValue"]: s["color"] for s in segments}


def _run(command, chaos, support_label, labels, query, out) -> np.ndarray:
    argv = ["--support-image", str(chaos / "image_1.nii.gz"), "--support-label", str(support_label)]
    command(*argv, *[a for v in labels for a in ("--label", v)], "--query", str(query), "--out", str(out))
    return sitk.GetArrayFromImage(sitk.ReadImage(str(out / "case2.nii.gz")))


def test_cropped_segmentation_support_gives_the_full_grid_result(tmp_path, chaos, support, command, query):
    image, label = support
    liver, spleen = label.array == LIVER, label.array == SPLEEN
    named = write_slicer_segmentation(
        tmp_path / "named.seg.nrrd", image.geometry, {"Liver": liver, "Sp": spleen}
    )
    reference = _run(command, chaos, chaos / "label_1.nii.gz", ["1", "4"], query, tmp_path / "a")
    assert (reference == LIVER).any() and (reference == SPLEEN).any()
    # the Slicer file stores the spleen as value 2 of layer 0: asked by name, it keeps that value
    got = _run(command, chaos, named, ["Liver", "Sp"], query, tmp_path / "b")
    np.testing.assert_array_equal(got, np.where(reference == SPLEEN, 2, reference))
    assert_segmentation_file(
        tmp_path / "a" / "case2.seg.nrrd", query, reference, {1: "label 1", 4: "label 4"}
    )
    colours = assert_segmentation_file(tmp_path / "b" / "case2.seg.nrrd", query, got, {1: "Liver", 2: "Sp"})
    assert colours == {1: [0.85, 0.4, 0.3], 2: [0.3, 0.6, 0.9]}  # the support's colours

    segments = {"Liver": liver, "Liver and spleen": liver | spleen}  # overlapping: two layers
    cropped = write_slicer_segmentation(tmp_path / "layers.seg.nrrd", image.geometry, segments)
    full = write_slicer_segmentation(tmp_path / "full.seg.nrrd", image.geometry, segments, crop=False)
    from_cropped = _run(command, chaos, cropped, ["Liver", "Liver and spleen"], query, tmp_path / "c")
    from_full = _run(command, chaos, full, ["Liver", "Liver and spleen"], query, tmp_path / "d")
    np.testing.assert_array_equal(from_cropped, from_full)
    assert set(np.unique(from_cropped)) == {0, 1, 2}


# -------------------------------------------------------------------------------------------- DICOM
STUDY_UID, SERIES_UID, FRAME_UID = (f"1.2.826.0.1.3680043.9.7.26.{k}" for k in (1, 2, 3))


def write_mr_series(volume: Volume, folder: Path, order=None, skip=(), moved=None) -> list[Path]:
    """An MR series as a scanner exports one (pydicom; patient, study, series, frame of reference and
    MR image attributes), one file per slice ``k`` of an int16 ``volume`` at its physical position; file
    names and instance numbers follow ``order`` (default: the volume's), slices in ``skip`` are left out
    and ``moved = (k, mm)`` shifts one slice along the normal. Returns the files by slice."""
    folder.mkdir(parents=True)
    image = volume.to_sitk()
    direction = np.reshape(volume.geometry.direction, (3, 3))
    normal = np.cross(direction[:, 0], direction[:, 1])
    order = list(range(volume.shape[0])) if order is None else order
    paths = []
    for rank, k in enumerate(order):
        position = np.asarray(image.TransformIndexToPhysicalPoint((0, 0, k)))
        if moved is not None and moved[0] == k:
            position = position + moved[1] * normal
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID = MRImageStorage, ExplicitVRLittleEndian
        meta.MediaStorageSOPInstanceUID = f"{SERIES_UID}.{k + 1}"
        ds = pydicom.Dataset()
        ds.file_meta = meta
        attributes = {
            "SOPClassUID": MRImageStorage, "SOPInstanceUID": f"{SERIES_UID}.{k + 1}",
            "PatientName": "Clinic^Test", "PatientID": "CHAOST2-2", "PatientBirthDate": "19700101",
            "PatientSex": "O", "StudyInstanceUID": STUDY_UID, "StudyDate": "20260101", "StudyTime": "120000",
            "StudyID": "26", "AccessionNumber": "A26", "ReferringPhysicianName": "", "Modality": "MR",
            "SeriesInstanceUID": SERIES_UID, "SeriesNumber": 3, "SeriesDescription": "T2 SPIR",
            "FrameOfReferenceUID": FRAME_UID, "PositionReferenceIndicator": "", "Manufacturer": "test",
            "InstanceNumber": rank + 1, "ImageType": ["ORIGINAL", "PRIMARY", "OTHER"],
            "PatientPosition": "FFS", "BodyPartExamined": "ABDOMEN",
            "ScanningSequence": "SE", "SequenceVariant": "SK", "ScanOptions": "", "MRAcquisitionType": "2D",
            "EchoTime": 80.0, "RepetitionTime": 1500.0, "EchoTrainLength": 16,
            "ImagePositionPatient": [round(float(v), 6) for v in position],  # DS: at most 16 characters
            "ImageOrientationPatient": [round(float(v), 8) for v in (*direction[:, 0], *direction[:, 1])],
            "PixelSpacing": [round(volume.geometry.spacing[1], 6), round(volume.geometry.spacing[0], 6)],
            "SliceThickness": round(volume.geometry.spacing[2], 6), "SamplesPerPixel": 1,
            "PhotometricInterpretation": "MONOCHROME2", "Rows": volume.shape[1], "Columns": volume.shape[2],
            "BitsAllocated": 16, "BitsStored": 16, "HighBit": 15, "PixelRepresentation": 1,
        }  # fmt: skip
        for key, value in attributes.items():
            setattr(ds, key, value)
        ds.PixelData = np.ascontiguousarray(volume.array[k], dtype="<i2").tobytes()
        path = folder / f"IM{rank:04d}.dcm"
        if k not in skip:
            ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return [paths[order.index(k)] for k in range(volume.shape[0])]


@pytest.fixture(scope="module")
def dicom_query(chaos) -> Volume:
    """Slices 10..15 of case 2 with integer intensities (DICOM stores integers)."""
    stored = read_scan(chaos / "image_2.nii.gz")
    origin = stored.to_sitk().TransformIndexToPhysicalPoint((0, 0, 10))
    geometry = Geometry(stored.geometry.spacing, tuple(origin), stored.geometry.direction)
    return Volume(np.rint(stored.array[10:16]).astype(np.int16), geometry)


def test_dicom_series_checks(tmp_path, dicom_query):
    in_order = read_scan(write_mr_series(dicom_query, tmp_path / "a")[0].parent)
    sitk.WriteImage(
        Volume(np.ones(in_order.shape, np.uint8), in_order.geometry).to_sitk(), str(tmp_path / "label.nii.gz")
    )
    shuffled = write_mr_series(dicom_query, tmp_path / "b", order=[3, 0, 5, 1, 4, 2])
    got = read_scan(shuffled[0].parent)
    np.testing.assert_array_equal(got.array, in_order.array)
    assert got.geometry.matches(in_order.geometry)
    np.testing.assert_array_equal(got.array, dicom_query.array[::-1])  # normal = row x column = -z

    files = write_mr_series(dicom_query, tmp_path / "gap", skip=(2,))
    step = dicom_query.geometry.spacing[2]
    gap = rf"between {files[3].name} and {files[1].name} \({2 * step:.3f} mm apart; the series' slices are "
    with pytest.raises(ValueError, match=rf"gap: 1 missing slice\(s\) {gap}{step:.3f} mm apart\)"):
        read_scan(tmp_path / "gap")
    argv = ["--checkpoint", str(tmp_path / "never_read.pth"), "--support-image", str(tmp_path / "a")]
    argv += [
        "--support-label",
        str(tmp_path / "label.nii.gz"),
        "--label",
        "1",
        "--out",
        str(tmp_path / "out"),
    ]
    with pytest.raises(ValueError, match=rf"gap: 1 missing slice\(s\) {gap}"):  # the command, as a query
        segment.main([*argv, "--query", str(tmp_path / "gap")])
    assert not (tmp_path / "out").exists()
    files = write_mr_series(dicom_query, tmp_path / "uneven", moved=(2, 3.0))
    with pytest.raises(ValueError, match=r"uneven: inconsistent slice spacing: IM\d+.dcm to IM\d+.dcm"):
        read_scan(tmp_path / "uneven")
    files = write_mr_series(dicom_query, tmp_path / "twice")
    copy = pydicom.dcmread(files[4])
    copy.SOPInstanceUID = copy.file_meta.MediaStorageSOPInstanceUID = f"{SERIES_UID}.99"
    copy.save_as(tmp_path / "twice" / "IM0099.dcm")
    with pytest.raises(ValueError, match=r"twice: duplicated slice: IM00(04|99).dcm and IM00(04|99).dcm lie"):
        read_scan(tmp_path / "twice")
    files = write_mr_series(dicom_query, tmp_path / "mixed")
    other = pydicom.dcmread(files[1])
    other.FrameOfReferenceUID = "1.2.826.0.1.3680043.9.7.26.77"
    other.save_as(files[1])
    with pytest.raises(ValueError, match=rf"mixed: mixed series: .* has FrameOfReferenceUID {FRAME_UID} but "
                       rf"{files[1].name} has 1.2.826.0.1.3680043.9.7.26.77"):  # fmt: skip
        read_scan(tmp_path / "mixed")


def dciodvfy_errors(path: Path) -> list[str]:
    """The error lines of dicom3tools' validator on ``path``; a clear failure under CI (which installs it,
    .ci/run), a skip naming what is missing elsewhere."""
    if shutil.which("dciodvfy") is None:
        missing = "dciodvfy (Debian package dicom3tools: apt-get install dicom3tools) is not installed"
        if os.environ.get("CI"):
            pytest.fail(f"{missing}; .ci/run installs it")
        pytest.skip(f"{missing}, so the DICOM SEG was not validated")
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def test_dicom_query_gets_a_dicom_seg_matching_the_nifti(
    tmp_path, chaos, command, dicom_query, query, capsys
):
    files = write_mr_series(dicom_query, tmp_path / "case2", order=[3, 0, 5, 1, 4, 2])
    out = tmp_path / "out"
    argv = [
        "--support-image",
        str(chaos / "image_1.nii.gz"),
        "--support-label",
        str(chaos / "label_1.nii.gz"),
    ]
    report = command(
        *argv, "--label", "1", "--label", "4", "--query", str(files[0].parent), "--out", str(out)
    )
    nifti = sitk.ReadImage(str(out / "case2.nii.gz"))
    label_map = sitk.GetArrayFromImage(nifti)
    assert (label_map == LIVER).any() and (label_map == SPLEEN).any()
    assert json.loads(report.read_text())["queries"]["case2"]["dicom_seg"] == str(out / "case2_seg.dcm")
    assert_segmentation_file(out / "case2.seg.nrrd", files[0].parent, label_map, {1: "label 1", 4: "label 4"})

    seg = hd.seg.segread(out / "case2_seg.dcm")
    source = pydicom.dcmread(files[0])
    assert seg.StudyInstanceUID == STUDY_UID and seg.FrameOfReferenceUID == FRAME_UID
    assert seg.PatientID == "CHAOST2-2" and seg.Modality == "SEG"
    (series_ref,) = seg.ReferencedSeriesSequence
    assert series_ref.SeriesInstanceUID == SERIES_UID
    referenced = {item.ReferencedSOPInstanceUID for item in series_ref.ReferencedInstanceSequence}
    assert referenced == {pydicom.dcmread(f).SOPInstanceUID for f in files}
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["label 1", "label 4"]
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "difd" and "matching.pth" in algorithm.AlgorithmParameters
    # every source slice's frames against the NIfTI slice at that position
    for path in files:
        instance = pydicom.dcmread(path)
        k = nifti.TransformPhysicalPointToIndex([float(v) for v in instance.ImagePositionPatient])[2]
        frames = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=[instance.SOPInstanceUID],
            segment_numbers=[1, 2],
            skip_overlap_checks=True,
        )[0]
        for number, value in enumerate((LIVER, SPLEEN)):
            np.testing.assert_array_equal(frames[..., number] == 1, label_map[k] == value)
    assert source.Rows == label_map.shape[1]
    assert dciodvfy_errors(files[0]) == []  # the test's series is a valid MR series
    assert dciodvfy_errors(out / "case2_seg.dcm") == []

    # a query that is not DICOM: said in one line, the other formats written
    capsys.readouterr()
    command(*argv, "--label", "1", "--query", str(query), "--out", str(tmp_path / "nifti"))
    assert (
        "case2: not a DICOM series, so no DICOM SEG (NIfTI and .seg.nrrd written)\n"
        in capsys.readouterr().out
    )
    assert sorted(p.name for p in (tmp_path / "nifti").iterdir()) == [
        "case2.nii.gz", "case2.seg.nrrd", "case2_overlays", "report.json"
    ]  # fmt: skip


def test_one_slice_loop(tmp_path, support, command, query):
    """docs/inference.md's loop: one slice drawn in Slicer (saved cropped to that slice) on the scan, the
    scan segmented from it with --n-part 1 and the organ's extent; the same as from that slice as a NIfTI
    label on the full grid."""
    image = read_scan(query)
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(query.parent / "label2.nii.gz")))
    drawn = np.zeros_like(truth, dtype=bool)
    drawn[3] = truth[3] == LIVER
    seg = write_slicer_segmentation(tmp_path / "liver.seg.nrrd", image.geometry, {"Liver": drawn})
    assert slicerio.read_segmentation(str(seg))["voxels"].shape[2] == 1  # one slice thick
    nifti = tmp_path / "liver.nii.gz"
    sitk.WriteImage(Volume(drawn.astype(np.uint8), image.geometry).to_sitk(), str(nifti))
    results = []
    for label, value, out in ((seg, "Liver", "a"), (nifti, "1", "b")):
        argv = ["--support-image", str(query), "--support-label", str(label), "--label", value]
        command(
            *argv,
            "--n-part",
            "1",
            "--query-range",
            "1:5",
            "--query",
            str(query),
            "--out",
            str(tmp_path / out),
        )
        results.append(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / out / "case2.nii.gz"))))
    np.testing.assert_array_equal(results[0], results[1])
    assert results[0][1:5].any() and not results[0][[0, 5]].any()
    found = dice(results[0][1:5] == LIVER, truth[1:5] == LIVER)
    assert found > 0.5, found  # the liver found on the drawn slice and its neighbours


def test_a_file_slicer_wrote(tmp_path):
    """The layered segmentation 3D Slicer saved over its CTChest4 sample, as slicerio ships them (real Slicer
    headers: conversion parameters, reference extent offset, terminology tags)."""
    data = Path(slicerio.__file__).parent / "data"
    image = read_scan(data / "CTChest4.nrrd")
    path = data / "SegmentationOverlapping.seg.nrrd"
    chosen, values = read_support_label(path, ["right lung", "overlapping sphere"])
    assert values == [5, 1]  # distinct label values are kept
    placed = check_support(image, chosen, values, ("CTChest4", "overlapping"))
    segmentation = slicerio.read_segmentation(str(path))
    for value, name in ((5, "right lung"), (1, "overlapping sphere")):
        expected = slicerio.segment_mask(segmentation, name).transpose(2, 1, 0)
        assert expected.any()
        np.testing.assert_array_equal(placed.mask(value), expected)
    assert (placed.mask(5) & placed.mask(1)).any()  # the sphere overlaps the lung: two layers
    with pytest.raises(ValueError, match=r"--label '1' matches 2 segments.*'ribs' \(value 1, layer 0\)"):
        read_support_label(path, ["1"])
