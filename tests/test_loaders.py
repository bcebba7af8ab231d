"""Dataset table, volume reader, augmentation and the evaluation formulas (method.md §1, §3, §5)."""

from __future__ import annotations

import dataclasses
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from dataloaders import (
    DATASETS,
    apply_gamma,
    apply_geometry,
    check_case,
    chunk_bounds,
    get_dataset_info,
    identity_gamma,
    identity_geometry,
    list_cases,
    normalize_volume,
    read_case,
    remap_labels,
    resize_slices,
    sample_gamma,
    sample_geometry,
    support_slice_indices,
)
from dataloaders.augment import GeometryParams, affine_matrices
from tests.loader_fixtures import SYN, make_root, synthetic_case, write

# --------------------------------------------------------------------------------------------- dataset table

#: method.md §1 fold table, as printed: inclusive position ranges, fold 4 also holds position 0.
SPEC_FOLDS = {
    "CHAOST2": [(0, 4), (4, 8), (8, 12), (12, 16), (16, 19)],
    "SABS": [(0, 6), (6, 12), (12, 18), (18, 24), (24, 29)],
    "CMR": [(0, 7), (7, 14), (14, 21), (21, 28), (28, 34)],
}


@pytest.mark.parametrize("name", sorted(SPEC_FOLDS))
def test_fold_membership_matches_spec_table(name: str) -> None:
    info = get_dataset_info(name)
    assert info.n_folds == 5
    for fold, (first, last) in enumerate(SPEC_FOLDS[name]):
        expected = set(range(first, last + 1)) | ({0} if fold == 4 else set())
        assert set(info.fold(fold)) == expected, (name, fold)
        assert list(info.fold(fold)) == sorted(expected)
    # every position is tested at least once; neighbouring folds share exactly one volume
    assert set().union(*info.folds) == set(range(info.n_volumes))
    for fold in range(4):
        assert len(set(info.fold(fold)) & set(info.fold(fold + 1))) == 1


def test_dataset_facts() -> None:
    assert get_dataset_info("SABS").test_labels == (1, 2, 3, 6)
    assert [get_dataset_info("SABS").class_name(v) for v in (1, 2, 3, 6)] == ["SPLEEN", "RK", "LK", "LIVER"]
    assert get_dataset_info("CHAOST2").test_labels == (1, 2, 3, 4)
    cmr = get_dataset_info("CMR")
    assert [cmr.class_name(v) for v in cmr.test_labels] == ["LV-BP", "LV-MYO", "RV"]
    assert dict(cmr.label_remap) == {200: 1, 500: 2, 600: 3}
    assert {n: i.n_sv for n, i in DATASETS.items()} == {"CHAOST2": 5000, "SABS": 5000, "CMR": 1000}
    assert {n: i.n_volumes for n, i in DATASETS.items()} == {"CHAOST2": 20, "SABS": 30, "CMR": 35}
    assert cmr.supervoxel_folder() == "supervoxels_1000"


def test_unknown_dataset_and_fold_raise() -> None:
    with pytest.raises(ValueError, match=r"unknown dataset 'ABD'.*CHAOST2.*CMR.*SABS"):
        get_dataset_info("ABD")
    with pytest.raises(ValueError, match="eval_fold"):
        get_dataset_info("CMR").fold(5)
    with pytest.raises(ValueError, match="unknown class value"):
        get_dataset_info("CMR").class_name(200)


# --------------------------------------------------------------------------------------------- reader


def test_list_cases_pairs_by_id_sorted_numerically(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    cases = list_cases(SYN, root, supervoxels=True)
    assert [c.case_id for c in cases] == [3, 11, 20, 104]  # numeric, not lexicographic, order
    for case in cases:
        assert case.image.name == f"image_{case.case_id}.nii.gz"
        assert case.label.name == f"label_{case.case_id}.nii.gz"
        assert case.supervoxel.name == f"superpix-MIDDLE_{case.case_id}.nii.gz"
    volume = read_case(cases[1], SYN)
    image, label, sv = synthetic_case(11)
    np.testing.assert_allclose(volume.image.array, image.astype(np.float32))
    np.testing.assert_array_equal(volume.label.array, label)
    np.testing.assert_array_equal(volume.supervoxel.array, sv)
    assert volume.geometry.spacing == (1.5, 1.5, 5.0)
    assert len(volume.geometry.direction) == 9


def test_missing_partners_are_named(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    image_dir = root / "SYN" / SYN.image_folder
    (image_dir / "label_11.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"label_11\.nii\.gz"):
        list_cases(SYN, root)
    write(synthetic_case(11)[1], image_dir / "label_11.nii.gz")
    (root / "SYN" / "supervoxels_5000" / "superpix-MIDDLE_20.nii.gz").unlink()
    list_cases(SYN, root)  # supervoxels not asked for
    with pytest.raises(FileNotFoundError, match=r"superpix-MIDDLE_20\.nii\.gz"):
        list_cases(SYN, root, supervoxels=True)
    (image_dir / "image_104.nii.gz").unlink()  # an orphan label is an error too
    with pytest.raises(FileNotFoundError, match=r"image_104\.nii\.gz"):
        list_cases(SYN, root)
    with pytest.raises(FileNotFoundError, match="supervoxels_77"):
        list_cases(SYN, root, supervoxels=True, n_sv=77)
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        list_cases("CMR", root)


def test_shape_mismatch_and_corrupt_files_are_named(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    image_dir = root / "SYN" / SYN.image_folder
    write(synthetic_case(3)[1][:, :40], image_dir / "label_3.nii.gz")
    case = list_cases(SYN, root)[0]
    with pytest.raises(ValueError, match=r"shape mismatch: .*label_3\.nii\.gz"):
        read_case(case, SYN)
    with pytest.raises(ValueError, match=r"shape mismatch: .*label_3\.nii\.gz"):
        check_case(case)
    (image_dir / "image_11.nii.gz").write_bytes(b"this is not a NIfTI file")
    with pytest.raises(ValueError, match=r"image_11\.nii\.gz"):
        read_case(list_cases(SYN, root)[1], SYN)
    # a truncated gzip stream: the header may parse, the voxels cannot
    data = (image_dir / "image_20.nii.gz").read_bytes()
    (image_dir / "image_20.nii.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"image_20\.nii\.gz"):
        read_case(list_cases(SYN, root)[2], SYN)


def test_label_remap_and_unknown_values() -> None:
    stored = np.array([[[0, 200, 500, 600]]], dtype=np.float64)
    np.testing.assert_array_equal(remap_labels(stored, "CMR"), [[[0, 1, 2, 3]]])
    np.testing.assert_array_equal(remap_labels(np.array([[[0, 1, 2, 3]]]), "CMR"), [[[0, 1, 2, 3]]])
    with pytest.raises(ValueError, match=r"lab\.nii\.gz: unknown label values \[7\]"):
        remap_labels(np.array([[[0, 7]]]), "CHAOST2", "lab.nii.gz")
    with pytest.raises(ValueError, match="integers"):
        remap_labels(np.array([[[0, 0.5]]]), "CHAOST2")


def test_normalize_and_resize() -> None:
    volume = np.random.default_rng(0).normal(300.0, 40.0, size=(3, 10, 12))
    normed = normalize_volume(volume)
    assert normed.dtype == np.float32
    assert abs(float(normed.mean())) < 1e-5 and abs(float(normed.std()) - 1) < 1e-5
    with pytest.raises(ValueError, match="constant"):
        normalize_volume(np.ones((2, 3, 3)))
    mask = np.zeros((2, 10, 10), dtype=np.uint16)
    mask[:, 2:8, 2:8] = 7
    small = resize_slices(mask, 5, nearest=True)
    assert small.shape == (2, 5, 5) and set(np.unique(small)) == {0, 7}
    assert resize_slices(volume.astype(np.float32), 6, nearest=False).shape == (3, 6, 6)
    # more slices than one OpenCV call takes channels: every slice resized like on its own
    many = np.random.default_rng(1).random((300, 9, 7)).astype(np.float32)
    resized = resize_slices(many, 5, nearest=False)
    np.testing.assert_allclose(
        resized[[0, 150, 299]], resize_slices(many[[0, 150, 299]], 5, nearest=False), atol=1e-6
    )


# --------------------------------------------------------------------------------------------- real data


def _real(data_root: Path, name: str) -> Path:
    folder = data_root / name / DATASETS[name].image_folder
    if not folder.is_dir():
        pytest.skip(f"real {name} copy not found at {folder}")
    return data_root


def test_real_case_lists(data_root: Path) -> None:
    root = _real(data_root, "CHAOST2")
    cases = list_cases("CHAOST2", root, supervoxels=True)
    ids = [c.case_id for c in cases]
    assert ids == sorted(ids) and len(ids) == 20
    assert [ids[p] for p in DATASETS["CHAOST2"].fold(0)] == [1, 2, 3, 5, 8]
    assert [ids[p] for p in DATASETS["CHAOST2"].fold(4)] == [1, 36, 37, 38, 39]


def test_real_cmr_labels_remapped(data_root: Path) -> None:
    root = _real(data_root, "CMR")
    case = list_cases("CMR", root, supervoxels=True)[0]
    volume = read_case(case, "CMR")
    assert case.case_id == 1
    values, counts = np.unique(volume.label.array, return_counts=True)
    # README counts of case 1: 200 (LV-MYO) 10410, 500 (LV-BP) 11034, 600 (RV) 8618
    assert values.tolist() == [0, 1, 2, 3]
    assert counts[1:].tolist() == [10410, 11034, 8618]
    assert volume.supervoxel.shape == volume.image.shape == (19, 256, 256)


def test_real_sabs_257_volumes_load(data_root: Path) -> None:
    root = _real(data_root, "SABS")
    case = list_cases("SABS", root, supervoxels=True)[0]
    volume = read_case(case, "SABS")
    assert volume.image.shape == volume.label.shape == volume.supervoxel.shape == (148, 257, 257)
    assert volume.label.array.max() == 13 and volume.label.array.dtype == np.uint8
    assert volume.geometry.spacing[2] == 3.0


# --------------------------------------------------------------------------------------------- augmentation


def test_identity_parameters_change_nothing() -> None:
    rng = np.random.default_rng(1)
    image = rng.normal(size=(2, 33, 40)).astype(np.float32)
    mask = (rng.random((2, 33, 40)) > 0.7).astype(np.float32)
    np.testing.assert_array_equal(apply_gamma(image, identity_gamma()), image)
    warped, warped_mask = apply_geometry(image, mask, identity_geometry(image.shape))
    np.testing.assert_array_equal(warped, image)
    np.testing.assert_array_equal(warped_mask, mask)


def test_random_parameters_in_range_and_reproducible() -> None:
    params = sample_geometry(np.random.default_rng(5), (3, 32, 32))
    again = sample_geometry(np.random.default_rng(5), (3, 32, 32))
    for field in dataclasses.fields(GeometryParams):
        np.testing.assert_array_equal(getattr(params, field.name), getattr(again, field.name))
    assert np.all(np.abs(params.rotation_deg) <= 5) and np.all(np.abs(params.shear_deg) <= 5)
    assert np.all(np.abs(params.translation) <= 5) and np.all((params.zoom >= 0.9) & (params.zoom <= 1.2))
    assert params.displacement.shape == (3, 2, 32, 32)
    assert sample_geometry(np.random.default_rng(0), (70, 16, 16)).displacement.shape == (70, 2, 16, 16)
    # smoothed U(-1,1) noise times alpha=10 stays well inside +-10 px and is not constant
    assert 0 < np.abs(params.displacement).max() < 10
    gammas = [sample_gamma(np.random.default_rng(s)).gamma for s in range(50)]
    assert min(gammas) >= 0.5 and max(gammas) <= 1.5 and np.std(gammas) > 0.1


def test_gamma_formula_keeps_range_and_order() -> None:
    image = np.linspace(-2.0, 3.0, 60, dtype=np.float32).reshape(1, 6, 10)
    out = apply_gamma(image, sample_gamma(np.random.default_rng(3)))
    g = sample_gamma(np.random.default_rng(3)).gamma
    value_range = 5.0 + 1e-5
    expected = value_range * ((image + 2.0 + 1e-5) / value_range) ** g - 2.0
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert np.all(np.diff(out.ravel()) > 0)


def test_image_and_mask_stay_aligned_under_random_transform() -> None:
    rng = np.random.default_rng(7)
    mask = np.zeros((3, 64, 64), dtype=np.float32)
    mask[:, 20:44, 16:40] = 1
    mask[1, 5:12, 50:60] = 1
    k = 37.0
    params = sample_geometry(rng, mask.shape)
    warped_image, warped_mask = apply_geometry(mask * k, mask, params)
    assert set(np.unique(warped_mask)) == {0.0, 1.0}
    assert not np.array_equal(warped_mask, mask)  # the transform did something
    agree = (warped_image / k > 0.5) == (warped_mask > 0.5)
    assert agree.mean() > 0.999
    # the forward affine moves the mask centre where the matrix says (elastic shifts are small on average)
    ys, xs = np.nonzero(warped_mask[0])
    centre = affine_matrices(params)[0] @ np.array([27.5, 31.5, 1.0])
    assert abs(xs.mean() - centre[0]) < 2.0 and abs(ys.mean() - centre[1]) < 2.0


def test_geometry_rejects_mismatched_shapes() -> None:
    params = identity_geometry((1, 8, 8))
    with pytest.raises(ValueError, match="must agree"):
        apply_geometry(np.zeros((1, 8, 9), np.float32), np.zeros((1, 8, 9), np.float32), params)


# --------------------------------------------------------------------------------------------- test protocol


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_support_slice_indices_follow_spec_formula(n: int) -> None:
    for count in range(3, 41):
        got = support_slice_indices(count, n).tolist()
        if n == 1:
            expected = [count // 2]
        else:
            # exact rational version of 1/(2N) + i(1 - 1/N)/(N - 1), then int(fraction * count)
            expected = [
                int((Fraction(1, 2 * n) + i * (1 - Fraction(1, n)) / (n - 1)) * count) for i in range(n)
            ]
        assert got == expected, (count, n)
        assert all(0 <= i < count for i in got)
        if count >= n:
            assert got == sorted(set(got))
    assert support_slice_indices(6, 3).tolist() == [1, 3, 5]  # fractions 1/6, 1/2, 5/6
    with pytest.raises(ValueError):
        support_slice_indices(0, 3)


@pytest.mark.parametrize("n_part", [1, 2, 3, 4])
def test_chunk_bounds_follow_linspace(n_part: int) -> None:
    for count in range(3, 41):
        chunks = chunk_bounds(count, n_part)
        edges = [int(v) for v in np.linspace(0, count, n_part + 1)]
        assert chunks == list(zip(edges[:-1], edges[1:], strict=True))
        assert chunks[0][0] == 0 and chunks[-1][1] == count
        assert all(a[1] == b[0] for a, b in zip(chunks[:-1], chunks[1:], strict=True))
        sizes = [end - start for start, end in chunks]
        assert max(sizes) - min(sizes) <= 1
    assert chunk_bounds(12, 3) == [(0, 4), (4, 8), (8, 12)]
    assert chunk_bounds(2, 3) == [(0, 0), (0, 1), (1, 2)]
