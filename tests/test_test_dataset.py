"""The TestDataset protocol: support slices, query chunks, preloading (method.md §5)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from dataloaders import (
    DATASETS,
    TestDataset,
    chunk_bounds,
    normalize_volume,
    support_slice_indices,
)
from tests.loader_fixtures import SHAPE, SYN, make_root, synthetic_case


def _labels(case_id: int) -> np.ndarray:
    return synthetic_case(case_id)[1]


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


@pytest.fixture(scope="module")
def syn_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Cases 3, 11 (fold 0: test) and 20, 104 (fold 0: training)."""
    return make_root(tmp_path_factory.mktemp("syn"))


def test_test_dataset_protocol_on_synthetic_volumes(syn_root: Path) -> None:
    ds = TestDataset(SYN, syn_root, eval_fold=0, test_label=1, supp_idx=0, n_part=3)
    support = ds.support()
    # fold 0 = positions (0, 1) = cases 3, 11; label 1 lies on slices 2..7 (6 labelled slices)
    assert support["case_id"] == 3 and len(ds) == 1
    assert support["slice_indices"].tolist() == [3, 5, 7]  # positions int(6 * (1/6, 1/2, 5/6)) = 1, 3, 5
    assert support["imgs"].shape == (3, 3, *SHAPE[1:]) and support["masks"].shape == (3, *SHAPE[1:])
    image, label, _ = synthetic_case(3)
    np.testing.assert_allclose(support["imgs"][:, 1].numpy(), normalize_volume(image)[[3, 5, 7]], atol=1e-6)
    np.testing.assert_array_equal(support["masks"].numpy(), label[[3, 5, 7]] == 1)

    (query,) = list(ds)
    assert query["case_id"] == 11 and query["native_shape"] == SHAPE
    assert query["slice_indices"].tolist() == [2, 3, 4, 5, 6, 7]
    assert query["chunks"] == [(0, 2), (2, 4), (4, 6)] and query["chunk_support"] == [0, 1, 2]
    assert query["labels"].shape == (6, *SHAPE[1:]) and query["labels"].dtype == torch.int64
    np.testing.assert_array_equal(query["labels"].numpy(), _labels(11)[2:8] == 1)
    assert query["geometry"].spacing == (1.5, 1.5, 5.0)

    swapped = TestDataset(SYN, syn_root, eval_fold=0, test_label=2, supp_idx=1, n_part=1, image_size=32)
    support = swapped.support()
    assert support["case_id"] == 11 and swapped[0]["case_id"] == 3
    assert support["slice_indices"].tolist() == [8]  # label 2 on slices 6..9: position int(4 / 2) = 2
    assert support["imgs"].shape == (1, 3, 32, 32) and support["masks"].shape == (1, 32, 32)
    query = swapped[0]
    assert query["imgs"].shape == (4, 3, 32, 32) and query["labels"].shape == (4, *SHAPE[1:])


def test_test_dataset_errors(syn_root: Path) -> None:
    with pytest.raises(ValueError, match="no SPLEEN"):
        TestDataset(SYN, syn_root, eval_fold=0, test_label=4)
    with pytest.raises(ValueError, match="supp_idx 2 out of range"):
        TestDataset(SYN, syn_root, eval_fold=0, test_label=1, supp_idx=2)
    with pytest.raises(ValueError, match="unknown class values"):
        TestDataset(SYN, syn_root, eval_fold=0, test_label=6)


def _real(data_root: Path, name: str) -> Path:
    if not (data_root / name / DATASETS[name].image_folder).is_dir():
        pytest.skip(f"real {name} copy not found under {data_root}")
    return data_root


def test_real_test_datasets(data_root: Path) -> None:
    root = _real(data_root, "CHAOST2")
    ds = TestDataset("CHAOST2", root, eval_fold=0, test_label=1, supp_idx=0, image_size=64)
    assert ds.support()["imgs"].shape == (3, 3, 64, 64)
    assert [c.case_id for c in ds.query_cases] == [2, 3, 5, 8]
    query = ds[0]
    count = len(query["slice_indices"])
    assert query["imgs"].shape == (count, 3, 64, 64) and query["labels"].shape == (count, 256, 256)
    assert query["chunks"][-1][1] == count and query["labels"].flatten(1).any(dim=1).all()
    sabs = TestDataset("SABS", _real(data_root, "SABS"), eval_fold=0, test_label=6)
    assert sabs.support()["imgs"].shape == (3, 3, 257, 257)
    assert sabs.support()["case_id"] == 0


def test_preloaded_queries_equal_those_read_on_demand(rk_sets):
    on_demand, preloaded = rk_sets
    assert len(preloaded) == 1 and preloaded.query_cases == on_demand.query_cases[:1]
    read, kept = on_demand[0], preloaded[0]
    for key in ("imgs", "labels", "slice_indices"):
        assert kept[key].dtype == read[key].dtype and torch.equal(kept[key], read[key]), key
    for key in ("case_id", "chunks", "chunk_support", "geometry", "native_shape"):
        assert kept[key] == read[key], key
    assert kept["native_image"] is None and read["native_image"].shape == read["native_shape"]
