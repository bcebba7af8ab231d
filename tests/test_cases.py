"""Cases: files paired by id, partners checked, labels remapped, real copies read (method.md §1)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dataloaders import (
    DATASETS,
    check_case,
    list_cases,
    read_case,
    remap_labels,
)
from tests.loader_fixtures import SYN, make_root, synthetic_case, write


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
