"""3D Felzenszwalb supervoxels (method.md §2): classic argsort order, graph, exact published files, CLI."""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from data.supervoxels.felzenszwalb_3d_cy import (
    classic_argsort,
    edge_costs,
    edge_endpoints,
    edge_weights,
    felzenszwalb_3d,
)

from data.supervoxels import compare_published, generate_supervoxels
from data.supervoxels.compare_published import adjusted_rand_index, compare, compare_case
from data.supervoxels.generate_supervoxels import (
    generate,
    mask_supervoxels,
    read_spacing_zyx,
    rescale_to_255,
)

FIXTURES = Path(__file__).parent / "fixtures" / "classic_argsort_numpy1_24.json"
#: Orders printed by numpy 1.24.4 ``np.argsort(values, kind='quicksort')`` (scratch environment, not a
#: dependency): tie-heavy arrays, median-of-three adversaries that reach the heapsort fallback, NaNs.
ARGSORT_CASES = json.loads(FIXTURES.read_text())["cases"]

#: The edge table of method.md §2, written out independently of the extension: (a offset, b offset, weight).
SPEC_BLOCKS = [
    ((0, 1, 0), (0, 0, 0), 0), ((0, 1, 1), (0, 0, 0), 0), ((0, 0, 1), (0, 0, 0), 0),
    ((0, 1, 0), (0, 0, 1), 0), ((1, 1, 0), (0, 0, 0), 2), ((1, 1, 1), (0, 0, 0), 3),
    ((1, 0, 1), (0, 0, 0), 2), ((1, 0, 0), (0, 1, 0), 2), ((1, 0, 0), (0, 1, 1), 3),
    ((1, 0, 0), (0, 0, 1), 2), ((1, 1, 0), (0, 0, 1), 3), ((1, 0, 1), (0, 1, 0), 3),
    ((1, 0, 0), (0, 0, 0), 1),
]  # fmt: skip

#: Smallest published volumes (11 CMR slices, 31 CHAOST2 slices): exact equality runs in CI on these.
SMALL_CASES = [("CMR", 4), ("CMR", 13), ("CHAOST2", 2), ("CHAOST2", 15)]


def _block(array: np.ndarray, offset: tuple[int, int, int], extent: tuple[int, int, int]) -> np.ndarray:
    Z, Y, X = array.shape
    return array[tuple(slice(o, n - e + o) for o, n, e in zip(offset, (Z, Y, X), extent, strict=True))]


def _reference_graph(image: np.ndarray, weights: tuple[float, ...]) -> tuple[np.ndarray, ...]:
    """Endpoints and costs of every edge by NumPy slicing, block by block as method.md §2's table."""
    index = np.arange(image.size).reshape(image.shape)
    a, b, costs = [], [], []
    for off_a, off_b, w in SPEC_BLOCKS:
        extent = tuple(max(p, q) for p, q in zip(off_a, off_b, strict=True))
        a.append(_block(index, off_a, extent).ravel())
        b.append(_block(index, off_b, extent).ravel())
        diff = _block(image, off_a, extent) - _block(image, off_b, extent)
        costs.append(np.sqrt(weights[w] * diff**2).ravel())
    return np.concatenate(a), np.concatenate(b), np.concatenate(costs)


# --- (a) classic argsort ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    ARGSORT_CASES,
    ids=[f"{c['name']}-{len(c['values'])}" for c in ARGSORT_CASES],
)
def test_classic_argsort_matches_numpy_1_24(case):
    values = np.array([np.nan if v is None else v for v in case["values"]], dtype=np.float64)
    np.testing.assert_array_equal(classic_argsort(values), case["order"])


def test_fixtures_cover_ties_heapsort_and_differ_from_numpy_2():
    assert any(c["heapsort"] for c in ARGSORT_CASES), "no fixture reaches the heapsort fallback"
    differing = 0
    for case in ARGSORT_CASES:
        values = np.array([np.nan if v is None else v for v in case["values"]], dtype=np.float64)
        differing += not np.array_equal(np.argsort(values, kind="quicksort"), case["order"])
    # Otherwise the fixtures could not tell the classic order from the installed NumPy's.
    assert differing >= len(ARGSORT_CASES) - 2


def test_classic_argsort_sorts_and_permutes():
    rng = np.random.default_rng(0)
    for values in (rng.integers(0, 7, 20_000).astype(float), rng.random(5_000), np.zeros(0), np.ones(1)):
        order = classic_argsort(values)
        assert order.dtype == np.intp
        np.testing.assert_array_equal(np.sort(order), np.arange(values.size))
        assert np.all(np.diff(values[order]) >= 0)
    distinct = rng.permutation(3_000).astype(float)  # no ties: every correct sort agrees
    np.testing.assert_array_equal(classic_argsort(distinct), np.argsort(distinct))
    with pytest.raises(ValueError, match="1-D"):
        classic_argsort(np.zeros((2, 2)))


# --- graph and segmentation on small synthetic volumes ---------------------------------------------------


def test_edge_weights_follow_the_published_arithmetic():
    w1, w2, w3, w4 = edge_weights((7.99, 1.25, 1.25))
    s = np.float64(7.99) / np.float64(1.25)
    assert (w1, w2) == (1.0, s**2)
    assert w3 == (np.sqrt(1 + s**2) / np.sqrt(2)) ** 2 and w4 == (np.sqrt(2 + s**2) / np.sqrt(3)) ** 2
    assert w3 == pytest.approx((1 + s**2) / 2, rel=1e-15) and w4 == pytest.approx((2 + s**2) / 3, rel=1e-15)
    with pytest.raises(ValueError, match="spacing"):
        edge_weights((1.0, 0.0, 1.0))


@pytest.mark.parametrize("shape", [(3, 4, 5), (1, 6, 2), (2, 1, 3)])
def test_edge_enumeration_and_costs_match_the_spec_table(shape):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 4, shape).astype(np.float64) * 17.3
    spacing = (7.7, 1.25, 1.25)
    a_ref, b_ref, costs_ref = _reference_graph(image, edge_weights(spacing))
    a, b = edge_endpoints(shape)
    np.testing.assert_array_equal(a, a_ref)
    np.testing.assert_array_equal(b, b_ref)
    np.testing.assert_array_equal(edge_costs(image, spacing), costs_ref)  # bit for bit


def test_felzenszwalb_3d_segments_and_labels_in_root_order():
    image = np.zeros((2, 6, 6))
    image[:, :, 3:] = 255.0  # two flat halves separated by a strong edge
    labels = felzenszwalb_3d(image, (1.0, 1.0, 1.0), min_size=1)
    assert labels.dtype == np.int32 and labels.shape == image.shape
    np.testing.assert_array_equal(labels, (image > 0).astype(np.int32))
    merged = felzenszwalb_3d(image, (1.0, 1.0, 1.0), min_size=image.size // 2 + 1)
    assert np.all(merged == 0)  # the small-segment pass joins both halves
    with pytest.raises(ValueError, match="non-empty"):
        felzenszwalb_3d(np.zeros((0, 3, 3)), (1.0, 1.0, 1.0), min_size=1)
    with pytest.raises(ValueError, match="NaN"):
        felzenszwalb_3d(np.full((2, 2, 2), np.nan), (1.0, 1.0, 1.0), min_size=1)


def test_masking_moves_label_zero_and_clears_background():
    labels = np.array([[[0, 1], [2, 0]]], dtype=np.int32)
    foreground = np.array([[[True, True], [True, False]]])
    np.testing.assert_array_equal(mask_supervoxels(labels, foreground), [[[3, 1], [2, 0]]])
    with pytest.raises(ValueError, match="constant"):
        rescale_to_255(np.ones((2, 2, 2)))


def test_adjusted_rand_index_matches_pair_counting():
    rng = np.random.default_rng(2)
    a, b = rng.integers(0, 3, 40), rng.integers(0, 4, 40)
    assert adjusted_rand_index(a, 7 - a) == 1.0  # same partition, other label values
    pairs = list(combinations(range(a.size), 2))
    same_a = np.array([a[i] == a[j] for i, j in pairs])
    same_b = np.array([b[i] == b[j] for i, j in pairs])
    index, rows, cols = np.sum(same_a & same_b), np.sum(same_a), np.sum(same_b)
    expected = rows * cols / len(pairs)
    assert adjusted_rand_index(a, b) == pytest.approx((index - expected) / ((rows + cols) / 2 - expected))


# --- (b) exact equality with the published supervoxels ------------------------------------------------------


@pytest.mark.parametrize(("dataset", "case_id"), SMALL_CASES)
def test_small_cases_equal_published_supervoxels(data_root, dataset, case_id):
    info = generate_supervoxels.get_dataset_info(dataset)
    image = data_root / dataset / info.image_folder / f"image_{case_id}.nii.gz"
    published = data_root / dataset / info.supervoxel_folder() / f"superpix-MIDDLE_{case_id}.nii.gz"
    result = compare_case(case_id, image, published, info.n_sv)
    assert result.identical, result.line(dataset)


def test_spacing_is_read_from_the_header_text(data_root):
    image = data_root / "CMR" / "cmr_MR_normalized" / "image_4.nii.gz"
    assert read_spacing_zyx(image) == (7.99, 1.25, 1.25)  # not the float32 7.989999771...


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["CMR", "CHAOST2"])
def test_every_case_equals_published_supervoxels(data_root, dataset):
    results = compare(dataset, data_root, jobs=2)
    assert results and all(r.identical for r in results), "\n".join(r.line(dataset) for r in results)


# --- (c, d) command line on a synthetic data root -------------------------------------------------------


def _write_synthetic_root(root: Path, ids=(1, 2)) -> Path:
    folder = root / "CMR" / "cmr_MR_normalized"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(3)
    for case_id in ids:
        volume = np.zeros((3, 24, 24))
        volume[:, 4:20, 4:20] = 100 + 20 * rng.integers(0, 3, (3, 16, 16))
        image = sitk.GetImageFromArray(volume)
        image.SetSpacing((1.25, 1.25, 7.99))
        image.SetOrigin((10.0, -5.0, 2.0))
        sitk.WriteImage(image, str(folder / f"image_{case_id}.nii.gz"))
    return folder


def test_cli_writes_int32_files_with_image_geometry_and_reruns(tmp_path, capsys):
    images = _write_synthetic_root(tmp_path)
    argv = ["--dataset", "CMR", "--data-root", str(tmp_path), "--n-sv", "20"]
    assert generate_supervoxels.main(argv + ["--jobs", "2"]) == 0
    out = tmp_path / "CMR" / "supervoxels_20"
    first = {p.name: sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in sorted(out.iterdir())}
    assert sorted(first) == ["superpix-MIDDLE_1.nii.gz", "superpix-MIDDLE_2.nii.gz"]
    written = sitk.ReadImage(str(out / "superpix-MIDDLE_1.nii.gz"))
    source = sitk.ReadImage(str(images / "image_1.nii.gz"))
    assert written.GetPixelID() == sitk.sitkInt32
    assert written.GetSize() == source.GetSize() and written.GetOrigin() == source.GetOrigin()
    labels = first["superpix-MIDDLE_1.nii.gz"]
    assert labels[:, :4, :].max() == 0 and labels[:, 4:20, 4:20].min() > 0  # background outside the body
    assert generate_supervoxels.main(argv + ["--ids", "1"]) == 0  # re-run over existing files
    again = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "superpix-MIDDLE_1.nii.gz")))
    np.testing.assert_array_equal(again, labels)
    assert sorted(p.name for p in out.iterdir()) == sorted(first)  # no partial files left behind
    assert "CMR case 1" in capsys.readouterr().out


def test_compare_tool_reports_identical_and_differing_cases(tmp_path, capsys):
    _write_synthetic_root(tmp_path)
    argv = ["--dataset", "CMR", "--data-root", str(tmp_path), "--n-sv", "20"]
    generate(dataset="CMR", data_root=tmp_path, n_sv=20)
    assert compare_published.main(argv) == 0
    target = tmp_path / "CMR" / "supervoxels_20" / "superpix-MIDDLE_2.nii.gz"
    tampered = sitk.GetArrayFromImage(sitk.ReadImage(str(target)))
    tampered[0, 10, 10] = tampered.max() + 1
    sitk.WriteImage(sitk.GetImageFromArray(tampered), str(target))
    assert compare_published.main(argv) == 1
    out = capsys.readouterr().out
    assert "CMR case 2: DIFFERS: 1 voxels, ARI" in out and "1/2 cases identical" in out


def test_errors_name_the_problem(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown dataset 'LUNG'"):
        generate("LUNG", tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        generate_supervoxels.main(["--dataset", "LUNG", "--data-root", str(tmp_path)])
    assert exit_info.value.code == 2 and "known datasets" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        generate("CMR", tmp_path / "nowhere")
    folder = _write_synthetic_root(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"case id\(s\) \[9\]"):
        generate("CMR", tmp_path, ids=[9])
    (folder / "image_3.nii.gz").write_bytes(b"not a nifti file")
    with pytest.raises(ValueError, match="image_3.nii.gz"):
        generate("CMR", tmp_path, ids=[3], out=tmp_path / "out")
