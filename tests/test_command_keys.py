"""A command refuses the keys it does not use (issue 24, item 2), and ``init_from`` fine-tunes from a
checkpoint's weights with the checks of every checkpoint.

``train.py`` given a key only ``test.py`` reads, and the reverse, stops before any folder is made, naming
the key and the command that reads it; a grid, which runs both, gives each command its own keys. The
``init_from`` runs use the tiny plug-in method of ``tests/plugin_method.py`` at 64 px (debug config).
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest
import torch

from config import COMMAND_ONLY_KEYS, with_args_for
from engine.snapshots import read_snapshot
from models.weights import SNAPSHOT_FORMAT
from tests.run_fixtures import load_test_script, one_thread

REPO = Path(__file__).resolve().parent.parent
PLUGIN = REPO / "tests" / "plugin_method.py"
FOLD_DIR = Path("tiny_proto_CHAOST2_setting1") / "fold1"


def _run(command: str, log: Path, data_root: Path | None = None, **updates: Any):
    import train  # registers the 'train' command on the shared experiment

    experiment = train.ex if command == "train" else load_test_script().ex
    config = {"path": {"log_dir": str(log)}, "eval_fold": 1, **updates}
    if data_root is not None:
        config["data_root"] = str(data_root)
    with one_thread():
        return experiment.run(command, named_configs=["debug"], config_updates=config)


@pytest.mark.parametrize(
    ("command", "updates", "said"),
    [
        ("train", {"reload_model_path": "m.pth"}, r"'reload_model_path' \(read by test.py only; .*init_from"),
        ("train", {"allow_cross_eval": True}, r"'allow_cross_eval' \(read by test.py only\)"),
        ("test", {"resume": True}, r"test.py does not use the key\(s\) 'resume' \(read by train.py only\)"),
        ("test", {"init_from": "model.pth"}, r"'init_from' \(read by train.py only\)"),
        ("test", {"optim.lr": 0.1}, r"'optim' \(read by train.py only\)"),
        ("test", {"n_steps": 9, "validate_every": 2}, r"'n_steps' .*'validate_every'"),
    ],
)
def test_a_command_refuses_the_other_commands_keys(tmp_path, command, updates, said):
    log = tmp_path / "runs"
    with pytest.raises(ValueError, match=said):
        _run(command, log, **updates)
    assert not log.exists()


def test_the_other_commands_keys_are_not_read():
    """No key listed as the other command's is read (``cfg["key"]``) by a command's script."""

    def subscripts(path: Path) -> set[str]:
        return {
            node.slice.value
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant)
        }

    for command, keys in COMMAND_ONLY_KEYS.items():
        other = "test" if command == "train" else "train"
        assert set(keys) & subscripts(REPO / f"{other}.py") == set(), other


def test_a_grid_gives_each_command_its_own_keys():
    grid = ("abd_mri", "eval_fold=1", "n_steps=40", "optim.lr=0.01", "allow_cross_eval=True", "seed=3")
    assert with_args_for("train", grid) == ("abd_mri", "eval_fold=1", "n_steps=40", "optim.lr=0.01", "seed=3")
    assert with_args_for("test", grid) == ("abd_mri", "eval_fold=1", "allow_cross_eval=True", "seed=3")


def _tiny(**updates: Any) -> dict[str, Any]:
    return {"plugins": [str(PLUGIN)], "method": "tiny_proto", **updates}


def test_init_from_starts_from_the_checkpoints_weights(data_root, tmp_path):
    first = tmp_path / "first"
    _run("train", first, data_root, **_tiny())
    source = first / FOLD_DIR / "snapshots" / "4.pth"
    weights = read_snapshot(source)["model"]

    # A learning rate so small that two steps leave the weights where they started.
    second = tmp_path / "second"
    _run("train", second, data_root, **_tiny(init_from=str(source), n_steps=2, optim={"lr": 1e-12}))
    tuned = read_snapshot(second / FOLD_DIR / "snapshots" / "2.pth")
    assert tuned["config"]["init_from"] == str(source)
    assert tuned["model"].keys() == weights.keys()
    for key, value in weights.items():
        torch.testing.assert_close(tuned["model"][key], value, rtol=0, atol=1e-6, msg=key)

    # Without init_from the same run starts elsewhere (so the comparison above can fail).
    third = tmp_path / "third"
    _run("train", third, data_root, **_tiny(n_steps=2, optim={"lr": 1e-12}))
    fresh = read_snapshot(third / FOLD_DIR / "snapshots" / "2.pth")["model"]
    assert any(not torch.allclose(fresh[key], value) for key, value in weights.items())


def test_init_from_is_checked_before_any_work(data_root, tmp_path):
    log = tmp_path / "runs"
    with pytest.raises(FileNotFoundError, match=r"init_from: model checkpoint not found: .*absent.pth"):
        _run("train", log, data_root, **_tiny(init_from=str(tmp_path / "absent.pth")))
    other = tmp_path / "difd.pth"
    torch.save({"format": SNAPSHOT_FORMAT, "step": 4, "model": {}, "config": {"method": "difd"}}, other)
    with pytest.raises(ValueError, match=r"init_from: .*difd.pth is a snapshot of the method 'difd', not of"):
        _run("train", log, data_root, **_tiny(init_from=str(other)))
    with pytest.raises(ValueError, match=r"init_from: expected None or a str, got 3"):
        _run("train", log, data_root, **_tiny(init_from=3))
    assert not log.exists()
