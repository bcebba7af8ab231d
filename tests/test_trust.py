"""A checkpoint is data, never code (issue 24, item 1): every entry point that reads a checkpoint is given a
state dict and a snapshot whose pickle runs a shell command on load (it creates a marker file), and each
refuses it with one line naming the file and what it holds, before the payload can run.

Entry points: ``models.load_model``, ``Segmenter.from_checkpoint``, ``segment.py --checkpoint`` (a
subprocess: its one-line error and exit status), ``test.py with reload_model_path=``, ``train.py with
resume=True`` (the snapshot in the run folder), ``pretrained_path=`` and ``init_from=``. The snapshots this
project writes hold tensors and plain types only; one written before that rule (NumPy's RNG state as an
array) is refused with the conversion command, which makes it load again.
"""

from __future__ import annotations

import os
import random
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from engine import convert_checkpoint
from engine.snapshots import load_resume_snapshot, read_snapshot, restore_training_state, save_snapshot
from inference import Segmenter
from models import load_model
from models.files import CONVERT_COMMAND, UntrustedCheckpoint, load_torch_file
from models.weights import SNAPSHOT_FORMAT
from tests.run_fixtures import load_test_script, one_thread
from tests.tiny_difd import tiny_difd
from utils import capture_rng_state, restore_rng_state

REPO = Path(__file__).resolve().parent.parent
FOLD_DIR = Path("CHAOST2_setting1") / "fold1"
CONFIG = {"dataset": "CHAOST2", "eval_fold": 1, "setting": 1, "image_size": 64, "method": "difd"}


class RunsCode:
    """Pickled as ``os.system("touch <marker>")``: what a booby-trapped checkpoint does on load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def _state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return tiny_difd(channels=4, reduce_dim=4).state_dict()


def _snapshot_payload(model: dict[str, torch.Tensor], **extra: Any) -> dict[str, Any]:
    return {"format": SNAPSHOT_FORMAT, "step": 2, "model": model, "config": dict(CONFIG), **extra}


@pytest.fixture
def attack(tmp_path: Path) -> dict[str, Path]:
    """The marker path and three booby-trapped files: a plain state dict (zip and torch's legacy format)
    and a full snapshot whose RNG state is the payload."""
    marker = tmp_path / "payload_ran"
    state = _state_dict()
    files = {"marker": marker}
    files["state_dict"] = tmp_path / "state_dict.pth"
    torch.save({**state, "evil": RunsCode(marker)}, files["state_dict"])
    files["legacy_state_dict"] = tmp_path / "legacy.pth"
    legacy = {**state, "evil": RunsCode(marker)}
    torch.save(legacy, files["legacy_state_dict"], _use_new_zipfile_serialization=False)
    files["snapshot"] = tmp_path / "snapshot.pth"
    torch.save(_snapshot_payload(state, rng=RunsCode(marker)), files["snapshot"])
    return files


def _refused(message: str, path: Path) -> None:
    assert "\n" not in message, message
    assert "refused to read" in message and str(path) in message and "posix.system" in message, message
    assert f"{CONVERT_COMMAND} {path}" in message, message


def test_the_payload_is_live(attack):
    """The files really run code when read the old way: the refusals below are what prevents it."""
    torch.load(attack["snapshot"], weights_only=False)
    assert attack["marker"].exists()


@pytest.mark.parametrize("kind", ["state_dict", "legacy_state_dict", "snapshot"])
def test_load_model_refuses(attack, kind):
    with pytest.raises(UntrustedCheckpoint) as err:
        load_model(attack[kind])
    _refused(str(err.value), attack[kind])
    assert not attack["marker"].exists()


@pytest.mark.parametrize("kind", ["state_dict", "snapshot"])
def test_segmenter_refuses(attack, kind):
    with pytest.raises(UntrustedCheckpoint) as err:
        Segmenter.from_checkpoint(attack[kind], preset="chaos_mr")
    _refused(str(err.value), attack[kind])
    assert not attack["marker"].exists()


def test_snapshot_readers_refuse(attack, tmp_path):
    """read_snapshot, and resume, which does not fall back to an older snapshot past such a file."""
    with pytest.raises(UntrustedCheckpoint):
        read_snapshot(attack["snapshot"])
    folder = tmp_path / "snapshots"
    folder.mkdir()
    torch.save(_snapshot_payload(_state_dict(), rng=capture_rng_state()), folder / "2.pth")
    (folder / "4.pth").write_bytes(attack["snapshot"].read_bytes())
    with pytest.raises(UntrustedCheckpoint, match="4.pth"):
        load_resume_snapshot(folder)
    assert not attack["marker"].exists()


def _scan(path: Path, array: np.ndarray) -> Path:
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    return path


def test_segment_py_refuses_with_one_line(attack, tmp_path):
    rng = np.random.default_rng(0)
    label = np.zeros((4, 32, 32), dtype=np.uint8)
    label[1:3, 8:24, 8:24] = 1
    argv = [
        "--checkpoint", str(attack["snapshot"]),
        "--support-image", str(_scan(tmp_path / "s.nii.gz", rng.normal(size=(4, 32, 32)).astype(np.float32))),
        "--support-label", str(_scan(tmp_path / "l.nii.gz", label)), "--label", "1",
        "--query", str(_scan(tmp_path / "q.nii.gz", rng.normal(size=(4, 32, 32)).astype(np.float32))),
        "--out", str(tmp_path / "out"), "--preset", "chaos_mr",
    ]  # fmt: skip
    done = subprocess.run(
        [sys.executable, str(REPO / "segment.py"), *argv],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    _refused(lines[0].removeprefix("segment.py: error: "), attack["snapshot"])
    assert not attack["marker"].exists() and not (tmp_path / "out").exists()


def _run(command: str, data_root: Path, log: Path, **updates: Any) -> None:
    import train  # registers the 'train' command on the shared experiment

    experiment = train.ex if command == "train" else load_test_script().ex
    config = {"data_root": str(data_root), "eval_fold": 1, "path": {"log_dir": str(log)}, **updates}
    with one_thread():
        experiment.run(command, named_configs=["debug"], config_updates=config)


@pytest.mark.parametrize("kind", ["state_dict", "snapshot"])
def test_test_py_refuses(attack, kind, data_root, tmp_path):
    log = tmp_path / "runs"
    with pytest.raises(UntrustedCheckpoint) as err:
        _run("test", data_root, log, reload_model_path=str(attack[kind]))
    _refused(str(err.value), attack[kind])
    assert not attack["marker"].exists() and not log.exists()


def test_train_py_resume_refuses(attack, data_root, tmp_path):
    log = tmp_path / "runs"
    snapshots = log / FOLD_DIR / "snapshots"
    snapshots.mkdir(parents=True)
    (snapshots / "2.pth").write_bytes(attack["snapshot"].read_bytes())
    with pytest.raises(UntrustedCheckpoint) as err:
        _run("train", data_root, log, resume=True)
    _refused(str(err.value), snapshots / "2.pth")
    assert not attack["marker"].exists()
    assert sorted(p.name for p in (log / FOLD_DIR).iterdir()) == ["snapshots"]


def test_train_py_pretrained_path_refuses(attack, data_root, tmp_path):
    log = tmp_path / "runs"
    with pytest.raises(UntrustedCheckpoint) as err:
        _run(
            "train",
            data_root,
            log,
            pretrained_weights="deeplabv3",
            pretrained_path=str(attack["state_dict"]),
        )
    _refused(str(err.value), attack["state_dict"])
    assert not attack["marker"].exists() and not log.exists()


def test_train_py_init_from_refuses(attack, data_root, tmp_path):
    log = tmp_path / "runs"
    with pytest.raises(UntrustedCheckpoint) as err:
        _run("train", data_root, log, init_from=str(attack["snapshot"]))
    _refused(str(err.value), attack["snapshot"])
    assert not attack["marker"].exists() and not log.exists()


def test_launcher_status_reads_the_job_log_not_its_pickle(tmp_path):
    """The error of a job that raised comes from its stderr log; a result pickle beside it is never read."""
    from launcher.clusters import JOBS_FOLDER
    from launcher.status import SUBMITIT_RAISED, result_error

    folder = tmp_path / JOBS_FOLDER / "42"
    folder.mkdir(parents=True)
    marker = tmp_path / "payload_ran"
    torch.save(RunsCode(marker), folder / "42_0_result.pkl")
    log = f"warming up\nERROR {SUBMITIT_RAISED}\nTraceback:\n  x\nOSError: gone\n"
    (folder / "42_0_log.err").write_text(log)
    assert result_error(tmp_path, "42") == "OSError: gone"
    assert not marker.exists()
    (folder / "42_0_log.err").write_text("a warning\n")
    assert result_error(tmp_path, "42") is None


# Our own snapshots, and those written before the rule.


def _old_rng_state() -> dict[str, Any]:
    """The RNG state as snapshots stored it before: NumPy's as ``np.random.get_state()`` (an array)."""
    return {**capture_rng_state(), "numpy": np.random.get_state()}  # noqa: NPY002


def test_own_snapshots_are_plain_data(tmp_path):
    torch.manual_seed(0)
    model = tiny_difd(channels=4, reduce_dim=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [2])
    path = save_snapshot(
        tmp_path / "2.pth", step=2, model=model, optimizer=optimizer, scheduler=scheduler, config=CONFIG
    )
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
    random.random(), np.random.random(), torch.rand(1)  # noqa: NPY002 (moves the global states on)
    payload = load_torch_file(path)
    expected = payload["rng"]
    restore_training_state(path, payload, model, optimizer, scheduler)
    assert capture_rng_state()["numpy"] == expected["numpy"]
    assert capture_rng_state()["python"] == expected["python"]


def test_old_snapshot_is_refused_then_converted(tmp_path, capsys):
    path = tmp_path / "2.pth"
    before = _old_rng_state()
    torch.save(_snapshot_payload(_state_dict(), rng=before), path)
    with pytest.raises(UntrustedCheckpoint, match=r"numpy\..*python -m engine.convert_checkpoint"):
        read_snapshot(path)
    assert convert_checkpoint.main(["--trust-this-file", str(path)]) == 0
    assert "rewritten as tensors and plain types" in capsys.readouterr().out
    payload = read_snapshot(path)
    np.random.random()  # noqa: NPY002
    restore_rng_state(payload["rng"])
    after = np.random.get_state()  # noqa: NPY002
    assert after[0] == before["numpy"][0] and np.array_equal(after[1], before["numpy"][1])
    assert after[2:] == before["numpy"][2:]
    assert convert_checkpoint.main(["--trust-this-file", str(path)]) == 0
    assert "nothing to convert" in capsys.readouterr().out


class Opaque:
    """An object with no plain form."""


def test_converter_refuses_what_it_cannot_make_plain(tmp_path, capsys):
    path = tmp_path / "odd.pth"
    torch.save({"model": {}, "extra": [Opaque()]}, path)
    original = path.read_bytes()
    assert convert_checkpoint.main(["--trust-this-file", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "['extra'][0] holds a tests.test_trust.Opaque" in err
    assert path.read_bytes() == original
    assert convert_checkpoint.main(["--trust-this-file", str(tmp_path / "absent.pth")]) == 1
    assert "not found" in capsys.readouterr().err
