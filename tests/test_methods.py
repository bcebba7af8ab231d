"""The method plug-in interface (models.methods, docs/methods.md): the registry, the method's own config keys,
its official schedule, checkpoints refused across methods, and a method of one's own from outside
``models/`` trained, snapshotted, resumed and evaluated end to end through ``train.py`` and ``test.py``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.snapshots import read_snapshot
from models import get_method, load_model, load_plugins, method_names
from tests.run_fixtures import make_mini_root

REPO = Path(__file__).resolve().parent.parent
PLUGIN = REPO / "tests" / "plugin_method.py"


def _config(named=(), **updates):
    from config import ex

    return ex.run("print_run_root", named_configs=list(named), config_updates=updates).config


def test_registry_names_the_known_methods():
    assert method_names()[0] == "difd"
    with pytest.raises(ValueError, match=r"method: expected one of \['difd'.*got 'nope'"):
        get_method("nope")
    with pytest.raises(ValueError, match=r"method: expected one of \['difd'.*got 'nope'"):
        _config(method="nope")


def test_a_methods_keys_exist_only_with_it():
    difd = _config()
    assert difd["method"] == "difd" and difd["decoder_extra_maps"] is False
    assert set(difd["loss_weights"]) == {"query_nll", "query_boundary", "align_nll", "align_boundary"}
    assert difd["exp_str"] == "CHAOST2_setting1"  # the default method keeps its folder names
    tiny = _config(plugins=[str(PLUGIN)], method="tiny_proto")
    assert tiny["channels"] == 8 and tiny["loss_weights"] == {"query_nll": 1.0}
    assert "decoder_extra_maps" not in tiny and tiny["exp_str"] == "tiny_proto_CHAOST2_setting1"
    with pytest.raises(ValueError, match=r"'decoder_extra_maps' \(a key of difd, not of method=tiny_proto\)"):
        _config(plugins=[str(PLUGIN)], method="tiny_proto", decoder_extra_maps=True)
    with pytest.raises(ValueError, match=r"'channels' \(a key of tiny_proto, not of method=difd\)"):
        _config(plugins=[str(PLUGIN)], channels=4)
    with pytest.raises(
        ValueError, match=r"loss_weights.align_nll' \(a key of difd(, \w+)*, not of method=tiny_proto"
    ):
        _config(plugins=[str(PLUGIN)], method="tiny_proto", loss_weights={"align_nll": 0.0})
    with pytest.raises(ValueError, match=r"channels: expected an int >= 1, got 0"):
        _config(plugins=[str(PLUGIN)], method="tiny_proto", channels=0)
    with pytest.raises(ValueError, match=r"plugins: method file not found: .*missing\.py"):
        _config(plugins=["missing.py"])


def test_official_script_is_the_chosen_methods():
    difd = _config(["official_script"])
    assert (difd["seed"], difd["n_steps"], difd["supp_idx"]) == (2025, 40000, 2)
    tiny = _config(["official_script"], plugins=[str(PLUGIN)], method="tiny_proto")
    assert (tiny["seed"], tiny["n_steps"], tiny["supp_idx"]) == (7, 6, 0)


def test_checkpoints_are_refused_across_methods(tmp_path):
    load_plugins([str(PLUGIN)])
    tiny = get_method("tiny_proto").build({"channels": 8, "scaler": 5.0}, None, None)
    path = tmp_path / "tiny.pth"
    torch.save(tiny.state_dict(), path)
    model, checkpoint = load_model(path)  # recognised by its tensors
    assert type(model).__name__ == "TinyProto" and checkpoint.built_method == "tiny_proto"
    with pytest.raises(ValueError, match=r"tiny.pth holds the weights of 'tiny_proto', not of 'difd'"):
        load_model(path, "difd")
    snapshot = tmp_path / "snapshot.pth"
    config = {"method": "tiny_proto", "channels": 8, "scaler": 5.0}
    torch.save(
        {"format": "difd-weights-v1", "step": 1, "model": tiny.state_dict(), "config": config}, snapshot
    )
    with pytest.raises(ValueError, match=r"snapshot of the method 'tiny_proto', not of 'difd'"):
        load_model(snapshot, "difd")
    assert load_model(snapshot)[1].built_options == {"channels": 8, "scaler": 5.0}
    other = tmp_path / "unet.pth"
    torch.save(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3)).state_dict(), other)
    with pytest.raises(ValueError, match=r"unet.pth: its 2 tensors are the network of none of the methods"):
        load_model(other)


# ------------------------------------------------------------------------- a plug-in end to end
def _run(script: str, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / script), "with", "debug", *overrides]
    env = {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return done


@pytest.mark.e2e
def test_a_method_from_outside_models_trains_resumes_and_evaluates(data_root, tmp_path):
    root = make_mini_root(data_root, tmp_path / "data")
    common = (f"plugins=[{PLUGIN}]", "method=tiny_proto", f"data_root={root}", "eval_fold=1")
    _run("train.py", *common, f"path.log_dir={tmp_path / 'a'}")
    fold = tmp_path / "a" / "tiny_proto_CHAOST2_setting1" / "fold1"
    assert sorted(p.name for p in (fold / "snapshots").iterdir()) == ["2.pth", "4.pth"]
    metrics = json.loads((fold / "train" / "1" / "metrics.json").read_text())
    assert {"query_nll", "total", "lr"} <= set(metrics) and "align_nll" not in metrics
    final = read_snapshot(fold / "snapshots" / "4.pth")
    assert final["config"]["method"] == "tiny_proto" and set(final["model"]) == {
        "stem.weight",
        "stem.bias",
        "scale",
    }

    # Resume: a copy of the run that lost its last snapshot continues from step 2 to the same weights.
    resumed = tmp_path / "b" / "tiny_proto_CHAOST2_setting1" / "fold1" / "snapshots"
    resumed.mkdir(parents=True)
    shutil.copy(fold / "snapshots" / "2.pth", resumed / "2.pth")
    _run("train.py", *common, f"path.log_dir={tmp_path / 'b'}", "resume=True")
    again = read_snapshot(resumed / "4.pth")["model"]
    assert all(torch.equal(again[key], value) for key, value in final["model"].items())

    _run("test.py", *common, f"path.log_dir={tmp_path / 'a'}", "test_label=[2]")
    results = json.loads((fold / "test" / "1" / "results.json").read_text())
    assert results["method"] == "tiny_proto" and results["checkpoint"].endswith("snapshots/4.pth")
    assert 0.0 <= results["classes"]["RK"]["mean_dice"] <= 1.0
    # The same snapshot evaluated as DIFD is refused before anything is written.
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "test.py"),
            "with",
            "debug",
            f"plugins=[{PLUGIN}]",
            f"data_root={root}",
            "eval_fold=1",
            f"reload_model_path={fold / 'snapshots' / '4.pth'}",
            f"path.log_dir={tmp_path / 'c'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHONWARNINGS": "ignore"},
        timeout=300,
    )
    assert done.returncode != 0 and "snapshot of the method 'tiny_proto', not of method='difd'" in done.stderr
    assert not (tmp_path / "c").exists()
