"""The dataset table: folds, classes, remaps and names (method.md §1, §5)."""

from __future__ import annotations

import pytest

from dataloaders import (
    DATASETS,
    get_dataset_info,
)

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
