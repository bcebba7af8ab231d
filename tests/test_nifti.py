"""The two NIfTI backends of dataloaders/nifti.py (SimpleITK and nibabel) agree on real files, read each
other's output, fail alike on broken files, and a training episode can be drawn without SimpleITK."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dataloaders import Geometry, TrainDataset, read_header, read_volume, write_volume
from dataloaders.cases import dataset_folders
from dataloaders.nifti import select_nifti_backend
from tests.damage import flip_silent_bit

pytest.importorskip("SimpleITK")
pytest.importorskip("nibabel")

REPO = Path(__file__).resolve().parents[1]
#: Two real cases per dataset: CHAOST2/CMR float64 volumes (CMR labels stored as 200/500/600, oblique
#: directions), SABS uint8 images with float32 labels.
CASES = [("CHAOST2", 1), ("CHAOST2", 2), ("CMR", 1), ("CMR", 2), ("SABS", 0), ("SABS", 1)]
#: Geometry tolerance: ITK and nibabel derive the cosines from the same float32 header fields.
GEOMETRY_ATOL = 1e-6


def _case_paths(data_root: Path, dataset: str, case_id: int) -> list[Path]:
    image_dir, _ = dataset_folders(dataset, data_root)
    return [image_dir / f"image_{case_id}.nii.gz", image_dir / f"label_{case_id}.nii.gz"]


def _assert_same_geometry(ours: Geometry, reference: Geometry) -> None:
    for field in ("spacing", "origin", "direction"):
        np.testing.assert_allclose(
            getattr(ours, field), getattr(reference, field), rtol=0, atol=GEOMETRY_ATOL, err_msg=field
        )


def _assert_same_volume(ours: tuple[np.ndarray, Geometry], reference: tuple[np.ndarray, Geometry]) -> None:
    assert ours[0].dtype == reference[0].dtype
    assert ours[0].shape == reference[0].shape
    assert np.array_equal(ours[0], reference[0])
    _assert_same_geometry(ours[1], reference[1])


@pytest.mark.parametrize(("dataset", "case_id"), CASES)
def test_nibabel_reads_like_simpleitk(data_root: Path, dataset: str, case_id: int) -> None:
    for path in _case_paths(data_root, dataset, case_id):
        reference = read_volume(path, backend="sitk")
        ours = read_volume(path, backend="nibabel")
        _assert_same_volume(ours, reference)
        assert ours[0].flags.c_contiguous
        shape, geometry = read_header(path, backend="nibabel")
        assert shape == reference[0].shape
        _assert_same_geometry(geometry, reference[1])
    if dataset == "CMR":  # stored label values, not yet remapped
        assert set(np.unique(ours[0])) <= {0.0, 200.0, 500.0, 600.0} and ours[0].max() > 0
    if dataset == "SABS":
        image_path = _case_paths(data_root, dataset, case_id)[0]
        assert reference[0].dtype == np.float32  # the label
        assert read_volume(image_path, backend="nibabel")[0].dtype == np.uint8


@pytest.mark.parametrize(("dataset", "case_id"), CASES[::2])
def test_round_trip_between_backends(data_root: Path, tmp_path: Path, dataset: str, case_id: int) -> None:
    for path in _case_paths(data_root, dataset, case_id):
        array, geometry = read_volume(path, backend="sitk")
        for writer, reader in (("nibabel", "sitk"), ("sitk", "nibabel")):
            out = tmp_path / f"{writer}_{path.name}"
            write_volume(array, geometry, out, backend=writer)
            _assert_same_volume(read_volume(out, backend=reader), (array, geometry))


def test_scaled_and_header_only_files(tmp_path: Path) -> None:
    # scl_slope/scl_inter: ITK rescales into float32; no qform/sform: origin 0 and identity cosines
    nib = pytest.importorskip("nibabel")
    data = np.arange(60, dtype=np.int16).reshape(3, 4, 5)
    scaled = nib.Nifti1Image(data, np.diag([-2.0, -3.0, 4.0, 1.0]))
    scaled.header.set_slope_inter(2.0, -1.0)
    nib.save(scaled, str(tmp_path / "scaled.nii.gz"))
    bare = nib.Nifti1Image(data, np.diag([2.0, 3.0, 4.0, 1.0]))
    bare.set_qform(None, code=0)
    bare.set_sform(None, code=0)
    nib.save(bare, str(tmp_path / "bare.nii"))
    for name in ("scaled.nii.gz", "bare.nii"):
        reference = read_volume(tmp_path / name, backend="sitk")
        _assert_same_volume(read_volume(tmp_path / name, backend="nibabel"), reference)
    assert reference[1].origin == (0.0, 0.0, 0.0) and reference[1].spacing == (2.0, 3.0, 4.0)


@pytest.mark.parametrize("backend", ["nibabel", "sitk"])
def test_broken_files_raise_naming_the_file(data_root: Path, tmp_path: Path, backend: str) -> None:
    source = _case_paths(data_root, "CHAOST2", 1)[1]
    with pytest.raises(FileNotFoundError, match=r"missing_1\.nii\.gz"):
        read_volume(tmp_path / "missing_1.nii.gz", backend=backend)
    garbage = tmp_path / "garbage_1.nii.gz"
    garbage.write_bytes(b"not a NIfTI volume" * 40)
    with pytest.raises(ValueError, match=r"cannot read .*garbage_1\.nii\.gz"):
        read_volume(garbage, backend=backend)
    with pytest.raises(ValueError, match=r"cannot read the header of .*garbage_1\.nii\.gz"):
        read_header(garbage, backend=backend)
    compressed = source.read_bytes()
    truncated = tmp_path / "truncated_1.nii.gz"
    truncated.write_bytes(compressed[: len(compressed) // 2])
    with pytest.raises(ValueError, match=r"truncated_1\.nii\.gz is truncated"):
        read_volume(truncated, backend=backend)
    # damaged bytes: 64 zeroed bytes break the DEFLATE stream; one flipped bit that leaves it decodable
    # (same length) is caught only by the gzip CRC-32, which neither library checks on its own
    damaged = bytearray(compressed)
    middle = len(damaged) // 2
    damaged[middle : middle + 64] = bytes(64)
    (tmp_path / "damaged_1.nii.gz").write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match=r"damaged_1\.nii\.gz is corrupt"):
        read_volume(tmp_path / "damaged_1.nii.gz", backend=backend)
    flipped = tmp_path / "flipped_1.nii.gz"
    flipped.write_bytes(compressed)
    flip_silent_bit(flipped)
    assert flipped.stat().st_size == len(compressed)
    with pytest.raises(ValueError, match=r"flipped_1\.nii\.gz is corrupt \(gzip CRC-32 mismatch\)"):
        read_volume(flipped, backend=backend)
    # a 2-D file is no volume
    array, geometry = read_volume(source, backend=backend)
    flat = tmp_path / "flat_1.nii.gz"
    nib = pytest.importorskip("nibabel")
    nib.save(nib.Nifti1Image(array[0].T.copy(), np.eye(4)), str(flat))
    with pytest.raises(ValueError, match=r"flat_1\.nii\.gz: expected a scalar 3-D volume"):
        read_volume(flat, backend=backend)
    with pytest.raises(ValueError, match=r"write_volume: expected a \(Z, H, W\) array"):
        write_volume(array[0], geometry, tmp_path / "out.nii.gz", backend=backend)


def test_backend_names() -> None:
    assert select_nifti_backend("NiBabel") == "nibabel"
    assert select_nifti_backend(None) == "sitk"  # SimpleITK is importable in this process
    with pytest.raises(ValueError, match=r"unknown NIfTI backend 'itk'.*sitk.*nibabel"):
        select_nifti_backend("itk")


#: Run in a fresh interpreter where ``import SimpleITK`` fails: draw one episode, save a prediction.
NO_SITK_SCRIPT = """
import json, sys
sys.modules["SimpleITK"] = None  # any import of SimpleITK now raises ImportError
import numpy as np
import dataloaders, dataloaders.nifti, dataloaders.volume, engine.evaluation as evaluation, train, test
from dataloaders import TrainDataset, read_volume
assert dataloaders.nifti.NIFTI_BACKEND == "nibabel", dataloaders.nifti.NIFTI_BACKEND
root, out = sys.argv[1], sys.argv[2]
ds = TrainDataset("CHAOST2", root, eval_fold=0, case_ids=[10, 13], image_size=64, length=4, seed=3)
episode = ds[1]
case = dataloaders.list_cases("CHAOST2", root)[0]
label, geometry = read_volume(case.label)
evaluation.save_prediction_nifti(label[5:7] > 0, np.array([5, 6]), label.shape, geometry, out)
try:
    dataloaders.volume.require_simpleitk("preprocessing")
except ImportError as err:
    message = str(err)
print(json.dumps({
    "qry_imgs": float(episode["qry_imgs"].double().sum()), "supp_masks": float(episode["supp_masks"].sum()),
    "class_id": int(episode["class_id"]), "shape": list(episode["qry_imgs"].shape), "message": message,
}))
"""


def test_training_episode_and_prediction_without_simpleitk(data_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "pred_1.nii.gz"
    result = subprocess.run(
        [sys.executable, "-c", NO_SITK_SCRIPT, str(data_root), str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert "preprocessing needs SimpleITK" in found["message"]
    # the same episode drawn here, with SimpleITK reading the files
    ds = TrainDataset("CHAOST2", data_root, eval_fold=0, case_ids=[10, 13], image_size=64, length=4, seed=3)
    episode = ds[1]
    assert found["shape"] == [1, 3, 64, 64] == list(episode["qry_imgs"].shape)
    assert found["class_id"] == int(episode["class_id"])
    assert found["supp_masks"] == float(episode["supp_masks"].sum()) > 0
    assert found["qry_imgs"] == pytest.approx(float(episode["qry_imgs"].double().sum()), abs=1e-6)
    # the prediction nibabel wrote is read by SimpleITK with the label's geometry
    label, geometry = read_volume(_case_paths(data_root, "CHAOST2", 1)[1], backend="sitk")
    pred, pred_geometry = read_volume(out, backend="sitk")
    assert pred.dtype == np.uint8 and pred.shape == label.shape
    assert np.array_equal(pred[5:7], label[5:7] > 0) and not pred[:5].any() and not pred[7:].any()
    _assert_same_geometry(pred_geometry, geometry)
