"""SSL-ALPNet's 2-D superpixels (data/superpixels/generate_superpixels.py) against a loop-for-loop port of its
notebook (tests/naive_superpixels.py), on real volumes of the shared data, and the command's files."""

from __future__ import annotations

import numpy as np
import pytest

from data.superpixels import generate_superpixels as gen
from dataloaders import read_volume
from tests import naive_superpixels as naive


def test_relabelling_keeps_the_notebooks_gap_and_drops_superpixel_zero():
    segments = np.array([[0, 1, 2, 3], [3, 2, 1, 0]])
    mask = np.array([[True, True, True, True], [True, True, False, True]])
    expected = naive.renumber(segments.copy(), mask)
    got = gen.relabel_superpixels(segments, mask)
    assert np.array_equal(got, expected)
    assert got.tolist() == [[0, 1, 2, 4], [4, 2, 0, 0]]  # 3 -> 4: the notebook's gap at 3
    assert not gen.relabel_superpixels(np.zeros((2, 2), int), np.ones((2, 2), bool)).any()


@pytest.mark.parametrize(
    "dataset, case_id, z",
    [("CHAOST2", 1, slice(None)), ("SABS", 0, slice(60, 80)), ("CMR", 1, slice(None))],
)
def test_superpixels_equal_the_notebooks_on_real_volumes(data_root, dataset, case_id, z):
    folder = {"CHAOST2": "chaos_MR_T2_normalized", "SABS": "sabs_CT_normalized", "CMR": "cmr_MR_normalized"}
    path = data_root / dataset / folder[dataset] / f"image_{case_id}.nii.gz"
    volume, _ = read_volume(path)
    volume = volume[z]
    threshold = gen.FOREGROUND_THRESHOLDS[dataset]
    want_masks, want = naive.superpixels(volume, threshold)
    got, masks = gen.superpixels_of(volume, threshold)
    assert np.array_equal(masks, want_masks.astype(bool))
    assert np.array_equal(got, want)  # same ids, not only the same partition
    assert got.max() > 10  # real superpixels, not an empty volume


def test_command_writes_the_loaders_layout_on_the_images_grid(data_root, tmp_path):
    out = tmp_path / "CHAOST2" / gen.SUPERPIXEL_FOLDER
    argv = ["--dataset", "CHAOST2", "--data-root", str(data_root), "--ids", "2", "--out", str(out)]
    assert gen.main(argv) == 0
    image_path = data_root / "CHAOST2" / "chaos_MR_T2_normalized" / "image_2.nii.gz"
    labels, geometry = read_volume(out / "superpix-MIDDLE_2.nii.gz")
    masks, _ = read_volume(out / "fgmask_2.nii.gz")
    image, image_geometry = read_volume(image_path)
    assert labels.dtype == np.int32 and labels.shape == image.shape and geometry == image_geometry
    assert np.array_equal(labels, naive.superpixels(image, gen.FOREGROUND_THRESHOLDS["CHAOST2"])[1])
    assert masks.dtype == np.uint8 and set(np.unique(masks)) <= {0, 1}
    assert sorted(p.name for p in out.iterdir()) == ["fgmask_2.nii.gz", "superpix-MIDDLE_2.nii.gz"]


def test_command_refuses_bad_options_before_making_anything(data_root, tmp_path, capsys):
    out = tmp_path / "new" / "folder"
    for argv in (["--dataset", "NOPE"], ["--ids", "999"], ["--jobs", "0"]):
        with pytest.raises(SystemExit) as stop:
            gen.main(["--dataset", "CHAOST2", "--data-root", str(data_root), "--out", str(out), *argv])
        assert stop.value.code == 2
        assert not (tmp_path / "new").exists()
    assert "no image for case id(s) [999]" in capsys.readouterr().err
