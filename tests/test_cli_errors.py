"""Every command answers a wrong path, a missing folder or a bad option with one line and a non-zero exit,
never a traceback (issue 24, item 5).

Each entry point's ``main`` runs in this process through the wrapper its ``__main__`` block uses
(``utils.run_cli``; ``config.experiment.run_commandline`` for the Sacred scripts), which the first test
checks by reading every entry point's source; two cases run as real subprocesses.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from config.experiment import run_commandline
from tests.run_fixtures import load_script
from utils import run_cli

REPO = Path(__file__).resolve().parent.parent
#: Every command of the repository, by path (benchmarks are measurements, not user commands).
ENTRY_POINTS = {
    "train.py": "run_commandline",
    "test.py": "run_commandline",
    "segment.py": "run_cli",
    "config/__main__.py": "run_commandline",
    "engine/convert_checkpoint.py": "run_cli",
    "script/summarize.py": "run_cli",
    "script/plot_run.py": "run_cli",
    "script/launch.py": "run_cli",
    "data/CHAOST2/preprocess.py": "run_cli",
    "data/SABS/preprocess.py": "run_cli",
    "data/CMR/preprocess.py": "run_cli",
    "data/phantom.py": "run_cli",
    "data/supervoxels/generate_supervoxels.py": "run_cli",
    "data/supervoxels/compare_published.py": "run_cli",
    "data/superpixels/generate_superpixels.py": "run_cli",
}


def test_every_entry_point_goes_through_the_wrapper():
    for path, wrapper in ENTRY_POINTS.items():
        tree = ast.parse((REPO / path).read_text())
        calls = {
            node.func.id
            for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
        }
        assert wrapper in calls, path
    # no other file of the repository has a __main__ block
    found = {
        str(p.relative_to(REPO))
        for folder in ("", "script", "data", "engine", "config", "launcher", "inference", "models")
        for p in (REPO / folder).glob("**/*.py" if folder else "*.py")
        if 'if __name__ == "__main__"' in p.read_text() or p.name == "__main__.py"
    }
    assert found <= set(ENTRY_POINTS), found - set(ENTRY_POINTS)


def _bad_inputs(tmp: Path) -> list[tuple[str, list[str], str]]:
    a_file = tmp / "a_file"
    a_file.write_text("x")
    missing = str(tmp / "missing")
    return [
        ("script/summarize.py", [missing], "not a results.json file or a run folder"),
        ("script/summarize.py", [str(tmp), "--reference", f"{missing}.csv"], "--reference"),
        ("script/summarize.py", ["--bogus", str(tmp)], "unrecognized arguments: --bogus"),
        ("script/plot_run.py", [missing], "no metrics.json in"),
        ("script/plot_run.py", [str(tmp), "--bogus"], "unrecognized arguments"),
        ("script/launch.py", ["status", missing], "is not a grid folder"),
        ("script/launch.py", ["nope"], "invalid choice: 'nope'"),
        ("script/launch.py", ["submit", "--grid", "nowhere:1:0"], "--grid"),
        (
            "segment.py",
            [
                "--checkpoint",
                missing,
                "--support-image",
                missing,
                "--support-label",
                missing,
                "--label",
                "1",
                "--query",
                missing,
                "--out",
                str(tmp / "out"),
            ],
            "scan not found",
        ),  # fmt: skip
        ("segment.py", ["--checkpoint", missing, "--n-part", "many"], "invalid int value: 'many'"),
        ("data/CHAOST2/preprocess.py", ["--input", missing, "--output", str(tmp / "o")], "expected a folder"),
        ("data/SABS/preprocess.py", ["--input", missing, "--output", str(tmp / "o")], "expected a folder"),
        ("data/CMR/preprocess.py", ["--input", missing, "--output", str(tmp / "o")], "expected a folder"),
        ("data/CMR/preprocess.py", ["--bogus"], "required: --input, --output"),
        ("data/phantom.py", ["--out", str(a_file / "sub"), "--n-cases", "1"], "Not a directory"),
        ("data/phantom.py", ["--out", str(tmp), "--n-cases", "many"], "invalid int value"),
        (
            "data/supervoxels/generate_supervoxels.py",
            ["--dataset", "CHAOST2", "--data-root", missing],
            "image folder not found",
        ),
        (
            "data/supervoxels/generate_supervoxels.py",
            ["--dataset", "NOPE", "--data-root", str(tmp)],
            "unknown dataset 'NOPE'",
        ),
        (
            "data/superpixels/generate_superpixels.py",
            ["--dataset", "CHAOST2", "--data-root", missing],
            "image folder not found",
        ),
        (
            "data/supervoxels/compare_published.py",
            ["--dataset", "CHAOST2", "--data-root", missing],
            "not found",
        ),
        ("engine/convert_checkpoint.py", ["--trust-this-file", missing], "not found"),
    ]


def _exit_message(err: pytest.ExceptionInfo[SystemExit], stderr: str) -> str:
    """What the user reads: the exit's message (``sys.exit(str)``) or, for argparse, its stderr."""
    assert "Traceback" not in stderr
    code = err.value.code
    assert code not in (0, None)
    return code if isinstance(code, str) else stderr.strip().splitlines()[-1]


def test_scripts_answer_bad_input_in_one_line(tmp_path, capsys):
    for relative, argv, said in _bad_inputs(tmp_path):
        module = load_script(relative)
        prog = Path(relative).name
        with pytest.raises(SystemExit) as err:
            run_cli(module.main, prog, argv)
        message = _exit_message(err, capsys.readouterr().err)
        assert "\n" not in message and said in message, (relative, argv, message)
        assert message.startswith(f"{prog}: error") or "error:" in message, (relative, message)


@pytest.mark.parametrize(
    ("command", "updates", "said"),
    [
        ("train", ["data_root=/no/such/root"], "train.py: error: data root from the config key 'data_root'"),
        ("train", ["bogus_key=1"], "train.py: error: unknown config key(s): 'bogus_key'"),
        ("train", ["reload_model_path=m.pth"], "train.py: error: train.py does not use the key(s)"),
        ("train", ["device=cuda:99"], "train.py: error: "),
        (
            "test",
            ["reload_model_path=/no/model.pth"],
            "test.py: error: reload_model_path: model checkpoint not",
        ),
        ("test", ["resume=True"], "test.py: error: test.py does not use the key(s) 'resume'"),
        ("print_run_root", ["bogus=1"], "python -m config: error: unknown config key(s): 'bogus'"),
    ],
)
def test_sacred_commands_answer_bad_input_in_one_line(tmp_path, capsys, command, updates, said):
    import train  # noqa: F401 - registers the 'train' command on the shared experiment

    load_script("test.py")
    prog = f"{command}.py" if command != "print_run_root" else "python -m config"
    argv = [prog, command, "with", "debug", f"path.log_dir={tmp_path / 'runs'}", *updates]
    with pytest.raises(SystemExit) as err:
        run_commandline(prog, argv)
    message = _exit_message(err, capsys.readouterr().err)
    assert message.startswith(said) and "\n" not in message, message
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("script", "argv", "said"),
    [
        ("script/summarize.py", ["{tmp}/missing"], "summarize.py: error: not a results.json file"),
        ("train.py", ["with", "debug", "data_root={tmp}/missing"], "train.py: error: data root from"),
    ],
)
def test_a_command_line_run_prints_one_line(tmp_path, script, argv, said):
    done = subprocess.run(
        [sys.executable, str(REPO / script), *(arg.format(tmp=tmp_path) for arg in argv)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and done.stderr.startswith(said), (
        done.stderr
    )
