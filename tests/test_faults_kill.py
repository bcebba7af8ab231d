"""SIGKILL anywhere loses nothing, a full disk stops cleanly (issue 24, items 3 and 4).

SIGKILL: a training run killed at many moments and resumed each time ends with the snapshots of an
uninterrupted run, bit for bit, and leaves no temporary or half-written file; ``test.py`` and ``segment.py``
killed mid-way leave an output folder that never looks finished, and their rerun completes.

Full disk: on a real 4 MiB tmpfs mounted by the test, a snapshot, prediction or label map write that finds
the disk full ends the command with one line naming the file, the folder's free space and what the file
needs; the earlier snapshot is intact and loadable, no temporary is left, and once space is freed the same
command (``resume=True`` for training) completes, training with the snapshots of a run that never met a
full disk. The disk is filled by a ballast file just before the chosen write (:class:`FillAt`). Mounting
needs root (CI containers run as root); elsewhere these tests are skipped with that reason.

The runs are forked copies of the test process (:mod:`tests.kill_points`), so a restart costs the run's
set-up (its volumes read) and no Python start-up; the method is ``tiny_difd`` (DIFD's head and loss on a
conv-stem encoder, :mod:`tests.tiny_difd_method`) with ``region_sampling='random'``, so the global torch RNG
drives the model: a resume that restored it wrongly would change the weights. Two schedules:

* named moments (:data:`KILLS`), in the order a run meets them: each attempt is killed at its moment, the
  next one resumes; every attempt must die by SIGKILL (a moment never reached fails the test);
* seeded random delays (:data:`RANDOM_KILLS`), sent from outside by ``kill -9`` wherever the run is then.
"""

from __future__ import annotations

import json
import random
import re
import runpy
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from engine.snapshots import list_snapshots, load_snapshot, read_snapshot
from tests.kill_points import BALLAST, FillAt, KillAt, run_forked
from tests.run_fixtures import load_test_script, make_mini_root, one_thread

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent
PLUGIN = REPO / "tests" / "tiny_difd_method.py"
FOLD = Path("tiny_difd_CHAOST2_setting1") / "fold1"
TEMPORARY = re.compile(r"^\..+\.tmp\d+")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

#: Named moments, in the order the chain of attempts meets them (4 steps, snapshots at 2 and 4, validation
#: at 0, 2 and 4; the comment says where the run stands when the attempt is killed). Only writes of the main
#: thread: the moments of Sacred's heartbeat thread (metrics.json) vary with the machine's speed, and are
#: left to the random kills.
KILLS = [
    KillAt("before_rename", 1, ".lock"),  # the run folder's lock written, not renamed
    KillAt("after_rename", 1, ".lock"),  # the run folder's lock just taken
    KillAt("record_half", 1),  # Sacred's first run.json half-written
    KillAt("validation", 1),  # inside the validation of step 0
    KillAt("picture_half", 1),  # the first progress.png half-written
    KillAt("step", 2),  # step 2 done, its snapshot not begun
    KillAt("torch_save_half", 1),  # 2.pth half-written
    KillAt("before_rename", 1, ".pth"),  # 2.pth complete and verified, not renamed
    KillAt("after_rename", 1, ".pth"),  # 2.pth in place, progress.png not redrawn
    KillAt("step", 1),  # resumed from 2.pth: step 3 done
    KillAt("picture_half", 1),  # resumed: the progress.png of step 4's validation half-written
    KillAt("torch_save_half", 1),  # 4.pth half-written
    KillAt("after_rename", 1, "config.json"),  # resumed from 2.pth: Sacred's config.json just written
    KillAt("after_rename", 1, ".pth"),  # 4.pth in place, the keep policy not applied
    KillAt("torch_save_half", 1),  # the next attempt finds the run done: its keep policy's rewrite of 4.pth
]
RANDOM_SEED = 24
SEGMENT_RUNNING = ".segment-running.json"  # segment.RUNNING
RANDOM_KILLS = 6


def _test_updates(data: Path, log: Path) -> dict:
    """The keys test.py shares with the training run (it refuses train.py's own)."""
    return {
        "plugins": [str(PLUGIN)],
        "method": "tiny_difd",
        "region_sampling": "random",
        "data_root": str(data),
        "eval_fold": 1,
        "path": {"log_dir": str(log)},
    }


def _updates(data: Path, log: Path) -> dict:
    return _test_updates(data, log) | {
        "max_volumes": 2,
        "validate_every": 2,
        "validate_cases": 1,
        "validate_labels": [2],
        "label_free_episodes": 2,
    }


def _train(updates: dict) -> Callable[[], None]:
    def work() -> None:
        import train

        with one_thread():
            train.ex.run("train", named_configs=["debug"], config_updates=updates)

    return work


@pytest.fixture(scope="module")
def data(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_mini_root(data_root, tmp_path_factory.mktemp("kill_data"))


@pytest.fixture(scope="module")
def reference(data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """The snapshots folder of the uninterrupted run, and how long the run took (seconds)."""
    log = tmp_path_factory.mktemp("kill_reference")
    start = time.monotonic()
    _finish(_train(_updates(data, log)), log / "out.txt")
    return log / FOLD / "snapshots", time.monotonic() - start


def _assert_same_snapshots(folder: Path, reference: Path) -> None:
    """The same files, of the same format, holding the same tensors, bit for bit."""
    assert [p.name for _, p in list_snapshots(folder)] == [p.name for _, p in list_snapshots(reference)]
    for _, expected_path in list_snapshots(reference):
        got, expected = read_snapshot(folder / expected_path.name), read_snapshot(expected_path)
        assert got["format"] == expected["format"], expected_path.name
        assert got["model"].keys() == expected["model"].keys()
        for key, value in expected["model"].items():
            assert torch.equal(got["model"][key], value), (expected_path.name, key)
        if "optimizer" in expected:
            for index, state in expected["optimizer"]["state"].items():
                for name, value in state.items():
                    assert torch.equal(got["optimizer"]["state"][index][name], value)


def _assert_nothing_half_written(log: Path) -> None:
    """No temporary anywhere; every record, picture and snapshot reads."""
    left = sorted(str(p) for p in log.rglob("*") if TEMPORARY.match(p.name))
    assert not left, f"temporaries left: {left}"
    for path in log.rglob("*.json"):
        try:
            json.loads(path.read_text())
        except json.JSONDecodeError as err:
            pytest.fail(f"{path} is half-written: {err}")
    for path in log.rglob("*.png"):
        assert path.read_bytes()[:8] == PNG_SIGNATURE and path.read_bytes()[-8:-4] == b"IEND", path
    for _, path in list_snapshots(log / FOLD / "snapshots"):
        read_snapshot(path)


def _segment(argv: list[str]) -> None:
    """segment.py as its command line runs it (its one-line errors included)."""
    sys.argv = ["segment.py", *argv]
    with one_thread():
        runpy.run_path(str(REPO / "segment.py"), run_name="__main__")


def _finish(work: Callable[[], None], out: Path) -> None:
    assert run_forked(work, None, out) == 0, out.read_text()[-3000:]


def test_training_killed_at_named_moments_ends_as_an_uninterrupted_run(
    data: Path, reference: tuple[Path, float], tmp_path: Path
):
    updates = _updates(data, tmp_path) | {"resume": True}
    out = tmp_path / "out.txt"
    for number, kill in enumerate(KILLS, 1):
        status = run_forked(_train(updates), kill, out)
        said = out.read_text()[-3000:]
        assert status == -signal.SIGKILL, f"attempt {number} ({kill}) ended with {status}:\n{said}"
    _finish(_train(updates), out)
    _assert_same_snapshots(tmp_path / FOLD / "snapshots", reference[0])
    _assert_nothing_half_written(tmp_path)
    print(f"SIGKILL at {len(KILLS)} named moments: {len(KILLS)} tried, {len(KILLS)} survived")


def test_training_killed_at_random_moments_ends_as_an_uninterrupted_run(
    data: Path, reference: tuple[Path, float], tmp_path: Path
):
    """``kill -9`` from outside after seeded random delays, up to half an uninterrupted run's length, until
    :data:`RANDOM_KILLS` attempts were killed or one finished the run."""
    updates = _updates(data, tmp_path) | {"resume": True}
    out = tmp_path / "out.txt"
    chooser = random.Random(RANDOM_SEED)
    killed = 0
    for _ in range(RANDOM_KILLS):
        status = run_forked(_train(updates), None, out, kill_after=chooser.uniform(0.2, reference[1] / 2))
        assert status in (0, -signal.SIGKILL), out.read_text()[-3000:]
        if status == 0:
            break
        killed += 1
    _finish(_train(updates), out)
    _assert_same_snapshots(tmp_path / FOLD / "snapshots", reference[0])
    _assert_nothing_half_written(tmp_path)
    print(f"SIGKILL at random moments: {killed} landed before the run ended, {killed} survived")


def _assert_no_temporaries(folder: Path) -> None:
    left = sorted(str(p) for p in folder.rglob("*") if TEMPORARY.match(p.name))
    assert not left, f"temporaries left: {left}"


#: test.py on RK then LIVER (one query volume each): where it is killed.
TEST_KILLS = [
    KillAt("before_rename", 1, ".nii.gz"),  # RK's prediction complete, not renamed
    KillAt("prediction", 1),  # RK's prediction and overlay written, LIVER not begun
    KillAt("before_rename", 1, "results.json"),  # every output written, results.json not in place
]


def test_evaluation_killed_never_looks_finished_and_its_rerun_completes(
    data: Path, reference: tuple[Path, float], tmp_path: Path
):
    script = load_test_script()
    updates = _test_updates(data, tmp_path) | {
        "reload_model_path": str(reference[0] / "4.pth"),
        "test_label": [2, 1],
    }

    def work() -> None:
        with one_thread():
            script.ex.run("test", named_configs=["debug"], config_updates=updates)

    out = tmp_path / "out.txt"
    runs = tmp_path / FOLD / "test"
    for number, kill in enumerate(TEST_KILLS, 1):
        assert run_forked(work, kill, out) == -signal.SIGKILL, f"{kill}:\n{out.read_text()[-3000:]}"
        killed = runs / str(number)
        assert not (killed / "results.json").exists(), f"{killed} looks finished"
        assert json.loads((killed / "run.json").read_text())["status"] == "RUNNING"
    _finish(work, out)
    done = runs / str(len(TEST_KILLS) + 1)
    assert set(json.loads((done / "results.json").read_text())["classes"]) == {"RK", "LIVER"}
    _assert_no_temporaries(tmp_path)
    _assert_nothing_half_written(tmp_path)


#: segment.py on two queries: where it is killed.
SEGMENT_KILLS = [
    KillAt("prediction", 1),  # the first query's label map written, its overlays not
    KillAt("before_rename", 1, "_overlays"),  # the first query's overlay folder complete, not renamed
    KillAt("before_rename", 1, "report.json"),  # every output written, report.json not in place
]


def test_segmentation_killed_never_looks_finished_and_its_rerun_completes(
    data_root: Path, reference: tuple[Path, float], tmp_path: Path
):
    chaos = data_root / "CHAOST2" / "chaos_MR_T2_normalized"
    out_dir = tmp_path / "segmented"
    argv = [
        "--checkpoint", str(reference[0] / "4.pth"), "--plugin", str(PLUGIN),
        "--support-image", str(chaos / "image_1.nii.gz"), "--support-label", str(chaos / "label_1.nii.gz"),
        "--label", "1", "--query", str(chaos / "image_2.nii.gz"), str(chaos / "image_3.nii.gz"),
        "--out", str(out_dir),
    ]  # fmt: skip

    def work() -> None:
        _segment(argv)

    out = tmp_path / "out.txt"
    for kill in SEGMENT_KILLS:
        assert run_forked(work, kill, out) == -signal.SIGKILL, f"{kill}:\n{out.read_text()[-3000:]}"
        assert not (out_dir / "report.json").exists(), f"{out_dir} looks finished after {kill}"
        assert (out_dir / SEGMENT_RUNNING).is_file()
    _finish(work, out)  # the same command, without --overwrite
    assert "replacing the outputs of a segment.py that did not finish" in out.read_text()
    report = json.loads((out_dir / "report.json").read_text())
    assert sorted(report["queries"]) == ["image_2", "image_3"]
    assert not (out_dir / SEGMENT_RUNNING).exists()
    _assert_no_temporaries(out_dir)
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(
        ["report.json", "image_2.nii.gz", "image_3.nii.gz", "image_2_overlays", "image_3_overlays"]
        + ["image_2.seg.nrrd", "image_3.seg.nrrd"]
    )


#: The one line of a full disk (after "cannot write <what>").
ONE_LINE = (
    r"(?P<file>\S+): No space left on device \((?P<folder>\S+) has \d+ KiB free(?P<needs>; the file needs "
    r"[^)]+)?\)"
)


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs at ``tmp_path/disk``, unmounted after the test."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip() or done.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def _last_line(out: Path) -> str:
    text = out.read_text()
    assert "Traceback" not in text, text[-3000:]
    return text.rstrip().splitlines()[-1]


def test_training_stops_at_a_full_disk_and_resumes_once_freed(
    disk: Path, data: Path, reference: tuple[Path, float], tmp_path: Path
):
    updates = _updates(data, disk / "runs") | {"resume": True}
    out = tmp_path / "out.txt"
    assert run_forked(_train(updates), FillAt(disk, "4.pth", leave=16384), out) == 1
    line = _last_line(out)
    snapshots = disk / "runs" / FOLD / "snapshots"
    said = re.fullmatch(
        rf"train\.py: cannot write snapshot {ONE_LINE}; free space, then continue with resume=True", line
    )
    assert said and said["file"] == str(snapshots / "4.pth") and said["folder"] == str(snapshots), line
    assert re.fullmatch(r"; the file needs about \d+ KiB", said["needs"] or ""), line  # its tensors' bytes
    assert [p.name for _, p in list_snapshots(snapshots)] == ["2.pth"]
    assert load_snapshot(snapshots / "2.pth")["step"] == 2  # intact, with its resume state
    assert not [p for p in disk.rglob("*") if ".tmp" in p.name]

    (disk / BALLAST).unlink()
    _finish(_train(updates), out)
    _assert_same_snapshots(snapshots, reference[0])
    _assert_nothing_half_written(disk / "runs")


def test_evaluation_stops_at_a_full_disk_and_reruns_once_freed(
    disk: Path, data: Path, reference: tuple[Path, float], tmp_path: Path
):
    script = load_test_script()
    updates = _test_updates(data, disk / "runs") | {
        "reload_model_path": str(reference[0] / "4.pth"),
        "test_label": [2],
    }

    def work() -> None:
        with one_thread():
            script.ex.run("test", named_configs=["debug"], config_updates=updates)

    out = tmp_path / "out.txt"
    assert run_forked(work, FillAt(disk, "pred_10.nii.gz", leave=0), out) == 1
    line, failed = _last_line(out), disk / "runs" / FOLD / "test" / "1"
    said = re.fullmatch(rf"test\.py: cannot write volume {ONE_LINE}", line)
    assert said and said["file"] == str(failed / "predictions" / "RK" / "pred_10.nii.gz"), line
    assert sorted(p.name for p in failed.iterdir() if p.name != "cout.txt") == ["config.json", "run.json"]

    (disk / BALLAST).unlink()
    _finish(work, out)
    assert json.loads((disk / "runs" / FOLD / "test" / "2" / "results.json").read_text())["classes"]["RK"]
    _assert_nothing_half_written(disk / "runs")


def test_segmentation_stops_at_a_full_disk_and_reruns_once_freed(
    disk: Path, data_root: Path, reference, tmp_path
):
    chaos = data_root / "CHAOST2" / "chaos_MR_T2_normalized"
    segmented = disk / "segmented"
    argv = [
        "--checkpoint", str(reference[0] / "4.pth"), "--plugin", str(PLUGIN),
        "--support-image", str(chaos / "image_1.nii.gz"), "--support-label", str(chaos / "label_1.nii.gz"),
        "--label", "1", "--query", str(chaos / "image_2.nii.gz"), "--out", str(segmented),
    ]  # fmt: skip

    def work() -> None:
        _segment(argv)

    out = tmp_path / "out.txt"
    assert run_forked(work, FillAt(disk, "image_2.nii.gz", leave=0), out) == 1
    line = _last_line(out)
    said = re.fullmatch(
        rf"segment\.py: error: cannot write volume {ONE_LINE}; free space and run it again", line
    )
    assert said and said["file"] == str(segmented / "image_2.nii.gz"), line
    assert not (segmented / "report.json").exists()

    (disk / BALLAST).unlink()
    _finish(work, out)
    assert json.loads((segmented / "report.json").read_text())["queries"]["image_2"]
    assert not [p for p in segmented.rglob("*") if ".tmp" in p.name]
