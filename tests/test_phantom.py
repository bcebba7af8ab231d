"""Tests of the phantom dataset generator (data/phantom.py)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import SimpleITK as sitk

from data.phantom import LABELS, main, make_phantom_case, write_phantom_dataset


@pytest.fixture(scope="module")
def cases() -> list[tuple[np.ndarray, np.ndarray]]:
    """Ten cases at the default 30 slices, half resolution to keep the test fast."""
    return [make_phantom_case(0, case_id, n_slices=30, size=128) for case_id in range(1, 11)]


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_deterministic_for_a_seed() -> None:
    first = make_phantom_case(3, 2, n_slices=12, size=64)
    second = make_phantom_case(3, 2, n_slices=12, size=64)
    for x, y in zip(first, second, strict=True):
        assert x.dtype == np.float64
        assert x.tobytes() == y.tobytes()


def test_seeds_and_cases_differ() -> None:
    base_img, base_lbl = make_phantom_case(0, 1, n_slices=12, size=64)
    for seed, case_id in ((1, 1), (0, 2)):
        img, lbl = make_phantom_case(seed, case_id, n_slices=12, size=64)
        assert not np.array_equal(img, base_img)
        assert not np.array_equal(lbl, base_lbl)


def test_labels_and_anatomy(cases: list[tuple[np.ndarray, np.ndarray]]) -> None:
    for image, label in cases:
        assert image.shape == label.shape == (30, 128, 128)
        assert set(np.unique(label)) <= {0.0, 1.0, 2.0, 3.0, 4.0}
        centroids = {}
        for name, value in LABELS.items():
            mask = label == value
            slices = np.flatnonzero(mask.any(axis=(1, 2)))
            # Every organ spans several slices (the evaluation splits them into 3 chunks).
            assert slices.size >= 5, f"{name} present on {slices.size} slices only"
            # Contiguous in z: organs appear and disappear once.
            assert slices[-1] - slices[0] + 1 == slices.size, f"{name} has gaps along z"
            centroids[name] = np.argwhere(mask).mean(axis=0)
        volumes = {name: (label == value).sum() for name, value in LABELS.items()}
        assert volumes["LIVER"] > 3 * max(volumes["RK"], volumes["LK"], volumes["SPLEEN"])
        # Radiological layout: liver and right kidney on the image's left, spleen and left kidney on its
        # right; kidneys posterior (small row index) to the liver's centre.
        assert centroids["LIVER"][2] < 64 < centroids["SPLEEN"][2]
        assert centroids["RK"][2] < 64 < centroids["LK"][2]
        assert centroids["RK"][1] < centroids["LIVER"][1]
        assert centroids["LK"][1] < centroids["LIVER"][1]


def test_cases_differ_in_shape(cases: list[tuple[np.ndarray, np.ndarray]]) -> None:
    liver_volumes = [int((label == LABELS["LIVER"]).sum()) for _, label in cases]
    assert len(set(liver_volumes)) == len(cases)
    assert max(liver_volumes) > 1.1 * min(liver_volumes)


def test_organ_intensities_plausible(cases: list[tuple[np.ndarray, np.ndarray]]) -> None:
    for image, label in cases:
        assert image.min() >= 0.0
        assert 600.0 < image.max() < 1400.0  # clipped raw MR range of CHAOST2
        means = {name: image[label == value].mean() for name, value in LABELS.items()}
        assert 200.0 < means["LIVER"] < 550.0
        for name in ("RK", "LK", "SPLEEN"):
            assert 400.0 < means[name] < 1100.0
            assert means[name] > 1.2 * means["LIVER"]
        # Textured, not flat: the liver has a spread of intensities.
        assert image[label == LABELS["LIVER"]].std() > 10.0
        # Background outside the body is Rician noise around a few units.
        assert image[:, :4, :4].mean() < 40.0


def test_smooth_along_z(cases: list[tuple[np.ndarray, np.ndarray]]) -> None:
    for _, label in cases:
        liver = label == LABELS["LIVER"]
        present = np.flatnonzero(liver.any(axis=(1, 2)))
        dices = [_dice(liver[z], liver[z + 1]) for z in present[:-1]]
        assert np.median(dices) > 0.85
        assert min(dices[2:-2]) > 0.7


def test_written_geometry_and_cli(tmp_path) -> None:
    start = time.perf_counter()
    main(["--out", str(tmp_path), "--n-cases", "2", "--n-slices", "30", "--seed", "5"])
    elapsed = time.perf_counter() - start
    assert elapsed < 20.0, f"2 cases took {elapsed:.1f} s"
    folder = tmp_path / "CHAOST2" / "chaos_MR_T2_normalized"
    assert sorted(p.name for p in folder.iterdir()) == [
        "image_1.nii.gz",
        "image_2.nii.gz",
        "label_1.nii.gz",
        "label_2.nii.gz",
    ]
    for name in ("image_2.nii.gz", "label_2.nii.gz"):
        itk = sitk.ReadImage(str(folder / name))
        assert itk.GetSpacing() == pytest.approx((1.25, 1.25, 7.7))
        assert itk.GetSize() == (256, 256, 30)
        assert itk.GetPixelID() == sitk.sitkFloat64
    image, label = make_phantom_case(5, 2)
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "image_2.nii.gz"))), image)
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "label_2.nii.gz"))), label)


def test_half_size_keeps_field_of_view(tmp_path) -> None:
    write_phantom_dataset(tmp_path, n_cases=1, n_slices=10, size=128, seed=0)
    itk = sitk.ReadImage(str(tmp_path / "CHAOST2" / "chaos_MR_T2_normalized" / "image_1.nii.gz"))
    assert itk.GetSpacing() == pytest.approx((2.5, 2.5, 7.7))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"n_slices": 4}, "n_slices"), ({"size": 16}, "size"), ({"case_id": -1}, "case_id")],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    args = {"seed": 0, "case_id": 1, "n_slices": 12, "size": 64} | kwargs
    with pytest.raises(ValueError, match=message):
        make_phantom_case(**args)


def test_bad_case_count(tmp_path) -> None:
    with pytest.raises(ValueError, match="n_cases"):
        write_phantom_dataset(tmp_path, n_cases=0)
