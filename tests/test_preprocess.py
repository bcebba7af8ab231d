"""Preprocessing commands (method.md §1b) on small synthetic raw inputs written by the tests.

Raw downloads are not available offline, so each test writes a miniature raw dataset into ``tmp_path``:
a CHAOS-style DICOM series (SimpleITK writer, ImagePositionPatient / InstanceNumber tags) with PNG ground
truth named ``IMG-0004-<n>.png``, MS-CMRSeg-style NIfTI pairs and Synapse-style NIfTI pairs. Checked: output
sizes (the size rule of method.md §1b), spacing, label values, intensity ranges, geometry carried (every
organ stays at its physical position), idempotence, and the errors for bad inputs.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from data.CHAOST2 import preprocess as chaos
from data.CMR import preprocess as cmr
from data.preprocessing import centre_crop_or_pad, crop_or_pad_inplane, resample_label, resampled_size
from data.SABS import preprocess as sabs
from dataloaders import list_cases, read_case
from tests.raw_fixtures import CHAOS_ORIGIN, CHAOS_SHAPE, CHAOS_SPACING, chaos_volumes, write_chaos_case

REPO = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------------- helpers
def _size_rule(size: int, spacing: float, new_spacing: float) -> int:
    return int(size * spacing / new_spacing + 1)


def _centroid_mm(image: sitk.Image, mask: np.ndarray) -> np.ndarray:
    """Physical centre (x, y, z) of the voxels where ``mask`` ``(Z, H, W)`` is true."""
    z, y, x = np.nonzero(mask)
    index = (float(x.mean()), float(y.mean()), float(z.mean()))
    return np.asarray(image.TransformContinuousIndexToPhysicalPoint(index))


def _read(path: Path) -> tuple[sitk.Image, np.ndarray]:
    image = sitk.ReadImage(str(path))
    return image, sitk.GetArrayFromImage(image)


def _same_files(first: list[Path], second: list[Path]) -> bool:
    return first == second and all(
        a.read_bytes() == b.read_bytes() for a, b in zip(first, second, strict=True)
    )


# ------------------------------------------------------------------------------------------------- CHAOS
def _chaos_input_mm(grey_value: int) -> np.ndarray:
    """Physical centre of a ground-truth class in the synthetic raw series (identity DICOM geometry)."""
    _, grey = chaos_volumes()
    z, row, col = np.nonzero(grey == grey_value)
    return np.asarray(CHAOS_ORIGIN) + np.asarray(CHAOS_SPACING) * [col.mean(), row.mean(), z.mean()]


@pytest.mark.parametrize("reverse_instances", [False, True])
def test_chaos_output_size_spacing_labels_and_geometry(tmp_path: Path, reverse_instances: bool):
    write_chaos_case(tmp_path / "raw", case_id=3, reverse_instances=reverse_instances)
    written = chaos.main(["--input", str(tmp_path / "raw"), "--output", str(tmp_path / "out")])
    folder = tmp_path / "out" / "chaos_MR_T2_normalized"
    assert written == [folder / "image_3.nii.gz", folder / "label_3.nii.gz"]
    image, image_array = _read(written[0])
    label, label_array = _read(written[1])

    depth = _size_rule(CHAOS_SHAPE[0], CHAOS_SPACING[2], 7.70)
    assert image_array.shape == label_array.shape == (depth, 256, 256)
    assert image_array.dtype == label_array.dtype == np.float64
    np.testing.assert_allclose(image.GetSpacing(), (1.25, 1.25, 7.70))
    # rows stored bottom-up as dcm2nii writes them (the published layout): y direction flipped
    np.testing.assert_allclose(image.GetDirection(), (1, 0, 0, 0, -1, 0, 0, 0, 1))
    assert label.GetOrigin() == image.GetOrigin() and label.GetDirection() == image.GetDirection()

    assert set(np.unique(label_array)) == {0.0, 1.0, 2.0, 4.0}
    raw, _ = chaos_volumes()
    assert image_array.min() >= 0 and image_array.max() <= np.percentile(raw, 99.5)
    assert np.array_equal(image_array, np.round(image_array))  # integer series stays integer-valued
    # image and label aligned: intensities inside each organ are those written there (spleen: 600, but
    # its lowest output slice mixes in the slice below, so only a bound)
    assert image_array[label_array == 1].mean() == pytest.approx(300, abs=15)
    assert image_array[label_array == 4].mean() > 450
    assert image_array[(label_array == 0) & (image_array > 0)].mean() < 150
    # each organ stays where it was in physical space (within a voxel)
    for grey, class_id in ((63, 1), (126, 2), (252, 4)):
        found, expected = _centroid_mm(label, label_array == class_id), _chaos_input_mm(grey)
        assert np.all(np.abs(found - expected) <= CHAOS_SPACING), (class_id, found, expected)


def test_chaos_matches_published_layout(tmp_path: Path, data_root: Path):
    published = sitk.ReadImage(str(data_root / "CHAOST2" / "chaos_MR_T2_normalized" / "image_1.nii.gz"))
    write_chaos_case(tmp_path / "raw")
    image_path = chaos.main(["--input", str(tmp_path / "raw"), "--output", str(tmp_path / "out")])[0]
    ours = sitk.ReadImage(str(image_path))
    assert ours.GetPixelID() == published.GetPixelID()
    assert ours.GetSize()[:2] == published.GetSize()[:2]
    np.testing.assert_allclose(ours.GetSpacing(), published.GetSpacing())
    np.testing.assert_allclose(ours.GetDirection(), published.GetDirection())


def test_chaos_is_idempotent_and_selects_ids(tmp_path: Path):
    for case_id in (1, 2):
        write_chaos_case(tmp_path / "raw", case_id=case_id)
    args = ["--input", str(tmp_path / "raw" / "MR"), "--output", str(tmp_path / "out"), "--ids", "2"]
    first = chaos.main(args)
    snapshot = [path.read_bytes() for path in first]
    second = chaos.main(args)
    assert first == second and [path.read_bytes() for path in second] == snapshot
    assert sorted(p.name for p in (tmp_path / "out" / "chaos_MR_T2_normalized").iterdir()) == [
        "image_2.nii.gz",
        "label_2.nii.gz",
    ]
    with pytest.raises(ValueError, match=r"case ids \[7\] not found.*available ids: \[1, 2\]"):
        chaos.main(["--input", str(tmp_path / "raw"), "--output", str(tmp_path / "out"), "--ids", "7"])


def test_chaos_missing_input_folder(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="CHAOS raw folder.*nothing"):
        chaos.main(["--input", str(tmp_path / "absent"), "--output", str(tmp_path / "out")])


def test_chaos_series_with_missing_instance(tmp_path: Path):
    t2spir = write_chaos_case(tmp_path / "raw")
    (t2spir / "DICOM_anon" / "IMG-0004-00004.dcm").unlink()
    with pytest.raises(ValueError, match=r"DICOM_anon: expected consecutive instance numbers.*missing \[4\]"):
        chaos.preprocess_case(t2spir)


def test_chaos_series_with_position_gap(tmp_path: Path):
    z_positions = [0.0, 6.0, 12.0, 24.0, 30.0, 36.0]  # instances 1..6 consecutive, one slice position skipped
    t2spir = write_chaos_case(tmp_path / "raw", z_positions=z_positions)
    with pytest.raises(ValueError, match=r"expected evenly spaced slices \(6.000 mm apart\).*\[12.0\] mm"):
        chaos.preprocess_case(t2spir)


def test_chaos_ground_truth_count_mismatch(tmp_path: Path):
    t2spir = write_chaos_case(tmp_path / "raw")
    (t2spir / "Ground" / "IMG-0004-00002.png").unlink()
    with pytest.raises(ValueError, match=r"Ground: expected 6 PNGs \(one per DICOM slice\), found 5"):
        chaos.preprocess_case(t2spir)


def test_chaos_ground_truth_size_mismatch(tmp_path: Path):
    t2spir = write_chaos_case(tmp_path / "raw")
    sitk.WriteImage(sitk.Image(40, 40, sitk.sitkUInt8), str(t2spir / "Ground" / "IMG-0004-00003.png"))
    with pytest.raises(
        ValueError, match=r"IMG-0004-00003.png: expected a 40 x 48 grey image.*found \(40, 40\)"
    ):
        chaos.preprocess_case(t2spir)


def test_chaos_unknown_grey_value(tmp_path: Path):
    t2spir = write_chaos_case(tmp_path / "raw")
    grey = np.zeros(CHAOS_SHAPE[1:], dtype=np.uint8)
    grey[5:9, 5:9] = 100
    sitk.WriteImage(sitk.GetImageFromArray(grey), str(t2spir / "Ground" / "IMG-0004-00005.png"))
    with pytest.raises(ValueError, match=r"IMG-0004-00005.png: unknown label values \[100\]; expected only"):
        chaos.preprocess_case(t2spir)


# --------------------------------------------------------------------------------------------------- CMR
CMR_SPACING = (1.4, 1.3, 9.0)
CMR_ORIGIN = (12.0, -40.0, 7.5)
CMR_DIRECTION = (0.6, 0.0, -0.8, 0.0, 1.0, 0.0, 0.8, 0.0, 0.6)  # oblique, as MS-CMRSeg scans are


def _write_cmr_case(folder: Path, case_id: int, codes: tuple[int, int, int] = (200, 500, 600)) -> None:
    """``patient<N>_C0.nii.gz`` (float32 with fractions) in ``folder/img``, its label in ``folder/gt``."""
    rng = np.random.default_rng(case_id)
    image = rng.uniform(50.0, 150.0, size=(8, 44, 50)).astype(np.float32)
    label = np.zeros(image.shape, dtype=np.int16)
    label[2:6, 10:22, 12:26] = codes[0]
    label[2:6, 13:19, 15:23] = codes[1]
    label[1:7, 26:38, 28:44] = codes[2]
    image[label == codes[2]] += 400.0
    image[0, 0, :12] = 9000.0
    for array, sub, name in (
        (image, "img", f"patient{case_id}_C0"),
        (label, "gt", f"patient{case_id}_C0_manual"),
    ):
        volume = sitk.GetImageFromArray(array)
        volume.SetSpacing(CMR_SPACING)
        volume.SetOrigin(CMR_ORIGIN)
        volume.SetDirection(CMR_DIRECTION)
        (folder / sub).mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(volume, str(folder / sub / f"{name}.nii.gz"))


def test_cmr_output_size_spacing_labels_and_geometry(tmp_path: Path):
    _write_cmr_case(tmp_path / "raw", 5)
    written = cmr.main(["--input", str(tmp_path / "raw"), "--output", str(tmp_path / "out")])
    folder = tmp_path / "out" / "cmr_MR_normalized"
    assert written == [folder / "image_5.nii.gz", folder / "label_5.nii.gz"]
    image, image_array = _read(written[0])
    label, label_array = _read(written[1])
    assert image_array.shape == label_array.shape == (_size_rule(8, 9.0, 7.99), 256, 256)
    np.testing.assert_allclose(image.GetSpacing(), (1.25, 1.25, 7.99))
    np.testing.assert_allclose(image.GetDirection(), CMR_DIRECTION)
    assert set(np.unique(label_array)) == {0.0, 1.0, 2.0, 3.0}  # 200/500/600 written as 1/2/3
    raw = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "raw" / "img" / "patient5_C0.nii.gz")))
    assert image_array.min() >= 0 and image_array.max() <= np.percentile(raw, 99.5) + 1e-3
    assert not np.array_equal(image_array, np.round(image_array))  # a float scan keeps its fractions
    assert image_array[label_array == 3].mean() == pytest.approx(500, abs=30)
    raw_label = sitk.ReadImage(str(tmp_path / "raw" / "gt" / "patient5_C0_manual.nii.gz"))
    for code, class_id in ((200, 1), (500, 2), (600, 3)):
        np.testing.assert_allclose(
            _centroid_mm(label, label_array == class_id),
            _centroid_mm(raw_label, sitk.GetArrayFromImage(raw_label) == code),
            atol=2.0,
        )


def test_cmr_accepts_consecutive_codes_and_is_idempotent(tmp_path: Path):
    _write_cmr_case(tmp_path / "raw_a", 1)
    _write_cmr_case(tmp_path / "raw_b", 1, codes=(1, 2, 3))
    first = cmr.main(["--input", str(tmp_path / "raw_a"), "--output", str(tmp_path / "out")])
    snapshot = [path.read_bytes() for path in first]
    assert [
        path.read_bytes()
        for path in cmr.main(["--input", str(tmp_path / "raw_a"), "--output", str(tmp_path / "out")])
    ] == snapshot
    second = cmr.main(["--input", str(tmp_path / "raw_b"), "--output", str(tmp_path / "out_b")])
    assert second[1].read_bytes() == snapshot[1]  # same labels whichever coding the raw file uses


@pytest.mark.parametrize("codes", [(200, 300, 600), (200, 2, 600)])
def test_cmr_unknown_label_values(tmp_path: Path, codes: tuple[int, int, int]):
    _write_cmr_case(tmp_path / "raw", 2, codes=codes)
    bad = codes[1]
    with pytest.raises(ValueError, match=rf"patient2_C0_manual.nii.gz: unknown label values \[{bad}\]"):
        cmr.main(["--input", str(tmp_path / "raw"), "--output", str(tmp_path / "out")])


def test_cmr_missing_folder_and_partner(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="CMR raw folder"):
        cmr.main(["--input", str(tmp_path / "absent"), "--output", str(tmp_path / "out")])
    _write_cmr_case(tmp_path / "raw", 4)
    (tmp_path / "raw" / "gt" / "patient4_C0_manual.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"patient4_C0.nii.gz: no patient4_C0_manual.nii.gz"):
        cmr.main(["--input", str(tmp_path / "raw"), "--output", str(tmp_path / "out")])


def test_cmr_runs_as_a_file(tmp_path: Path):
    _write_cmr_case(tmp_path / "raw", 9)
    command = [sys.executable, str(REPO / "data" / "CMR" / "preprocess.py"), "--input", str(tmp_path / "raw")]
    subprocess.run(
        [*command, "--output", str(tmp_path / "out")], check=True, cwd=tmp_path, capture_output=True
    )
    assert (tmp_path / "out" / "cmr_MR_normalized" / "label_9.nii.gz").is_file()


# -------------------------------------------------------------------------------------------------- SABS
SABS_SPACING = (0.7, 0.7, 2.5)
SABS_ORIGIN = (170.0, 160.0, -300.0)
SABS_DIRECTION = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)


def _write_sabs_case(root: Path, number: int, depth: int, bad_label: int | None = None) -> None:
    """``root/img/img<NNNN>.nii.gz`` (HU, int16) and ``root/label/label<NNNN>.nii.gz`` (0..13)."""
    rng = np.random.default_rng(number)
    image = rng.integers(-1000, 1000, size=(depth, 112, 128)).astype(np.int16)
    label = np.zeros(image.shape, dtype=np.uint8)
    label[:, 40:60, 50:90] = 6  # liver and left adrenal gland, inside the 32-voxel border (rows 32..79)
    label[1:3, 62:76, 60:80] = 13
    if bad_label is not None:
        label[0, 50:60, 50:60] = bad_label
    for array, kind in ((image, "img"), (label, "label")):
        volume = sitk.GetImageFromArray(array)
        volume.SetSpacing(SABS_SPACING)
        volume.SetOrigin(SABS_ORIGIN)
        volume.SetDirection(SABS_DIRECTION)
        (root / kind).mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(volume, str(root / kind / f"{kind}{number:04d}.nii.gz"))


def test_sabs_reindexing_size_intensity_labels_and_geometry(tmp_path: Path):
    _write_sabs_case(tmp_path / "raw", 10, depth=4)
    _write_sabs_case(tmp_path / "raw", 2, depth=5)
    written = sabs.main(["--input", str(tmp_path / "raw"), "--output", str(tmp_path / "out")])
    folder = tmp_path / "out" / "sabs_CT_normalized"
    assert [path.name for path in written] == [
        "image_0.nii.gz",
        "label_0.nii.gz",
        "image_1.nii.gz",
        "label_1.nii.gz",
    ]
    for (image_path, label_path), number, depth in zip(
        (written[0:2], written[2:4]), (2, 10), (5, 4), strict=True
    ):
        image, image_array = _read(image_path)
        label, label_array = _read(label_path)
        assert image_path.parent == folder
        # 32-voxel border cut (128 x 112 -> 64 x 48), then spacing x 1.75 in-plane, z unchanged
        new_spacing = SABS_SPACING[0] * 1.75
        expected = (depth + 1, _size_rule(48, 0.7, new_spacing), _size_rule(64, 0.7, new_spacing))
        assert image_array.shape == label_array.shape == expected
        assert image_array.dtype == label_array.dtype == np.float32
        np.testing.assert_allclose(image.GetSpacing(), (new_spacing, new_spacing, 2.5))
        np.testing.assert_allclose(image.GetDirection(), SABS_DIRECTION)
        # origin moved by the cut: 32 voxels along each (negative) in-plane axis
        np.testing.assert_allclose(image.GetOrigin(), (170.0 - 32 * 0.7, 160.0 - 32 * 0.7, -300.0), atol=1e-6)
        assert image_array.min() == 0.0 and image_array.max() == 255.0
        assert not image_array[-1].any() and not label_array[-1].any()  # slice past the original field
        assert set(np.unique(label_array)) == {0.0, 6.0, 13.0}
        raw_label = sitk.ReadImage(str(tmp_path / "raw" / "label" / f"label{number:04d}.nii.gz"))
        for value in (6, 13):
            np.testing.assert_allclose(
                _centroid_mm(label, label_array == value),
                _centroid_mm(raw_label, sitk.GetArrayFromImage(raw_label) == value),
                atol=1.5,
            )
    rerun = sabs.main(["--input", str(tmp_path / "raw"), "--output", str(tmp_path / "out"), "--ids", "1"])
    assert rerun == written[2:4]
    snapshot = [path.read_bytes() for path in rerun]
    assert [
        path.read_bytes()
        for path in sabs.main(
            ["--input", str(tmp_path / "raw"), "--output", str(tmp_path / "out"), "--ids", "1"]
        )
    ] == snapshot


def test_sabs_window_mapping(tmp_path: Path):
    hu = sitk.GetImageFromArray(np.array([[[-1000, -125, 75, 275, 900]]], dtype=np.int16))
    np.testing.assert_allclose(
        sitk.GetArrayFromImage(sabs.normalise_intensity(hu)).ravel(), [0.0, 0.0, 127.5, 255.0, 255.0]
    )


def test_sabs_errors(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="SABS raw folder"):
        sabs.main(["--input", str(tmp_path / "absent"), "--output", str(tmp_path / "out")])
    _write_sabs_case(tmp_path / "raw", 1, depth=2, bad_label=14)
    with pytest.raises(ValueError, match=r"label0001.nii.gz: unknown label values \[14\]"):
        sabs.main(["--input", str(tmp_path / "raw"), "--output", str(tmp_path / "out")])
    (tmp_path / "raw" / "label" / "label0001.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"img0001.nii.gz: expected its label at .*label0001.nii.gz"):
        sabs.main(["--input", str(tmp_path / "raw"), "--output", str(tmp_path / "out")])


# ----------------------------------------------------------------------------------------- shared steps
def _volume(shape: tuple[int, int, int]) -> sitk.Image:
    image = sitk.GetImageFromArray(np.arange(np.prod(shape), dtype=np.float64).reshape(shape))
    image.SetSpacing((0.5, 2.0, 3.0))
    image.SetOrigin((1.0, 2.0, 3.0))
    image.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    return image


@pytest.mark.parametrize("in_hw, out_hw", [((9, 12), (4, 6)), ((3, 4), (8, 7)), ((7, 4), (4, 9))])
def test_centre_crop_or_pad_follows_the_published_rule(in_hw: tuple[int, int], out_hw: tuple[int, int]):
    image = _volume((2, *in_hw))
    out = centre_crop_or_pad(image, pad_value=-1.0, size=out_hw[::-1])
    array, source = sitk.GetArrayFromImage(out), sitk.GetArrayFromImage(image)
    assert array.shape == (2, *out_hw)
    for y in range(out_hw[0]):
        for x in range(out_hw[1]):
            src_y, src_x = y + in_hw[0] // 2 - out_hw[0] // 2, x + in_hw[1] // 2 - out_hw[1] // 2
            inside = 0 <= src_y < in_hw[0] and 0 <= src_x < in_hw[1]
            assert array[1, y, x] == (source[1, src_y, src_x] if inside else -1.0)
            np.testing.assert_allclose(
                out.TransformIndexToPhysicalPoint((x, y, 1)),
                image.TransformContinuousIndexToPhysicalPoint((float(src_x), float(src_y), 1.0)),
            )


def test_crop_or_pad_inplane_keeps_pixel_type():
    label = sitk.Cast(_volume((1, 5, 5)), sitk.sitkUInt8)
    out = crop_or_pad_inplane(label, (-2, 1), (4, 3), 0)
    assert out.GetPixelID() == sitk.sitkUInt8 and out.GetSize() == (4, 3, 1)


def test_resample_label_rounds_each_value_on_the_image_grid():
    array = np.zeros((4, 6, 8), dtype=np.uint8)
    array[:, :, 2:4] = 1
    array[:, :, 4:6] = 2
    label = sitk.GetImageFromArray(array)
    label.SetSpacing((2.0, 1.0, 3.0))
    label.SetOrigin((5.0, 0.0, 0.0))
    out = resample_label(label, (1.0, 1.0, 3.0))
    assert list(out.GetSize()) == resampled_size((8, 6, 4), (2.0, 1.0, 3.0), (1.0, 1.0, 3.0)) == [17, 7, 5]
    assert out.GetOrigin() == label.GetOrigin() and out.GetSpacing() == (1.0, 1.0, 3.0)
    row = sitk.GetArrayFromImage(out)[0, 0]
    # x = 2k lies on input voxel k; between labels 1 and 2 both masks are 0.5 and round to 0 (half to even)
    np.testing.assert_array_equal(row, [0, 0, 0, 0, 1, 1, 1, 0, 2, 2, 2, 0, 0, 0, 0, 0, 0])
    assert not sitk.GetArrayFromImage(out)[-1].any()  # the extra slice lies outside the input


# ------------------------------------------------------------------------------------------ loader round trip
def test_outputs_are_read_by_the_loaders(tmp_path: Path):
    root = tmp_path / "root"
    write_chaos_case(tmp_path / "chaos", case_id=5)
    chaos.main(["--input", str(tmp_path / "chaos"), "--output", str(root / "CHAOST2")])
    _write_cmr_case(tmp_path / "cmr", 7)
    cmr.main(["--input", str(tmp_path / "cmr"), "--output", str(root / "CMR")])
    _write_sabs_case(tmp_path / "sabs", 3, depth=2)
    sabs.main(["--input", str(tmp_path / "sabs"), "--output", str(root / "SABS")])
    for dataset, case_id, classes in (
        ("CHAOST2", 5, {0, 1, 2, 4}),
        ("CMR", 7, {0, 1, 2, 3}),
        ("SABS", 0, {0, 6, 13}),
    ):
        (case,) = list_cases(dataset, root)
        volume = read_case(case, dataset)
        assert volume.case_id == case_id
        assert set(np.unique(volume.label.array).tolist()) == classes
        assert volume.image.shape == volume.label.shape
