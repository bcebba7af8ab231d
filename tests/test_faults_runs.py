"""Run-level fault catalogue: train.py, test.py, summarize.py and plot_run.py given bad values, wrong
checkpoints, missing classes, failed runs (issue 12, items 4, 5, 9 and 10, and cases that already worked).

Every case asserts the exception (or exit status), that the message names the key or file, and that no
partial output is left behind or reported as complete:

* ``nothing``: the run made no file or folder at all (the checks run in the config hook, before Sacred's
  observer makes the run folder);
* ``failed_run``: only a Sacred run folder with status FAILED, and no snapshot, prediction, overlay or
  results.json.

train/test run in this process (``ex.run``); the scripts' data is the mini CHAOST2 root of
tests/run_fixtures.py, and a copy of it whose labels lack some classes in fold 1 (support case 8 has no
SPLEEN and no RK, query case 10 has no LK and no RK). The test.py cases use snapshot files that hold a
config and no weights (the checks come before the model is loaded), except the part-way failure, which
evaluates a randomly initialised model.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from models import build_difd
from models.weights import SNAPSHOT_FORMAT
from tests.run_fixtures import load_test_script, make_mini_root, one_thread

pytestmark = pytest.mark.e2e  # runs the commands end to end (CI runs it; -m "not e2e" skips it)

REPO = Path(__file__).resolve().parent.parent
FOLD_DIR = Path("CHAOST2_setting1") / "fold1"
#: What test.py and train.py record of a debug run on fold 1 (the keys the cross-evaluation check reads).
SNAPSHOT_CONFIG = {"dataset": "CHAOST2", "eval_fold": 1, "setting": 1, "image_size": 64}


@pytest.fixture(scope="module")
def roots(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("fault_roots")
    return {
        "mini": make_mini_root(data_root, base / "mini"),
        "edited": make_mini_root(data_root, base / "edited", edited_labels={8: [4, 2], 10: [3, 2]}),
        "blank_held_out": make_mini_root(data_root, base / "blank_held_out", blank_supervoxels=(8, 10)),
    }


def _snapshot(path: Path, model: dict[str, torch.Tensor] | None = None, **config: Any) -> Path:
    """A snapshot file of this project's format holding ``config`` (over :data:`SNAPSHOT_CONFIG`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"format": SNAPSHOT_FORMAT, "step": 4, "config": {**SNAPSHOT_CONFIG, **config}, "model": model or {}},
        path,
    )
    return path


@dataclass
class Case:
    """One fault of a ``train`` or ``test`` run: its config updates, the expected error and outputs."""

    id: str
    command: str
    updates: dict[str, Any] = field(default_factory=dict)
    raises: type[BaseException] = ValueError
    match: str = ""
    outputs: str = "nothing"  # or "failed_run"
    root: str = "mini"
    #: writes files before the run (in the log folder); returns extra config updates
    prepare: Callable[[Path], dict[str, Any]] | None = None


def _existing_snapshot(log: Path) -> dict[str, Any]:
    _snapshot(log / FOLD_DIR / "snapshots" / "2.pth")
    return {}


def _reload(**config: Any) -> Callable[[Path], dict[str, Any]]:
    def prepare(log: Path) -> dict[str, Any]:
        return {"reload_model_path": str(_snapshot(log / "elsewhere" / "40000.pth", **config))}

    return prepare


def _own_snapshot(log: Path) -> dict[str, Any]:
    _snapshot(log / FOLD_DIR / "snapshots" / "4.pth")
    return {}


CASES = [
    # Values, checked with their key's name before any folder is made (issue 12, item 9).
    Case(
        "lr_not_a_number",
        "train",
        {"optim": {"lr": "abc"}},
        match=r"optim\.lr: expected a number > 0, got 'abc'",
    ),
    Case(
        "negative_seed", "train", {"seed": -1}, match=r"seed: expected an int in \[0, 2\*\*32 - 1\], got -1"
    ),
    Case("image_size_not_an_int", "train", {"image_size": 64.7}, match=r"image_size: .* got 64\.7"),
    Case("eval_fold_out_of_range", "train", {"eval_fold": 5}, match=r"eval_fold: expected an int in 0\.\.4"),
    Case("zero_steps", "train", {"n_steps": 0}, match=r"n_steps: expected a positive int, got 0"),
    Case("unknown_test_class", "test", {"test_label": [9]}, match=r"test_label: .*CHAOST2 class values"),
    Case(
        "unknown_validation_class", "train", {"validate_labels": [7]}, match=r"validate_labels: .* got \[7\]"
    ),
    Case("negative_validation_interval", "train", {"validate_every": -5}, match=r"validate_every: .* got -5"),
    Case(
        "negative_label_free_episodes",
        "train",
        {"label_free_episodes": -1},
        match=r"label_free_episodes: expected an int >= 0, got -1",
    ),
    Case(
        "validation_of_nothing",
        "train",
        {"validate_every": 2, "validate_cases": 0, "label_free_episodes": 0},
        match=r"validate_every=2 validates nothing: validate_cases=0 and label_free_episodes=0",
    ),
    # Cases that already held: keys, modes, files (now also before the run folder exists).
    Case("mistyped_key", "train", {"lrr": 0.1}, match=r"unknown config key\(s\): 'lrr'"),
    Case("mistyped_nested_key", "train", {"path": {"log_dri": "x"}}, match=r"did you mean 'path\.log_dir'"),
    Case("exclusion_in_setting1", "train", {"exclude_label": [1]}, match=r"exclude_label=\[1\] .* setting2"),
    Case(
        "mode_of_the_other_script", "train", {"mode": "test"}, match=r"mode='test' was given to the 'train'"
    ),
    Case("cuda_without_gpu", "train", {"device": "cuda"}, RuntimeError, r"device='cuda' was requested"),
    Case(
        "pretrained_file_missing",
        "train",
        {"pretrained_weights": "resnet101", "pretrained_path": "/no/r101.pth"},
        FileNotFoundError,
        r"pretrained_weights='resnet101' not found: /no/r101\.pth",
    ),
    Case(
        "data_root_missing",
        "train",
        {"data_root": "/no/data"},
        FileNotFoundError,
        r"'data_root' .*: /no/data",
    ),
    Case(
        "snapshots_without_resume",
        "train",
        raises=FileExistsError,
        match=r"newest 2\.pth\): pass resume=True",
        prepare=_existing_snapshot,
    ),
    Case(
        "no_snapshot_to_evaluate", "test", raises=FileNotFoundError, match=r"no snapshot in .*fold1/snapshots"
    ),
    Case(
        "checkpoint_file_missing",
        "test",
        {"reload_model_path": "/no/model.pth"},
        FileNotFoundError,
        r"reload_model_path: model checkpoint not found: /no/model\.pth",
    ),
    # Snapshots of another fold, size or dataset (issue 12, item 4).
    Case(
        "snapshot_of_another_fold",
        "test",
        match=r"eval_fold=0 in the checkpoint but eval_fold=1 here.*allow_cross_eval",
        prepare=_reload(eval_fold=0),
    ),
    Case(
        "snapshot_of_another_size",
        "test",
        match=r"image_size=None in the checkpoint but image_size=64 here",
        prepare=_reload(image_size=None),
    ),
    Case(
        "snapshot_of_another_dataset",
        "test",
        match=r"dataset='SABS' in the checkpoint but dataset='CHAOST2'",
        prepare=_reload(dataset="SABS"),
    ),
    # Test classes checked before any evaluation (issue 12, item 5): LIVER is fine and is not evaluated.
    Case(
        "class_missing_from_support",
        "test",
        {"test_label": [1, 4]},
        match=(
            r"SPLEEN \(label 4\): the support volume, case 8, has none; "
            r"the fold's volumes holding it: case 10 \(supp_idx=1\)"
        ),
        outputs="failed_run",
        root="edited",
        prepare=_own_snapshot,
    ),
    Case(
        "class_in_no_query_volume",
        "test",
        {"test_label": [3]},
        match=(
            r"LK \(label 3\): none of the query volumes used \(cases \[10\]\) has it; "
            r"the fold's volumes holding it: case 8 \(supp_idx=0\)"
        ),
        outputs="failed_run",
        root="edited",
        prepare=_own_snapshot,
    ),
    Case(
        "class_in_no_volume",
        "test",
        {"test_label": [2]},
        match=(
            r"RK \(label 2\): the support volume, case 8, has none; "
            r"none of the fold's volumes \(cases \[8, 10\]\) holds it"
        ),
        outputs="failed_run",
        root="edited",
        prepare=_own_snapshot,
    ),
    Case(
        "validation_class_missing",
        "train",
        {"validate_every": 2, "validate_labels": [4]},
        match=r"(?s)validate_labels: .*SPLEEN \(label 4\): the support volume, case 8, has none",
        outputs="failed_run",
        root="edited",
    ),
    # The label-free validation set is drawn at start-up, from the held-out volumes only (issue 18).
    Case(
        "label_free_set_cannot_be_drawn",
        "train",
        {"validate_every": 2, "validate_cases": 0},
        match=(
            r"label-free validation \(label_free_episodes=40\): CHAOST2 fold 1: no episode can be drawn from "
            r"any of the 2 held-out volumes \(cases \[8, 10\]\)"
        ),
        outputs="failed_run",
        root="blank_held_out",
    ),
]


def _files(folder: Path) -> set[Path]:
    return set(folder.rglob("*"))


def _assert_outputs(kind: str, log: Path, before: set[Path]) -> None:
    new = _files(log) - before
    if kind == "nothing":
        assert not new, f"the run left {sorted(map(str, new))}"
        return
    runs = {path.parent for path in new if path.name == "run.json"}
    assert len(runs) == 1, f"expected one Sacred run folder, found {runs}"
    (run,) = runs
    assert json.loads((run / "run.json").read_text())["status"] == "FAILED"
    left = sorted(
        str(p) for p in new if p.name in ("results.json", "predictions", "overlays") or p.suffix == ".pth"
    )
    assert not left, f"partial outputs left behind: {left}"


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_run_fault(case: Case, roots: dict[str, Path], tmp_path: Path):
    import train  # registers the 'train' command on the shared experiment

    if case.id == "cuda_without_gpu" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    log = tmp_path / "runs"
    updates = {"data_root": str(roots[case.root]), "eval_fold": 1, "path": {"log_dir": str(log)}}
    log.mkdir()
    if case.prepare is not None:
        updates |= case.prepare(log)
    updates |= case.updates
    before = _files(log)
    experiment = train.ex if case.command == "train" else load_test_script().ex
    with pytest.raises(case.raises, match=case.match), one_thread():
        experiment.run(case.command, named_configs=["debug"], config_updates=updates)
    _assert_outputs(case.outputs, log, before)


def test_evaluation_failing_part_way_leaves_no_predictions(
    roots: dict[str, Path], tmp_path: Path, monkeypatch
):
    """A disk that fills up while the second class is evaluated: the first class's predictions and
    overlays are removed, no results.json is written, the run is FAILED."""
    script = load_test_script()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # randomly initialised encoder
        torch.manual_seed(0)
        weights = build_difd(pretrained_weights=None).state_dict()
    log = tmp_path / "runs"
    _snapshot(log / FOLD_DIR / "snapshots" / "4.pth", model=weights)
    evaluated = []

    def evaluate_then_fail(model, test_set, *args, **kwargs):
        if evaluated:
            raise OSError(28, "No space left on device")
        evaluated.append(test_set.test_label)
        return script_evaluate_class(model, test_set, *args, **kwargs)

    script_evaluate_class = script.evaluate_class
    monkeypatch.setattr(script, "evaluate_class", evaluate_then_fail)
    before = _files(log)
    updates = {
        "data_root": str(roots["mini"]),
        "eval_fold": 1,
        "path": {"log_dir": str(log)},
        "test_label": [2, 1],
    }
    with pytest.raises(SystemExit, match="^test.py: No space left on device$"), one_thread():
        script.ex.run("test", named_configs=["debug"], config_updates=updates)
    assert evaluated == [2], "RK should have been evaluated (and its outputs written) before the failure"
    _assert_outputs("failed_run", log, before)


def _sacred_test_run(fold_dir: Path, run_id: int, status: str, start: str, dice: float | None) -> None:
    run = fold_dir / "test" / str(run_id)
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"status": status, "start_time": start}))
    (run / "config.json").write_text(json.dumps({"eval_fold": 0}))
    if dice is not None:
        classes = {"LIVER": {"label": 1, "mean_dice": dice, "dice": {"3": dice}}}
        results = {"dataset": "CHAOST2", "eval_fold": 0, "classes": classes, "mean_dice": dice}
        (run / "results.json").write_text(json.dumps(results))


def _script(name: str, *args: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "script" / name), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("newest_status", "said"),
    [("FAILED", "ended with Sacred status FAILED"), ("RUNNING", "never finished (Sacred status RUNNING")],
)
def test_summary_flags_a_fold_whose_newest_evaluation_did_not_complete(tmp_path: Path, newest_status, said):
    root = tmp_path / "CHAOST2_setting1"
    _sacred_test_run(root / "fold0", 1, "COMPLETED", "2026-01-01T10:00:00", 0.8)
    _sacred_test_run(root / "fold0", 2, newest_status, "2026-01-02T10:00:00", None)
    done = _script("summarize.py", root)
    assert done.returncode == 0, done.stderr
    flag = f"fold 0: the newest evaluation, {root / 'fold0' / 'test' / '2'}, {said}"
    assert flag in done.stdout and flag in done.stderr
    assert "| 0 ⚠ | 80.00 | 80.00 | fold0/test/1 |" in done.stdout, done.stdout
    assert flag in (root / "summary.csv").read_text()


def test_summary_refuses_folds_without_a_completed_evaluation(tmp_path: Path):
    root = tmp_path / "CHAOST2_setting1"
    _sacred_test_run(root / "fold0", 1, "FAILED", "2026-01-01T10:00:00", None)
    done = _script("summarize.py", root)
    assert done.returncode != 0 and "no completed evaluation" in done.stderr and "fold0/test/1" in done.stderr
    assert not (root / "summary.md").exists()


@pytest.mark.parametrize(
    ("content", "said"),
    [
        (None, "no metrics.json in {run}"),
        ('{"total": {"steps": [1, 2], "valu', "{run}/metrics.json is not valid JSON"),
        ('{"total": {"steps": [1, 2], "values": [1.0]}}', "{run}/metrics.json: series 'total' needs"),
        ('{"lr": {"steps": [1], "values": [0.1]}}', "no loss terms and no validation Dice to draw"),
    ],
    ids=["missing", "truncated", "ragged", "no_losses"],
)
def test_plot_run_refuses_a_bad_metrics_json(tmp_path: Path, content: str | None, said: str):
    run = tmp_path / "train" / "1"
    run.mkdir(parents=True)
    if content is not None:
        (run / "metrics.json").write_text(content)
    done = _script("plot_run.py", run)
    assert done.returncode == 2 and said.format(run=run) in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and not list(run.glob("*progress.png*"))
