"""script/launch.py and the launcher package without running jobs: grid specs, the runs' configs and
commands, the sbatch parameters, the local lanes, the checks of a dry run (each bad input a clear error
before anything is submitted), status on a folder that is not a grid, the weights command, --measure
(across two methods; the rest of several methods is in test_launcher_methods.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

from launcher.clusters import Resources, plan_lanes, sbatch_options, slurm_available, slurm_parameters
from launcher.grid import (
    MANIFEST,
    PAPER_SETTINGS,
    RunSpec,
    parse_grid,
    parse_with,
    record_submission,
    resolve_runs,
)
from models.encoder import PRETRAINED
from tests.run_fixtures import load_script, make_mini_root

NO_SLURM = slurm_available()
#: The method of tests/plugin_method.py, registered from outside models/.
PLUGIN = str(Path(__file__).parent / "plugin_method.py")


def launch(*argv: str) -> int:
    """``script/launch.py`` in this process."""
    return load_script("script/launch.py").main(list(argv))


class TestGridSpecs:
    def test_paper_is_the_25_runs(self):
        runs = parse_grid(["paper"])
        expected = {
            (dataset, setting, fold)
            for dataset, setting in (("abd_mri", 1), ("abd_mri", 2), ("abd_ct", 1), ("abd_ct", 2), ("cmr", 1))
            for fold in range(5)
        }
        assert len(runs) == 25 and {(r.dataset_config, r.setting, r.fold) for r in runs} == expected
        assert list(PAPER_SETTINGS) == ["abd_mri", "abd_ct", "cmr"]

    def test_dataset_settings_and_folds(self):
        assert parse_grid(["abd_mri:2:0,3"]) == [RunSpec("abd_mri", 2, 0), RunSpec("abd_mri", 2, 3)]
        assert parse_grid(["cmr"]) == [RunSpec("cmr", 1, f) for f in range(5)]  # the paper's setting only
        assert len(parse_grid(["abd_ct"])) == 10
        assert parse_grid(["abd_ct:1,2:1-2"]) == [RunSpec("abd_ct", s, f) for s in (1, 2) for f in (1, 2)]
        assert parse_grid(["abd_mri:1:4", "cmr:2:0"]) == [RunSpec("abd_mri", 1, 4), RunSpec("cmr", 2, 0)]

    @pytest.mark.parametrize(
        ("spec", "message"),
        [
            ("abd_xx", "expected 'paper' or <dataset>.*found dataset 'abd_xx'"),
            ("CHAOST2:1", "dataset among abd_mri, abd_ct, cmr"),
            ("abd_mri:3", "settings must be among 1, 2.*found '3'"),
            ("abd_mri:1:5", "folds must be among 0, 1, 2, 3, 4.*found '5'"),
            ("abd_mri:1:x", "folds must be among.*found 'x'"),
            ("abd_mri:1:0:2", "3 ':' parts"),
        ],
    )
    def test_unknown_names_are_refused(self, spec, message):
        with pytest.raises(ValueError, match=message):
            parse_grid([spec])

    def test_a_run_named_twice_is_refused(self):
        with pytest.raises(ValueError, match="abd_mri setting 1 fold 0 is named twice"):
            parse_grid(["paper", "abd_mri:1:0"])

    @pytest.mark.parametrize(
        ("arg", "message"),
        [
            ("abd_ct", "chosen by --grid"),
            ("setting2", "chosen by --grid"),
            ("eval_fold=2", "the grid sets eval_fold"),
            ("resume=False", "the grid sets resume"),
            ("dataset=SABS", "the grid sets dataset"),
            ("method=difd", r"the grid sets method for each run \(choose it with --method\)"),
            ("plugins=[a.py]", r"the grid sets plugins for each run \(choose it with --plugin\)"),
        ],
    )
    def test_with_arguments_the_grid_sets_are_refused(self, arg, message):
        with pytest.raises(ValueError, match=message):
            parse_with([arg])

    def test_with_arguments(self):
        assert parse_with(["debug", "resume=True", "n_steps=8", "path.log_dir=/x"]) == (
            ["debug"],
            ["resume=True", "n_steps=8"],
            "/x",
        )


class TestRuns:
    def test_commands_and_folders(self, tmp_path: Path):
        grid, runs = resolve_runs(parse_grid(["abd_ct:2:3"]), ["debug", f"path.log_dir={tmp_path / 'g'}"])
        (run,) = runs
        assert grid == tmp_path / "g" and run.key == "SABS_setting2/fold3" and run.folder == grid / run.key
        assert run.config["dataset"] == "SABS" and run.config["resume"] is True
        assert run.config["seed"] == 2025 and run.config["n_steps"] == 4  # official_script, then debug
        train = run.train_command(1)
        assert train[:2] == (sys.executable, str(Path(__file__).parent.parent / "train.py"))
        assert train[2:] == (
            "with",
            "abd_ct",
            "setting2",
            "official_script",
            "debug",
            "eval_fold=3",
            f"path.log_dir={grid}",
            "resume=True",
        )
        assert run.test_command()[1].endswith("test.py") and "resume=True" not in run.test_command()

    def test_several_gpus_train_under_torchrun(self, tmp_path: Path):
        _, (run,) = resolve_runs(parse_grid(["cmr:1:0"]), [f"path.log_dir={tmp_path}"])
        command = run.train_command(4)
        assert command[:5] == (
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=4",
        )
        assert command[5].endswith("train.py") and command[-1] == "resume=True"

    def test_a_bad_value_names_the_run(self, tmp_path: Path):
        with pytest.raises(ValueError, match=r"(?s)run difd abd_mri:1:0: bad config value.*optim.lr"):
            resolve_runs(parse_grid(["abd_mri:1:0"]), [f"path.log_dir={tmp_path}", "optim.lr=-1"])


class TestClusters:
    def test_sbatch_parameters(self):
        resources = Resources(
            gpus_per_run=2,
            mem_gb=16,
            timeout_min=120,
            max_parallel=4,
            partition="gpu",
            account="lab",
            qos="high",
            signal_delay_s=60,
            sbatch=["--constraint=a100", "#SBATCH --exclusive"],
        )
        parameters = slurm_parameters(resources, num_workers=1, n_runs=25)
        assert parameters == {
            "job_name": "difd",
            "time": 120,
            "nodes": 1,
            "ntasks_per_node": 1,
            "cpus_per_task": 4,  # 2 processes x (1 worker + 1)
            "signal_delay_s": 60,
            "array_parallelism": 4,
            "stderr_to_stdout": True,
            "gpus_per_node": 2,
            "partition": "gpu",
            "account": "lab",
            "qos": "high",
            "mem": "16384M",
            "additional_parameters": {"constraint": "a100", "exclusive": True},
        }
        assert slurm_parameters(Resources(), num_workers=0, n_runs=3)["array_parallelism"] == 3
        with pytest.raises(ValueError, match="expected an sbatch option"):
            sbatch_options(["--no such"])

    @pytest.mark.skipif(NO_SLURM is not None, reason=f"the sbatch script needs srun: {NO_SLURM}")
    def test_sbatch_script(self, tmp_path: Path):
        from launcher.clusters import sbatch_script, slurm_executor

        resources = Resources(
            gpus_per_run=1, max_parallel=3, timeout_min=30, qos="q", sbatch=["--exclude=n1"]
        )
        lines = set(sbatch_script(slurm_executor(tmp_path, resources, 1, 25), 25).splitlines())
        expected = {
            "#SBATCH --array=0-24%3",
            "#SBATCH --gpus-per-node=1",
            "#SBATCH --cpus-per-task=2",
            "#SBATCH --time=30",
            "#SBATCH --qos=q",
            "#SBATCH --exclude=n1",
            "#SBATCH --signal=USR2@90",
        }
        assert expected <= lines
        assert not (tmp_path / "submitit").exists()  # nothing written before a submission

    def test_local_lanes(self):
        assert plan_lanes([0, 1, 2, 3], 1, None) == [[0], [1], [2], [3]]
        assert plan_lanes([0, 1, 2, 3], 2, None) == [[0, 1], [2, 3]]
        assert plan_lanes([3, 5, 6], 2, None) == [[3, 5]]
        assert plan_lanes([0, 1, 2, 3], 1, 2) == [[0], [1]]
        assert plan_lanes([], 0, None) == [[]]  # the CPU: one run at a time
        with pytest.raises(ValueError, match="--gpus-per-run 2: this machine shows 1 GPU"):
            plan_lanes([0], 2, None)


@pytest.fixture(scope="module")
def mini_root(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_mini_root(data_root, tmp_path_factory.mktemp("mini_launch"))


class TestDryRun:
    """Everything is checked and listed; a bad input is a clear error and nothing is submitted (no grid
    folder, no job)."""

    def test_paper_lists_25_runs_with_their_checks(
        self, data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
    ):
        monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no_weights"))
        grid = tmp_path / "grid"
        assert (
            launch(
                "submit", "--grid", "paper", "--cluster", "local", "--dry-run", "with", f"path.log_dir={grid}"
            )
            == 1
        )
        out, err = capsys.readouterr()
        assert f"grid folder {grid}: 25 run(s), 25 to run" in out
        assert out.count("    train   ") == 25 and out.count("    test    ") == 25
        assert out.count("ok  resume: starts at step 0") == 25
        assert "ok  data: 20 CHAOST2 cases" in out and "ok  data: 35 CMR cases" in out
        assert "nothing submitted" in err
        assert "ERR weights: pretrained checkpoint for pretrained_weights='deeplabv3' not found" in err
        assert "python script/launch.py weights --kind deeplabv3" in err
        if len(list((data_root / "SABS").glob("*/image_*.nii.gz"))) < 30:  # the 8-case copy
            assert "ERR data: SABS fold 2: needs a support and at least one query volume" in err
        assert not grid.exists()

    def test_a_valid_grid_passes(self, mini_root: Path, tmp_path: Path, capsys):
        grid = tmp_path / "grid"
        code = launch(
            "submit", "--grid", "abd_mri:1,2:0,1", "--cluster", "local", "--dry-run",
            "with", "debug", "supp_idx=0", f"data_root={mini_root}", f"path.log_dir={grid}",
        )  # fmt: skip
        out, _ = capsys.readouterr()
        assert code == 0, out
        assert "4 run(s), 4 to run" in out and "ERR" not in out
        assert "ok  weights: none" in out and "ok  disk:" in out and "ok  CUDA:" in out
        assert out.rstrip().endswith("dry run: nothing submitted") and not grid.exists()

    @pytest.mark.parametrize(
        ("argv", "message"),
        [
            (["--grid", "abd_mri:7"], "settings must be among 1, 2"),
            (["--grid", "abd_mri:1:9"], "folds must be among 0, 1, 2, 3, 4"),
            (["--grid", "sabs"], "expected 'paper' or <dataset>"),
            (
                ["--grid", "abd_mri", "--timeout-min", "2", "--signal-delay-s", "60"],
                "at least 90 s are needed",
            ),
            (["--grid", "abd_mri", "with", "abd_ct"], "chosen by --grid"),
            (["--grid", "abd_mri", "with", "n_stepz=3"], "unknown config key.*'n_stepz'"),
        ],
    )
    def test_bad_arguments(self, argv, message, tmp_path: Path, capsys):
        argv = [*argv] if "with" in argv else [*argv, "with"]
        code = launch("submit", "--cluster", "local", "--dry-run", *argv, f"path.log_dir={tmp_path / 'g'}")
        assert code == 2
        assert re.search(message, capsys.readouterr().err)
        assert not (tmp_path / "g").exists()

    def test_no_data(self, tmp_path: Path, capsys):
        empty = tmp_path / "data"
        empty.mkdir()
        code = launch(
            "submit", "--grid", "cmr:1:0", "--cluster", "local", "--dry-run",
            "with", "debug", f"data_root={empty}", f"path.log_dir={tmp_path / 'g'}",
        )  # fmt: skip
        assert code == 1
        assert f"ERR data: CMR: image folder not found: {empty / 'CMR'}" in capsys.readouterr().err

    def test_a_refused_submission_leaves_nothing(self, tmp_path: Path, capsys):
        """Not a dry run: the same checks refuse it, and no grid folder is left."""
        empty, grid = tmp_path / "data", tmp_path / "grid"
        empty.mkdir()
        argv = ["--grid", "cmr:1:0", "--cluster", "local", "with", "debug", f"data_root={empty}"]
        assert launch("submit", *argv, f"path.log_dir={grid}") == 1
        assert "nothing submitted" in capsys.readouterr().err and not grid.exists()

    def test_grid_folder_of_another_config(self, mini_root: Path, tmp_path: Path, capsys):
        grid = tmp_path / "grid"
        common = ["debug", "supp_idx=0", f"data_root={mini_root}", f"path.log_dir={grid}"]
        _, runs = resolve_runs(parse_grid(["abd_mri:1:0"]), [*common, "n_steps=6"])
        record_submission(grid, runs, {"cluster": "local", "host": "x", "submitted": "t", "jobs": {}})
        code = launch("submit", "--grid", "abd_mri:1:0", "--cluster", "local", "--dry-run", "with", *common)
        assert code == 1
        err = capsys.readouterr().err
        assert (
            f"{grid} holds this run with another config: CHAOST2_setting1/fold0: n_steps=6 there but 4 now"
            in err
        )

    @pytest.mark.skipif(NO_SLURM is not None, reason=f"SLURM is not reachable here: {NO_SLURM}")
    @pytest.mark.parametrize(
        ("options", "message"),
        [
            (["--partition", "no_such_partition"], "SLURM refuses the job script.*invalid partition"),
            (["--gpus-per-run", "1"], "SLURM refuses the job script.*gres"),
            (["--cpus-per-run", "512"], "SLURM refuses the job script"),
        ],
    )
    def test_what_slurm_refuses(self, options, message, mini_root: Path, tmp_path: Path, capsys):
        code = launch(
            "submit", "--grid", "abd_mri:1:0", "--cluster", "slurm", "--dry-run", *options,
            "with", "debug", "supp_idx=0", f"data_root={mini_root}", f"path.log_dir={tmp_path / 'g'}",
        )  # fmt: skip
        assert code == 1
        assert re.search(message, capsys.readouterr().err, flags=re.I)


def test_status_of_a_folder_that_is_not_a_grid(tmp_path: Path, capsys):
    assert launch("status", str(tmp_path)) == 2
    assert f"{tmp_path} is not a grid folder: expected {tmp_path / MANIFEST}" in capsys.readouterr().err
    (tmp_path / "CHAOST2_setting1" / "fold0" / "snapshots").mkdir(parents=True)
    assert launch("status", str(tmp_path)) == 2
    assert "run folders made without the launcher (CHAOST2_setting1)" in capsys.readouterr().err
    assert launch("status", str(tmp_path / "missing")) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / MANIFEST).write_text(json.dumps({"format": "something else"}))
    assert launch("status", str(tmp_path)) == 2
    assert "expected format 'difd-grid/1'" in capsys.readouterr().err


def test_weights_command(tmp_path: Path, capsys):
    """A mirror holding a damaged file: the hash is refused and nothing is left; a missing file names
    the address."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    name = PRETRAINED["resnet101"].file_name
    (mirror / name).write_bytes(b"not the weights")
    target = tmp_path / "weights"
    argv = ["weights", "--kind", "resnet101", "--mirror", mirror.as_uri(), "--dir", str(target)]
    assert launch(*argv) == 2
    assert 'invalid hash value (expected "63fe2227"' in capsys.readouterr().err
    assert not (target / name).exists() and os.listdir(target) == []
    shutil.rmtree(mirror)
    assert launch(*argv) == 2
    assert f"cannot download {mirror.as_uri()}/{name}" in capsys.readouterr().err


@pytest.mark.e2e
def test_measure_times_steps_here_and_estimates(
    mini_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
):
    """--measure trains N+1 steps of the first run of each method in a scratch folder (removed) and
    estimates each method's runs and the grid; nothing is submitted and the grid folder is not made."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as the other runs of the tests (2 threads: 4x slower here)
    grid = tmp_path / "grid"
    code = launch(
        "submit", "--grid", "abd_mri:1,2:1", "--method", "difd,tiny_proto", "--plugin", PLUGIN,
        "--cluster", "local", "--measure", "2", "--timeout-min", "30",
        "with", "debug", "supp_idx=0", f"data_root={mini_root}", f"path.log_dir={grid}", "n_steps=10",
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    hours = {}
    for method in ("difd", "tiny_proto"):
        section = out.split(f"method {method}: 2 run(s), 2 steps of ")[1]
        per_step = float(
            re.search(r"device, cpu: ([0-9.]+) s per training step \(mean of steps 2-3", section).group(1)
        )
        assert 0 < per_step < 60
        assert "snapshots written: " in section and " MB weights-only" in section
        found = re.search(r"the 2 run\(s\) to train.*: ([0-9.]+) CPU-hours of training", section)
        hours[method] = float(found.group(1))
        assert hours[method] == pytest.approx(2 * 10 * per_step / 3600, abs=0.006)
        assert "about 1 job(s) per run" in section
    total = float(re.search(r"all 4 run\(s\) of the 2 methods: ([0-9.]+) CPU-hours", out).group(1))
    assert total == pytest.approx(sum(hours.values()), abs=0.011)
    assert out.rstrip().endswith("dry run: nothing submitted") and not grid.exists()


def test_estimate_of_the_official_schedule(tmp_path: Path):
    """40 000 steps at 0.37 s (the official GPU speed): hours, disk under the keep policy, jobs under a
    time limit, and a warning when they need more requeues than --max-timeouts allows."""
    from launcher.measure import Measurement, estimate_lines

    _, runs = resolve_runs(parse_grid(["abd_mri:1:0,1"]), [f"path.log_dir={tmp_path}"])
    measured = Measurement("cpu", 3, 0.37, 5.0, 496_000_000, 248_000_000)
    lines = estimate_lines(runs, measured, 1, 60, 3)
    assert "the 2 run(s) to train, at this device's speed (1 device(s) per run): 8.22 CPU-hours" in lines[2]
    assert "2.5 GB when finished, 3.5 GB at most while training" in lines[3]  # 2 x (3 x 248 + 496) MB
    assert "trains about 247 min, so about 5 job(s) per run" in lines[4]
    assert lines[5].startswith("warning: that is more requeues than --max-timeouts 3 allows")
    assert len(estimate_lines(runs, measured, 1, 60, 4)) == 5
