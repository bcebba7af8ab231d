"""TrainDataset(sampling='ssl_alpnet'): SSL-ALPNet's episode law against a loop port of its sampler
(tests/naive_ssl_alpnet_sampler.py), on synthetic 2-D superpixels; 2-D superpixel files read through
pseudo_labels='superpixels_2d', from files the command writes for 2 real CHAOST2 cases."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from data.superpixels import generate_superpixels as gen
from dataloaders import TrainDataset, list_cases, read_case, read_volume, write_volume
from dataloaders.ssl_alpnet_sampling import slice_law
from tests.loader_fixtures import SHAPE, SYN, make_root, synthetic_case, write
from tests.naive_ssl_alpnet_sampler import NaiveSuperpixelSampler

TRAINING = (20, 104)  # fold 0 of the synthetic root
N_DRAWS = 6000


def _designed_ids(case_id: int) -> np.ndarray:
    """Slices 0, 1 without id (and slice 11 of case 104); slice z >= 2 holds ids 1 .. K-2 and K (the
    notebook's gap at K - 1) with K = 2 + z % 4, one 8-pixel-wide band each."""
    ids = np.zeros(SHAPE, dtype=np.int32)
    for z in range(2, SHAPE[0]):
        top = 2 + z % 4
        for band, value in enumerate([*range(1, top - 1), top]):
            ids[z, :, 8 * band : 8 * band + 8] = value
    if case_id == 104:
        ids[11] = 0
    return ids


@pytest.fixture(scope="module")
def sp_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_root(tmp_path_factory.mktemp("syn2d"))
    folder = root / SYN.name / "superpixels_2d"
    folder.mkdir()
    for case_id in (3, 11, *TRAINING):
        write(_designed_ids(case_id), folder / SYN.supervoxel_pattern.format(id=case_id))
    return root


def _train(root: Path, **kwargs: object) -> TrainDataset:
    kwargs.setdefault("length", N_DRAWS)
    kwargs.setdefault("augment", False)
    kwargs.setdefault("sampling", "ssl_alpnet")
    return TrainDataset(SYN, root, eval_fold=0, pseudo_labels="superpixels_2d", **kwargs)


def _excluded(labels: tuple[int, ...]) -> dict[int, list[int]]:
    """The official per-scan lists of slices holding any of ``labels`` (classmap_1.json)."""
    return {
        c: [int(z) for z in np.flatnonzero(np.isin(synthetic_case(c)[1], labels).any(axis=(1, 2)))]
        for c in TRAINING
    }


def _exact_law(excluded: dict[int, list[int]]) -> dict[tuple[int, int, int], float]:
    """P(case, slice, id): the slice law of the official loop (hand-derived, below) times 1 / (max_id - 1)."""
    max_ids = np.concatenate([_designed_ids(c).max(axis=(1, 2)) for c in TRAINING])
    allowed = np.concatenate([~np.isin(np.arange(SHAPE[0]), excluded.get(c, [])) for c in TRAINING])
    law, out = slice_law(max_ids, allowed), {}
    for j, p in enumerate(law):
        case, z = TRAINING[j // SHAPE[0]], j % SHAPE[0]
        for class_id in range(1, int(max_ids[j])):
            out[(case, z, class_id)] = p / (max_ids[j] - 1)
    return {key: p for key, p in out.items() if p > 0}


def _chi_square_p(draws: list[tuple[int, int, int]], law: dict[tuple[int, int, int], float]) -> float:
    keys = sorted(law)
    assert set(draws) <= set(keys), sorted(set(draws) - set(keys))[:5]
    counts = np.array([sum(d == k for d in draws) for k in keys], dtype=float)
    expected = np.array([law[k] for k in keys]) * len(draws)
    return float(chisquare(counts, expected).pvalue)


def test_slice_law_closed_form_by_hand() -> None:
    # f(u) = [2, 2, 2, 3, 5, 5]; slice 3 excluded: 1/6 of first draws are redrawn in 0..4 (f: 2, 2, 2, 3, 5)
    law = slice_law(np.array([0, 0, 3, 5, 0, 4]), np.array([1, 1, 1, 0, 1, 1], dtype=bool))
    np.testing.assert_allclose(
        law, [0, 0, 3 / 6 + (1 / 6) * (3 / 5) / (4 / 5), 0, 0, 2 / 6 + (1 / 6) * (1 / 5) / (4 / 5)]
    )
    # the last slice without id passes cyclically to the first with one
    np.testing.assert_allclose(slice_law(np.array([2, 0, 0]), np.ones(3, dtype=bool)), [1, 0, 0])
    with pytest.raises(ValueError, match="loop forever"):
        slice_law(np.array([3, 3, 3]), np.array([0, 0, 1], dtype=bool))  # only the last, never redrawn
    with pytest.raises(ValueError, match="no slice"):
        slice_law(np.zeros(4), np.ones(4, dtype=bool))


@pytest.mark.parametrize("exclude", [None, (1, 2), (2,)])
def test_slices_and_ids_follow_the_official_law(sp_root: Path, exclude: tuple[int, ...] | None) -> None:
    excluded = _excluded(exclude) if exclude else {}
    law = _exact_law(excluded)
    scans = {c: _designed_ids(c) for c in TRAINING}
    naive, rng = NaiveSuperpixelSampler(scans, excluded), np.random.default_rng(7)
    naive_draws = [naive.draw(rng)[:3] for _ in range(N_DRAWS)]
    ds = _train(sp_root, exclude_label=list(exclude) if exclude else None)
    ours = [ds[i] for i in range(N_DRAWS)]
    our_draws = [(e["case_id"], int(e["slice_indices"][0]), e["class_id"]) for e in ours]
    assert _chi_square_p(naive_draws, law) > 1e-3  # the closed form is the loop's law
    assert _chi_square_p(our_draws, law) > 1e-3  # and our draws follow it
    # the largest id is never drawn; the gap id (K - 1) is, with an empty mask
    tops = {(c, z): scans[c][z].max() for c in TRAINING for z in range(SHAPE[0])}
    assert all(class_id < tops[(c, z)] for c, z, class_id in our_draws)
    gaps = [e for e, (c, z, k) in zip(ours, our_draws, strict=True) if k == tops[(c, z)] - 1]
    assert gaps and all(e["supp_masks"].sum() == 0 for e in gaps)
    if exclude:
        for c, z, _ in our_draws:
            assert not np.isin(synthetic_case(c)[1][z], exclude).any()


def test_support_and_query_are_one_slice_augmented_independently(sp_root: Path) -> None:
    plain, augmented = _train(sp_root, length=30), _train(sp_root, length=30, augment=True)
    h, w = SHAPE[1:]
    for i in range(30):
        a, b = plain[i], augmented[i]
        assert a["supp_imgs"].shape == (1, 3, h, w) and a["qry_labels"].shape == (1, h, w)
        assert torch.equal(a["supp_imgs"], a["qry_imgs"])
        assert torch.equal(a["supp_masks"].long(), a["qry_labels"])
        z = int(a["slice_indices"][0])
        want = _designed_ids(a["case_id"])[z] == a["class_id"]
        np.testing.assert_array_equal(a["supp_masks"][0].numpy(), want)
        assert (b["case_id"], int(b["slice_indices"][0]), b["class_id"]) == (a["case_id"], z, a["class_id"])
        assert not torch.equal(b["supp_imgs"], b["qry_imgs"])  # two independent draws
        assert set(b["qry_labels"].unique().tolist()) <= {0, 1}
    assert torch.equal(
        _train(sp_root, length=4, seed=3)[2]["supp_imgs"], _train(sp_root, length=4, seed=3)[2]["supp_imgs"]
    )


def test_ssl_alpnet_sampling_refusals(sp_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="expected n_shot=1, n_query=1, use_gt=False"):
        _train(sp_root, n_shot=2)
    with pytest.raises(ValueError, match="sampling must be one of"):
        TrainDataset(SYN, sp_root, eval_fold=0, sampling="panet")
    with pytest.raises(ValueError, match="pseudo_labels must be one of"):
        TrainDataset(SYN, sp_root, eval_fold=0, pseudo_labels="superpixels")
    with pytest.raises(ValueError, match="loop forever"):
        _train(sp_root, exclude_label=[3])  # label 3 is on every slice
    root = make_root(tmp_path)
    shutil.copytree(sp_root / SYN.name / "superpixels_2d", root / SYN.name / "superpixels_2d")
    ids = _designed_ids(20)
    ids[5] = np.where(ids[5] > 0, 1, 0)
    bad = root / SYN.name / "superpixels_2d" / "superpix-MIDDLE_20.nii.gz"
    write(ids, bad)
    with pytest.raises(ValueError, match=r"superpix-MIDDLE_20\.nii\.gz: slice 5 has largest id 1"):
        _train(root)
    # the ADNet-lineage sampler reads the 2-D files as well
    assert _train(sp_root, sampling="adnet", length=4, min_size=10)[0]["supp_imgs"].shape[0] == 1


@pytest.fixture(scope="module")
def chaos_2d(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CHAOST2 root of its first 2 cases (links) with 2-D superpixels written by the command."""
    root = tmp_path_factory.mktemp("chaos2d")
    image_dir = root / "CHAOST2" / "chaos_MR_T2_normalized"
    image_dir.mkdir(parents=True)
    cases = list_cases("CHAOST2", data_root)[:2]
    for case in cases:
        (image_dir / case.image.name).symlink_to(case.image)
        (image_dir / case.label.name).symlink_to(case.label)
    ids = [str(c.case_id) for c in cases]
    assert gen.main(["--dataset", "CHAOST2", "--data-root", str(root), "--ids", *ids]) == 0
    return root


def _copy(root: Path, to: Path) -> Path:
    """A copy of ``root`` whose links stay links (the images), so one file can be damaged."""
    shutil.copytree(root, to, symlinks=True)
    return to


def test_superpixels_2d_files_are_read_and_checked(chaos_2d: Path, tmp_path: Path) -> None:
    cases = list_cases("CHAOST2", chaos_2d, supervoxels=True, pseudo_labels="superpixels_2d")
    assert [c.supervoxel.parent.name for c in cases] == ["superpixels_2d"] * 2
    case = read_case(cases[0], "CHAOST2")
    written, geometry = read_volume(cases[0].supervoxel)
    assert case.supervoxel.array.dtype == np.int32 and np.array_equal(case.supervoxel.array, written)
    assert case.supervoxel.array.shape == case.image.array.shape and case.supervoxel.array.max() > 10
    with pytest.raises(FileNotFoundError, match="supervoxels_5000"):
        list_cases("CHAOST2", chaos_2d, supervoxels=True)  # the 3-D kind is another folder
    first, second = (c.case_id for c in cases)

    missing = _copy(chaos_2d, tmp_path / "missing")
    (missing / "CHAOST2" / "superpixels_2d" / f"superpix-MIDDLE_{second}.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match=rf"superpix-MIDDLE_{second}\.nii\.gz \(partner of .*image_"):
        list_cases("CHAOST2", missing, supervoxels=True, pseudo_labels="superpixels_2d")
    shutil.rmtree(missing / "CHAOST2" / "superpixels_2d")
    with pytest.raises(FileNotFoundError, match="2-D superpixel folder not found.*generate_superpixels"):
        list_cases("CHAOST2", missing, supervoxels=True, pseudo_labels="superpixels_2d")

    damaged = _copy(chaos_2d, tmp_path / "damaged")
    path = damaged / "CHAOST2" / "superpixels_2d" / f"superpix-MIDDLE_{first}.nii.gz"
    write_volume(written[:, :-1], geometry, path)
    listed = list_cases("CHAOST2", damaged, supervoxels=True, pseudo_labels="superpixels_2d")
    with pytest.raises(ValueError, match=rf"shape mismatch: {path}.*its image .*image_{first}\.nii\.gz"):
        read_case(listed[0], "CHAOST2")
    write(written, path, spacing=(1.0, 1.0, 1.0))  # the default geometry: accepted for 3-D files only
    with pytest.raises(ValueError, match=rf"geometry mismatch: {path}.*its image .*image_{first}\.nii\.gz"):
        read_case(listed[0], "CHAOST2")


def test_real_chaost2_ssl_alpnet_episodes(chaos_2d: Path) -> None:
    with pytest.warns(UserWarning, match="found 2 of its 20 volumes"):
        ds = TrainDataset(
            "CHAOST2",
            chaos_2d,
            eval_fold=2,
            pseudo_labels="superpixels_2d",
            sampling="ssl_alpnet",
            image_size=64,
            length=40,
            exclude_label=[1, 2, 3, 4],
        )
    labels = {c.case_id: read_case(c, "CHAOST2").label.array for c in list_cases("CHAOST2", chaos_2d)}
    tops = {v.case_id: v.max_ids for v in ds.volumes}
    for i in range(40):
        episode = ds[i]
        z = int(episode["slice_indices"][0])
        assert episode["supp_imgs"].shape == (1, 3, 64, 64) and episode["qry_labels"].shape == (1, 64, 64)
        assert 1 <= episode["class_id"] < tops[episode["case_id"]][z]
        assert not np.isin(labels[episode["case_id"]][z], [1, 2, 3, 4]).any()
