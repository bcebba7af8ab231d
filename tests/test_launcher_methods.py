"""script/launch.py with several methods, without running jobs: --method and --plugin, the runs of each
method (configs, commands, run folders), the dry run of the paper's grid for two methods, the refusals
before anything is submitted, and the status of a grid across methods. The method of
tests/plugin_method.py is registered from outside models/."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import pytest

from launcher.grid import (
    MANIFEST,
    RunSpec,
    parse_grid,
    parse_methods,
    parse_plugins,
    record_submission,
    resolve_runs,
)
from models.methods import method_names
from tests.run_fixtures import load_script

#: The method of tests/plugin_method.py, registered from outside models/.
PLUGIN = str(Path(__file__).parent / "plugin_method.py")


def launch(*argv: str) -> int:
    """``script/launch.py`` in this process."""
    return load_script("script/launch.py").main(list(argv))


class TestMethods:
    """``--method`` and ``--plugin``: every method runs every run of the specs, in a run folder of its own."""

    def test_methods_times_runs(self):
        parse_plugins([PLUGIN])
        runs = parse_grid(["abd_mri:1:0,1"], parse_methods(["difd,tiny_proto"]))
        assert runs == [
            RunSpec("abd_mri", 1, 0),
            RunSpec("abd_mri", 1, 1),
            RunSpec("abd_mri", 1, 0, "tiny_proto"),
            RunSpec("abd_mri", 1, 1, "tiny_proto"),
        ]
        assert parse_methods(None) == ["difd"] and parse_methods(["tiny_proto", "difd"]) == [
            "tiny_proto",
            "difd",
        ]
        assert str(runs[2]) == "tiny_proto abd_mri:1:0"

    @pytest.mark.parametrize(
        ("values", "message"),
        [
            (
                ["nope"],
                r"--method: expected names among difd.*\(comma-separated; .*--plugin FILE\), found 'nope'",
            ),
            (["difd,"], "found ''"),
            (["difd,difd"], "--method: difd is named twice"),
            (["difd", "difd"], "--method: difd is named twice"),
        ],
    )
    def test_bad_methods_are_refused(self, values, message):
        with pytest.raises(ValueError, match=message):
            parse_methods(values)

    def test_the_known_methods_are_listed(self):
        with pytest.raises(ValueError) as refused:
            parse_methods(["nope"])
        assert f"among {', '.join(method_names())} " in str(refused.value)

    def test_configs_and_commands_per_method(self, tmp_path: Path):
        plugins = parse_plugins([PLUGIN])
        assert plugins == [PLUGIN]
        specs = parse_grid(["cmr:1:2"], ["difd", "tiny_proto"])
        grid, (difd, tiny) = resolve_runs(specs, ["debug", f"path.log_dir={tmp_path}"], plugins)
        assert (difd.key, tiny.key) == ("CMR_setting1/fold2", "tiny_proto_CMR_setting1/fold2")
        assert difd.config["method"] == "difd" and tiny.config["method"] == "tiny_proto"
        assert tiny.config["seed"] == 7 and tiny.config["channels"] == 8  # its own official_script and keys
        assert "channels" not in difd.config
        assert "method=tiny_proto" in tiny.train_command(0) and "method=tiny_proto" in tiny.test_command()
        assert not any(arg.startswith("method=") for arg in difd.train_command(0))  # as before methods
        assert (
            f"plugins={[PLUGIN]!r}" in difd.train_command(0)
            and f"plugins={[PLUGIN]!r}" in tiny.test_command()
        )

    def test_a_key_of_another_method_names_the_run(self, tmp_path: Path):
        parse_plugins([PLUGIN])
        specs = parse_grid(["abd_mri:1:0"], ["tiny_proto", "difd"])
        with pytest.raises(ValueError, match=r"run difd abd_mri:1:0: .*'channels' \(a key of tiny_proto"):
            resolve_runs(specs, [f"path.log_dir={tmp_path}", "channels=4"], [PLUGIN])

    def test_bad_plugins_are_refused(self, tmp_path: Path):
        with pytest.raises(ValueError, match="--plugin nope.py: plugins: method file not found"):
            parse_plugins(["nope.py"])
        broken = tmp_path / "broken_method.py"
        broken.write_text("raise RuntimeError('not a method')\n")
        with pytest.raises(ValueError, match="importing it failed: RuntimeError: not a method"):
            parse_plugins([str(broken)])
        with pytest.raises(ValueError, match="cannot import the method module 'no_such_module'"):
            parse_plugins(["no_such_module"])


def test_paper_across_methods(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys):
    """The paper's 25 runs for each method, in 50 distinct run folders, the same checks for each."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no_weights"))
    grid = tmp_path / "grid"
    argv = ["submit", "--grid", "paper", "--method", "difd,tiny_proto", "--plugin", PLUGIN]
    assert launch(*argv, "--cluster", "local", "--dry-run", "with", f"path.log_dir={grid}") == 1
    out, err = capsys.readouterr()
    assert f"grid folder {grid}: 50 run(s), 50 to run, 0 finished before; method(s) difd (25), " in out
    folders = [line.split()[1] for line in out.splitlines() if line.startswith("    folder  ")]
    assert len(folders) == len(set(folders)) == 50
    assert sum(f.startswith(str(grid / "tiny_proto_")) for f in folders) == 25
    assert out.count("ok  resume: starts at step 0") == 50 and out.count("(tiny_proto, CMR, setting 1") == 5
    assert "nothing submitted" in err and not grid.exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--method", "difd,nope"], "--method: expected names among difd.*found 'nope'"),
        (["--method", "difd,difd"], "--method: difd is named twice"),
        (["--method", "tiny_proto", "--plugin", "missing_method.py"], "--plugin missing_method.py: "),
        (["--method", "difd", "with", "method=difd"], "choose it with --method"),
    ],
)
def test_bad_methods_submit_nothing(argv, message, tmp_path: Path, capsys):
    """Refused before anything is checked or submitted, also without --dry-run."""
    argv = [*argv] if "with" in argv else [*argv, "with"]
    code = launch(
        "submit", "--grid", "cmr:1:0", "--cluster", "local", *argv, f"path.log_dir={tmp_path / 'g'}"
    )
    assert code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "g").exists()


def test_status_across_methods(tmp_path: Path, capsys):
    """A row per run with its method; with several methods a count per method, then the total."""
    grid = tmp_path / "grid"
    parse_plugins([PLUGIN])
    specs = parse_grid(["abd_mri:1:0,1"], ["difd", "tiny_proto"])
    _, runs = resolve_runs(specs, ["debug", f"path.log_dir={grid}"], [PLUGIN])
    ended = "999999999"  # a local job whose process is gone
    jobs = {run.key: ended for run in runs[:3]}
    record_submission(
        grid, runs, {"cluster": "local", "host": socket.gethostname(), "submitted": "t", "jobs": jobs}
    )
    for run, stage in zip(runs[:3], ("finished", "finished", "failed"), strict=True):
        run.folder.mkdir(parents=True)
        state = {"job": ended, "stage": stage, "error": "ValueError: boom", "log": "launch.log"}
        (run.folder / "launch.json").write_text(json.dumps(state))
    assert launch("status", str(grid)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["method", "dataset", "setting", "fold"]
    rows = [line.split()[:5] for line in lines[1:] if not line.startswith(" ")][:4]
    assert rows == [
        ["difd", "CHAOST2", "1", "0", "finished"],
        ["difd", "CHAOST2", "1", "1", "finished"],
        ["tiny_proto", "CHAOST2", "1", "0", "failed"],
        ["tiny_proto", "CHAOST2", "1", "1", "not"],
    ]
    assert "    ValueError: boom; log launch.log" in lines
    assert lines[-3:] == [
        "difd: 2 finished",
        "tiny_proto: 1 failed, 1 not submitted",
        "2 finished, 1 failed, 1 not submitted",
    ]
    manifest = json.loads((grid / MANIFEST).read_text())
    assert manifest["runs"]["tiny_proto_CHAOST2_setting1/fold1"]["method"] == "tiny_proto"
