"""End-to-end tests of train.py / test.py on the real CHAOST2 copy (CPU, ``debug`` config, 64 px).

A miniature data root (:mod:`tests.run_fixtures`) links six CHAOST2 cases: fold 1 is then positions 4-5
(support = position 4, one query volume = position 5) and training uses positions 0-3 (``debug`` keeps 3
of them). One uninterrupted 4-step run serves the evaluation checks and is the reference for the resume
test (the same run stopped by SIGINT after its step-2 snapshot, then resumed, must log the same losses at
every step) and for the validation test (the same run validating every 2 steps must log exactly the same
losses). The runs use ``region_sampling='random'``, so the model's boxes come from the global torch RNG:
whatever a resume or a validation did to that stream would show in the losses.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from dataloaders import list_cases
from engine.metrics import dice_iou
from engine.snapshots import read_snapshot
from tests.run_fixtures import load_test_script, make_mini_root, one_thread

pytestmark = pytest.mark.e2e  # runs the commands end to end (CI runs it; -m "not e2e" skips it)

REPO = Path(__file__).resolve().parent.parent
TEST_CLASS = 2  # RK: few labelled slices, so the evaluation is cheap
LOSS_TERMS = ("query_nll", "query_boundary", "align_nll", "align_boundary", "total")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _run_script(script: str, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / script), "with", "debug", *overrides]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=_env(), timeout=300)
    if check and done.returncode != 0:
        pytest.fail(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return done


def _env() -> dict[str, str]:
    # One thread: the same kernels in every process, and no oversubscription of the CI cores.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _metrics(run_dir: Path, names: tuple[str, ...] = LOSS_TERMS) -> dict[int, dict[str, float]]:
    """Series ``names`` (default the loss terms) per step from a Sacred metrics.json."""
    raw = json.loads((run_dir / "metrics.json").read_text())
    per_step: dict[int, dict[str, float]] = {}
    for name in names:
        for step, value in zip(raw[name]["steps"], raw[name]["values"], strict=True):
            per_step.setdefault(step, {})[name] = value
    return per_step


def _assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    picture = cv2.imread(str(path))
    assert picture is not None and picture.shape[0] > 100 and picture.shape[1] > 100


@pytest.fixture(scope="module")
def mini_root(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_mini_root(data_root, tmp_path_factory.mktemp("mini_data"))


def _common(mini_root: Path, log_dir: Path) -> tuple[str, ...]:
    return (f"data_root={mini_root}", "eval_fold=1", "region_sampling=random", f"path.log_dir={log_dir}")


@pytest.fixture(scope="module")
def reference_run(mini_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run folder of an uninterrupted 4-step debug training on fold 1, then its evaluation on RK."""
    log_dir = tmp_path_factory.mktemp("runs_reference")
    _run_script("train.py", *_common(mini_root, log_dir))
    _run_script("test.py", *_common(mini_root, log_dir), f"test_label=[{TEST_CLASS}]")
    return log_dir / "CHAOST2_setting1" / "fold1"


def test_training_writes_snapshots_and_metrics(reference_run: Path):
    assert sorted(p.name for p in (reference_run / "snapshots").iterdir()) == ["2.pth", "4.pth"]
    run = reference_run / "train" / "1"
    assert json.loads((run / "run.json").read_text())["status"] == "COMPLETED"
    assert json.loads((run / "config.json").read_text())["n_steps"] == 4
    metrics = _metrics(run)
    assert sorted(metrics) == [1, 2, 3, 4]
    assert all(np.isfinite(list(terms.values())).all() for terms in metrics.values())
    # The learning rate each logged step used (debug: MultiStepLR milestone at step 2, gamma 0.95).
    rates = _metrics(run, ("lr",))
    assert [rates[step]["lr"] for step in (1, 2, 3, 4)] == pytest.approx([1e-3, 1e-3, 9.5e-4, 9.5e-4])
    assert not any(name.startswith("val_dice") for name in json.loads((run / "metrics.json").read_text()))
    _assert_png(run / "progress.png")  # drawn at every snapshot, validation or not


def test_evaluation_outputs(reference_run: Path, mini_root: Path):
    results_file = reference_run / "test" / "1" / "results.json"
    results = json.loads(results_file.read_text())
    cases = list_cases("CHAOST2", mini_root)
    query_case = cases[5]  # fold 1 = positions 4, 5; supp_idx 0 -> position 4 is the support
    assert results["dataset"] == "CHAOST2" and results["eval_fold"] == 1
    assert results["checkpoint"].endswith("snapshots/4.pth")
    assert list(results["classes"]) == ["RK"]
    entry = results["classes"]["RK"]
    assert entry["label"] == TEST_CLASS and entry["support_case"] == cases[4].case_id
    assert list(entry["dice"]) == list(entry["iou"]) == [str(query_case.case_id)]
    assert entry["mean_dice"] == pytest.approx(entry["dice"][str(query_case.case_id)])
    assert results["mean_dice"] == pytest.approx(entry["mean_dice"])
    assert results["config"]["eval_fold"] == 1 and results["config"]["test_label"] == [TEST_CLASS]
    recorded = {
        key: results["checkpoint_config"][key] for key in ("dataset", "eval_fold", "setting", "image_size")
    }
    assert recorded == {"dataset": "CHAOST2", "eval_fold": 1, "setting": 1, "image_size": 64}
    assert results["cross_evaluation"] == {} and "checkpoint_config_note" not in results

    # Dice recomputed from the saved NIfTI against the label file.
    pred_image = sitk.ReadImage(
        str(results_file.parent / "predictions" / "RK" / f"pred_{query_case.case_id}.nii.gz")
    )
    label_image = sitk.ReadImage(str(query_case.label))
    source_image = sitk.ReadImage(str(query_case.image))
    pred = sitk.GetArrayFromImage(pred_image)
    gt = sitk.GetArrayFromImage(label_image) == TEST_CLASS
    assert pred.shape == gt.shape
    assert not pred[~gt.any(axis=(1, 2))].any(), "slices without the class must hold no prediction"
    dice, iou = dice_iou(pred, gt)
    assert dice == pytest.approx(entry["dice"][str(query_case.case_id)], abs=1e-12)
    assert iou == pytest.approx(entry["iou"][str(query_case.case_id)], abs=1e-12)

    # Geometry of the query volume.
    np.testing.assert_allclose(pred_image.GetSpacing(), source_image.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(pred_image.GetOrigin(), source_image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(pred_image.GetDirection(), source_image.GetDirection(), atol=1e-6)

    # Overlay of the middle labelled slice.
    labelled = np.flatnonzero(gt.any(axis=(1, 2)))
    overlay = (
        results_file.parent
        / "overlays"
        / "RK"
        / f"case{query_case.case_id}_z{labelled[len(labelled) // 2]}.png"
    )
    picture = cv2.imread(str(overlay))
    assert picture is not None and picture.shape == (2 * gt.shape[1], 2 * gt.shape[2], 3)


def _final_weights(fold_dir: Path) -> dict[str, torch.Tensor]:
    return read_snapshot(fold_dir / "snapshots" / "4.pth")["model"]


@pytest.mark.parametrize(
    "signals",
    [(signal.SIGINT,), (signal.SIGTERM, signal.SIGTERM)],
    ids=["ctrl-c", "sigterm-twice"],
)
def test_interrupted_run_resumes_on_the_same_trajectory(
    reference_run: Path, mini_root: Path, tmp_path: Path, signals: tuple[signal.Signals, ...]
):
    """Ctrl-C, or SIGTERM (a scheduler's time limit or preemption; sent twice, as SLURM and the job's own
    process both do, without turning into a kill): snapshot, stop, and a resume ends with the
    uninterrupted run's weights, bit for bit."""
    common = _common(mini_root, tmp_path)
    fold_dir = tmp_path / "CHAOST2_setting1" / "fold1"
    command = [sys.executable, str(REPO / "train.py"), "with", "debug", *common]
    process = subprocess.Popen(
        command, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 240
    while not (fold_dir / "snapshots" / "2.pth").exists():
        assert process.poll() is None, f"training ended early:\n{process.stderr.read().decode()[-3000:]}"
        assert time.monotonic() < deadline, "no step-2 snapshot within 240 s"
        time.sleep(0.02)
    for signum in signals:
        process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == -signals[0], "the run should end by the signal that stopped it"
    stopped_at = max(int(p.stem) for p in (fold_dir / "snapshots").glob("*.pth"))
    assert stopped_at < 4, f"the run finished before the interruption took effect:\n{stderr.decode()[-2000:]}"
    assert json.loads((fold_dir / "train" / "1" / "run.json").read_text())["status"] == "INTERRUPTED"
    # One line, not a traceback.
    lines = stderr.decode().splitlines()
    assert lines[-1] == f"stopped at step {stopped_at}; continue with resume=True", lines[-5:]
    assert "Traceback" not in stderr.decode()

    _run_script("train.py", *common, "resume=True")
    resumed = {**_metrics(fold_dir / "train" / "1"), **_metrics(fold_dir / "train" / "2")}
    assert sorted(resumed) == [1, 2, 3, 4]
    assert min(_metrics(fold_dir / "train" / "2")) == stopped_at + 1
    reference = _metrics(reference_run / "train" / "1")
    for step in range(1, 5):
        for name in LOSS_TERMS:
            assert resumed[step][name] == pytest.approx(reference[step][name], rel=1e-6, abs=1e-7), (
                step,
                name,
            )
    final, expected = _final_weights(fold_dir), _final_weights(reference_run)
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[key], expected[key]) for key in expected)


def test_validation_leaves_the_trajectory_unchanged(reference_run: Path, mini_root: Path, tmp_path: Path):
    """The reference run again, validating RK on the query volume and the label-free episodes before the first
    step and every 2 steps: the same losses, exactly.

    With one DataLoader worker (episodes do not depend on the number of workers), forked after the
    validation volumes were read and resized in the main process: OpenCV's thread pool must not be alive
    then (train.episode_loader), or the worker can hang in worker_init_fn.
    """
    done = _run_script(
        "train.py",
        *_common(mini_root, tmp_path),
        "validate_every=2",
        "validate_labels=[2]",
        "validate_cases=1",
        "num_workers=1",
    )
    run = tmp_path / "CHAOST2_setting1" / "fold1" / "train" / "1"
    assert _metrics(run) == _metrics(reference_run / "train" / "1")
    validation = _metrics(run, ("val_dice_RK", "val_dice_mean"))
    assert sorted(validation) == [0, 2, 4]  # before the first step, every 2 steps
    for values in validation.values():
        assert 0.0 <= values["val_dice_RK"] <= 1.0 and values["val_dice_mean"] == values["val_dice_RK"]
    assert "step 2 validation (1 query volume(s)" in done.stderr and "RK " in done.stderr
    # the label-free validation ran beside it (the default 40 episodes of the held-out volumes)
    label_free = _metrics(run, ("lf_auc", "lf_dice"))
    assert sorted(label_free) == [0, 2, 4]
    assert all(0.0 <= v["lf_auc"] <= 1.0 and 0.0 <= v["lf_dice"] <= 1.0 for v in label_free.values())
    assert "step 2 label-free validation (40 episodes of held-out volumes" in done.stderr
    _assert_png(run / "progress.png")


def _run_test_in_process(**updates) -> Path:
    """test.py's ``test`` command in this process, one thread (as the scripts run); returns its run folder."""
    with one_thread():
        run = load_test_script().ex.run("test", named_configs=["debug"], config_updates=updates)
    return next(Path(obs.dir) for obs in run.observers if getattr(obs, "dir", None))


def test_checkpoint_config_in_results(reference_run: Path, mini_root: Path, tmp_path: Path):
    """A deliberate cross-evaluation (another image_size) says so; a plain state_dict (the official
    layout) records no config and scores as the snapshot does."""
    snapshot = reference_run / "snapshots" / "4.pth"
    common = {
        "data_root": str(mini_root),
        "eval_fold": 1,
        "path": {"log_dir": str(tmp_path)},
        "test_label": [TEST_CLASS],
    }
    crossed = _run_test_in_process(
        **common, reload_model_path=str(snapshot), image_size=32, allow_cross_eval=True
    )
    results = json.loads((crossed / "results.json").read_text())
    assert results["cross_evaluation"] == {"image_size": {"checkpoint": 64, "evaluation": 32}}
    assert results["checkpoint_config"]["image_size"] == 64

    plain = tmp_path / "official_layout.pth"
    torch.save(read_snapshot(snapshot)["model"], plain)
    official = json.loads(
        (_run_test_in_process(**common, reload_model_path=str(plain)) / "results.json").read_text()
    )
    assert official["checkpoint_config"] is None and "records no config" in official["checkpoint_config_note"]
    assert official["cross_evaluation"] == {}
    reference = json.loads((reference_run / "test" / "1" / "results.json").read_text())
    assert official["classes"]["RK"]["dice"] == reference["classes"]["RK"]["dice"]
