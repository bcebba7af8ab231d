"""segment.py's clinic formats (issue 26) on real CHAOST2 volumes: 3D Slicer segmentations (``.seg.nrrd``,
written and read back with ``slicerio``) as the support and as an output, DICOM series in and DICOM SEG out.

The command runs end to end with the nearest-prototype DIFD of ``tests/test_segment.py`` (tiny encoder,
64 px) injected in place of the checkpoint's network, on 6-slice queries, so that the files and their
geometry are what is tested and the run stays short.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

import segment
from dataloaders import Geometry, Volume
from inference.scans import check_support, read_scan, read_support_label
from inference.segmentations import read_seg_nrrd
from inference.segmenter import CheckpointInfo, Segmenter
from tests.test_segment import CHAOS, matching_difd

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
    path = tmp_path_factory.mktemp("query") / "case2.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(chaos / "image_2.nii.gz"))[:, :, 10:16], str(path))
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
