"""TrainDataset episodes (method.md §3)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dataloaders import (
    DATASETS,
    TrainDataset,
    list_cases,
    read_case,
    worker_init_fn,
)
from tests.loader_fixtures import SHAPE, SYN, make_root, synthetic_case


@pytest.fixture(scope="module")
def syn_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Cases 3, 11 (fold 0: test) and 20, 104 (fold 0: training)."""
    return make_root(tmp_path_factory.mktemp("syn"))


def _labels(case_id: int) -> np.ndarray:
    return synthetic_case(case_id)[1]


def _supervoxels(case_id: int) -> np.ndarray:
    return synthetic_case(case_id)[2]


def _train(root: Path, **kwargs: object) -> TrainDataset:
    kwargs.setdefault("length", 64)
    return TrainDataset(SYN, root, eval_fold=0, **kwargs)


def test_episode_shapes_and_binary_masks(syn_root: Path) -> None:
    ds = _train(syn_root, n_shot=2, n_query=1)
    assert len(ds) == 64 and sorted(v.case_id for v in ds.volumes) == [20, 104]
    episode = ds[0]
    h, w = SHAPE[1:]
    assert episode["supp_imgs"].shape == (2, 3, h, w) and episode["supp_imgs"].dtype == torch.float32
    assert episode["supp_masks"].shape == (2, h, w) and episode["supp_masks"].dtype == torch.float32
    assert episode["qry_imgs"].shape == (1, 3, h, w) and episode["qry_imgs"].dtype == torch.float32
    assert episode["qry_labels"].shape == (1, h, w) and episode["qry_labels"].dtype == torch.int64
    for i in range(20):
        episode = ds[i]
        assert set(episode["supp_masks"].unique().tolist()) <= {0.0, 1.0}
        assert set(episode["qry_labels"].unique().tolist()) <= {0, 1}
        assert torch.equal(episode["supp_imgs"][:, 0], episode["supp_imgs"][:, 2])  # repeated channel
        assert torch.isfinite(episode["qry_imgs"]).all()
    two_queries = _train(syn_root, n_shot=1, n_query=2)[0]
    assert two_queries["qry_imgs"].shape == (2, 3, h, w) and two_queries["qry_labels"].shape == (2, h, w)
    assert len(two_queries["slice_indices"]) == 3


def test_augmentation_changes_supports_or_queries_only_when_on(syn_root: Path) -> None:
    plain, augmented = _train(syn_root, augment=False, seed=1), _train(syn_root, augment=True, seed=1)
    for i in range(10):
        a, b = plain[i], augmented[i]
        assert not (torch.equal(a["supp_imgs"], b["supp_imgs"]) and torch.equal(a["qry_imgs"], b["qry_imgs"]))
        # gamma and geometry each hit the supports or the queries: the untouched masks are unchanged
        masks_same = (
            torch.equal(a["supp_masks"], b["supp_masks"]),
            torch.equal(a["qry_labels"], b["qry_labels"]),
        )
        assert any(masks_same)


def test_episodes_carry_the_drawn_class_with_min_size(syn_root: Path) -> None:
    ds = _train(syn_root, augment=False, n_shot=1)
    seen = set()
    for i in range(40):
        episode = ds[i]
        slices = episode["slice_indices"].numpy()
        class_id = episode["class_id"]
        seen.add(class_id)
        sv = _supervoxels(episode["case_id"])
        assert np.all(np.diff(np.sort(slices)) == 1)  # S + Q consecutive slices
        np.testing.assert_array_equal(episode["supp_masks"].numpy(), sv[slices[:1]] == class_id)
        np.testing.assert_array_equal(episode["qry_labels"].numpy(), sv[slices[1:]] == class_id)
        # step 4: at least min_size pixels on one of the first two slices (both slices here)
        sizes = (sv[np.sort(slices)[:2]] == class_id).sum(axis=(1, 2))
        assert sizes.max() >= 200 and sizes.min() > 0
    # id 12 covers 16 pixels, below min_size: never drawn; 5 and 9 are
    assert seen == {5, 9}


def test_slice_order_is_reversed_about_half_the_time(syn_root: Path) -> None:
    ds = _train(syn_root, augment=False)
    reversed_ = [int(ds[i]["slice_indices"][0] > ds[i]["slice_indices"][1]) for i in range(64)]
    assert 10 < sum(reversed_) < 54


def test_setting2_any_excludes_every_slice_with_a_test_label(syn_root: Path) -> None:
    ds = _train(syn_root, exclude_label=[1, 2], exclusion="any")
    for i in range(40):
        episode = ds[i]
        labels = _labels(episode["case_id"])[episode["slice_indices"].numpy()]
        assert not np.isin(labels, [1, 2]).any()
    # 'all' (official code) keeps slices holding only one of them (label 1 without 2, e.g. slices 2..5)
    official = _train(syn_root, exclude_label=[1, 2], exclusion="all")
    holds_one = False
    for i in range(40):
        episode = official[i]
        labels = _labels(episode["case_id"])[episode["slice_indices"].numpy()]
        per_slice = [(np.isin(1, s), np.isin(2, s)) for s in labels]
        assert not any(a and b for a, b in per_slice)
        holds_one |= any(a or b for a, b in per_slice)
    assert holds_one
    with pytest.raises(ValueError, match="exclusion"):
        TrainDataset(SYN, syn_root, eval_fold=0, exclusion="or")
    with pytest.raises(ValueError, match="unknown class values"):
        TrainDataset(SYN, syn_root, eval_fold=0, exclude_label=[9])


def test_use_gt_never_draws_test_labels(syn_root: Path) -> None:
    ds = _train(syn_root, use_gt=True, test_labels=(1,), min_size=100, augment=False)
    # label 3 (16 pixels) never reaches min_size and label 1 is a test label: only label 2 remains
    assert {ds[i]["class_id"] for i in range(20)} == {2}
    with pytest.raises(ValueError, match="no episode can be drawn"):
        _train(syn_root, use_gt=True)  # CHAOST2-like test labels 1..4 are every label


def test_bounded_retries_end_in_clear_errors(syn_root: Path) -> None:
    with pytest.raises(ValueError, match="no episode can be drawn.*with at least 5000 pixels"):
        _train(syn_root, min_size=5000)
    ds = _train(syn_root, max_tries=1)
    with pytest.raises(RuntimeError, match=r"no episode after 1 tries: .*had fewer than 200"):
        for i in range(64):
            ds[i]
    with pytest.raises(IndexError):
        ds[64]


def test_same_seed_same_episodes_regardless_of_workers(syn_root: Path) -> None:
    first, second, other = (_train(syn_root, seed=s, length=8) for s in (3, 3, 4))
    direct = [first[i] for i in range(8)]
    for i in range(8):
        for key in ("supp_imgs", "supp_masks", "qry_imgs", "qry_labels", "slice_indices"):
            assert torch.equal(direct[i][key], second[i][key])
    assert any(not torch.equal(direct[i]["qry_imgs"], other[i]["qry_imgs"]) for i in range(8))
    batches = list(DataLoader(second, batch_size=2, num_workers=2, worker_init_fn=worker_init_fn))
    for b, batch in enumerate(batches):
        for j in range(2):
            assert torch.equal(batch["qry_imgs"][j], direct[2 * b + j]["qry_imgs"])
            assert batch["class_id"][j] == direct[2 * b + j]["class_id"]


def test_image_size_resizes_and_case_ids_restrict(syn_root: Path) -> None:
    ds = _train(syn_root, image_size=32, min_size=50, case_ids=[104])
    episode = ds[0]
    assert episode["supp_imgs"].shape == (1, 3, 32, 32) and episode["qry_labels"].shape == (1, 32, 32)
    assert {ds[i]["case_id"] for i in range(10)} == {104}
    with pytest.raises(ValueError, match=r"case_ids \[3\] are not training cases of fold 0"):
        _train(syn_root, case_ids=[3])


def test_bad_data_root_fails_at_construction(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        TrainDataset("CHAOST2", tmp_path, eval_fold=0)


def _real(data_root: Path, name: str) -> Path:
    if not (data_root / name / DATASETS[name].image_folder).is_dir():
        pytest.skip(f"real {name} copy not found under {data_root}")
    return data_root


def test_real_chaost2_setting2_episodes(data_root: Path) -> None:
    root = _real(data_root, "CHAOST2")
    ds = TrainDataset("CHAOST2", root, eval_fold=0, exclude_label=[1, 2, 3, 4], case_ids=[10, 13], length=30)
    labels = {c.case_id: read_case(c, "CHAOST2").label.array for c in list_cases("CHAOST2", root)[5:7]}
    assert sorted(labels) == [10, 13]
    for i in range(30):
        episode = ds[i]
        assert episode["supp_imgs"].shape == (1, 3, 256, 256)
        slices = episode["slice_indices"].numpy()
        assert not np.isin(labels[episode["case_id"]][slices], [1, 2, 3, 4]).any()
        assert episode["supp_masks"].sum() > 0 or episode["qry_labels"].sum() > 0
