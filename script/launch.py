"""The paper's grid in one command: train and evaluate every run on SLURM or on this machine through
submitit, survive preemption and time limits, show the status, fetch the pretrained weights.

Examples::

    python script/launch.py weights                                   # once, on a machine with internet
    python script/launch.py submit --grid paper --cluster slurm --partition gpu --gpus-per-run 1 \\
        --timeout-min 240 --max-parallel 8 --dry-run                  # lists the 25 runs and their checks
    python script/launch.py submit --grid paper --cluster slurm --partition gpu --gpus-per-run 1
    python script/launch.py submit --grid paper --method difd,gmrd,qnet,adnet --dry-run   # 100 runs
    python script/launch.py submit --grid abd_mri:1:0,3 --cluster local --wait with validate_every=0
    python script/launch.py submit --grid cmr --method mine --plugin my_method.py --dry-run
    python script/launch.py status runs                               # one row per run
    python script/summarize.py runs                                   # the paper's table and reference

``submit``: ``--method`` names the methods (comma-separated, default ``difd``; each runs every run of
``--grid`` in a run folder of its own), ``--plugin`` a file or module registering further methods (as
``train.py``'s ``plugins=``). Every run (:mod:`launcher.grid`) is checked first (:mod:`launcher.checks`);
any problem is reported with the list and nothing is submitted. Then one job per run on SLURM (one job
array, throttled by ``--max-parallel``), or one local job per lane (a lane per ``--gpus-per-run`` visible
GPUs, one on the CPU). Each job trains with ``resume=True`` and evaluates with ``test.py``
(:mod:`launcher.job`); runs the grid folder already finished are skipped. ``with`` arguments go to
``train.py``/``test.py`` after the official schedule of the run's method (``official_script``);
``path.log_dir`` is the grid folder (default ``./runs``). ``--dry-run`` lists each run's commands, folder,
resume point and checks; ``--measure N`` also times N training steps of the first run of each method here
and estimates the grid's device-hours and disk. ``--wait`` waits for the runs to end (what
``script/train.sh`` does) and exits non-zero if one failed.

``status``: one row per run of a grid folder (:mod:`launcher.status`). ``weights``: downloads torchvision's
pretrained files into ``torch.hub``'s checkpoint folder, where ``train.py`` looks for them.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import sys
import time
from pathlib import Path

from config import WEIGHTS_MIRROR_ENV, default_pretrained_path, fetch_pretrained
from engine.runlock import GUARD_NAME, RunLocked, acquire, read_holder, release
from launcher.checks import check_grid, run_is_finished
from launcher.clusters import (
    Resources,
    local_executor,
    plan_lanes,
    slurm_available,
    slurm_executor,
    visible_gpus,
)
from launcher.grid import (
    MANIFEST,
    NotAGrid,
    Run,
    parse_grid,
    parse_methods,
    parse_plugins,
    record_submission,
    resolve_runs,
)
from launcher.job import GridJob, RunTask
from launcher.measure import measure_lines
from launcher.status import format_status, grid_status
from models.encoder import PRETRAINED
from utils import DownloadError, run_cli, timestamp

#: States after which a run needs nothing more from its job.
ENDED = ("finished", "failed", "not submitted", "unknown")
#: Seconds a Ctrl-C of ``--wait`` waits for the local training processes to write their snapshot.
STOP_WAIT_S = 300
#: The least time between SLURM's warning and the job's start: earlier, the warning can come before the
#: job's handler is installed, and it kills the job (measured on SLURM 22.05).
MIN_WARNING_MARGIN_S = 90


def split_with(argv: list[str]) -> tuple[list[str], list[str]]:
    """``[options..., "with", sacred args...]`` → ``(options, sacred args)``."""
    if "with" in argv:
        at = argv.index("with")
        return argv[:at], argv[at + 1 :]
    return argv, []


def resources_of(args: argparse.Namespace) -> Resources:
    resources = Resources(
        gpus_per_run=args.gpus_per_run,
        cpus_per_run=args.cpus_per_run,
        mem_gb=args.mem_gb,
        timeout_min=args.timeout_min,
        signal_delay_s=args.signal_delay_s,
        max_parallel=args.max_parallel,
        max_timeouts=args.max_timeouts,
        partition=args.partition,
        account=args.account,
        qos=args.qos,
        sbatch=args.sbatch,
    )
    limit = resources.time_limit_min(args.cluster)
    if limit is not None and limit * 60 - resources.signal_delay_s < MIN_WARNING_MARGIN_S:
        raise ValueError(
            f"--timeout-min {limit:g} with --signal-delay-s {resources.signal_delay_s}: the warning would "
            f"come {limit * 60 - resources.signal_delay_s:.0f} s after the job starts; at least "
            f"{MIN_WARNING_MARGIN_S} s are needed (a longer time limit or a shorter delay)"
        )
    for name in ("gpus_per_run", "max_timeouts", "retries"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')}: expected an int >= 0, found {getattr(args, name)}")
    if args.max_parallel is not None and args.max_parallel < 1:
        raise ValueError(f"--max-parallel: expected an int >= 1, found {args.max_parallel}")
    return resources


def stop_wait_s(resources: Resources) -> float:
    """How long a warned job waits for its training to write a snapshot: the warning's delay less a margin
    for the requeue itself."""
    return max(10.0, resources.signal_delay_s - 20.0)


def tasks_of(runs: list[Run], gpus_per_run: int) -> list[RunTask]:
    return [
        RunTask(run.key, str(run.folder), run.train_command(gpus_per_run), run.test_command()) for run in runs
    ]


def submit_slurm(grid: Path, todo: list[Run], resources: Resources, args) -> dict[str, str]:
    """One job array (a plain job for one run), in one sbatch call; returns run key → job id."""
    executor = slurm_executor(grid, resources, max(run.config["num_workers"] for run in todo), len(todo))
    stop_wait = stop_wait_s(resources)
    with executor.batch():
        jobs = [
            executor.submit(GridJob([task], args.retries, stop_wait))
            for task in tasks_of(todo, resources.gpus_per_run)
        ]
    return {run.key: job.job_id for run, job in zip(todo, jobs, strict=True)}


def submit_local(grid: Path, todo: list[Run], resources: Resources, args) -> dict[str, str]:
    """One local job per lane, the runs dealt onto the lanes in order; a lane that fails to start cancels
    the ones started."""
    lanes = plan_lanes(visible_gpus(), resources.gpus_per_run, resources.max_parallel)[: len(todo)]
    tasks = tasks_of(todo, resources.gpus_per_run)
    stop_wait = stop_wait_s(resources)
    started, ids = [], {}
    try:
        for index, gpus in enumerate(lanes):
            share = tasks[index :: len(lanes)]
            job = local_executor(grid, resources, gpus).submit(GridJob(share, args.retries, stop_wait))
            started.append(job)
            ids |= {task.key: job.job_id for task in share}
    except BaseException:
        for job in started:
            job.cancel()
        raise
    return ids


def describe_run(run: Run, gpus_per_run: int, finished: bool, findings) -> list[str]:
    config = run.config
    lines = [
        f"{run.key}  ({config['method']}, {config['dataset']}, setting {config['setting']}, "
        f"fold {config['eval_fold']})"
    ]
    if finished:
        lines.append("    finished before: skipped")
    lines.append(f"    folder  {run.folder}")
    lines.append(f"    train   {' '.join(run.train_command(gpus_per_run))}")
    lines.append(f"    test    {' '.join(run.test_command())}")
    lines += [f"    {finding.line()}" for finding in findings]
    return lines


def wait_for(grid: Path, keys: set[str], poll_s: float, cluster: str) -> int:
    """Poll the status of ``keys`` every ``poll_s`` until none is pending, running or requeued; print the
    table; 0 when all finished.

    Ctrl-C (local): the terminal's SIGINT also reaches the local jobs, whose training stops after a snapshot;
    this waits (at most :data:`STOP_WAIT_S`) until no training process holds a run folder, so that the
    same command can continue at once. A second Ctrl-C stops waiting.
    """
    try:
        while True:
            rows = [row for row in grid_status(grid) if row.key in keys]
            if all(row.state in ENDED for row in rows):
                print(format_status(rows))
                return 0 if all(row.state == "finished" for row in rows) else 1
            time.sleep(poll_s)
    except KeyboardInterrupt:
        if cluster == "slurm":
            print("\nstopped waiting; the SLURM jobs go on (script/launch.py status)", file=sys.stderr)
            return 130
    print(
        "\nstopping: the training runs write a snapshot first (continue with the same command)",
        file=sys.stderr,
    )
    deadline = time.monotonic() + STOP_WAIT_S
    try:
        while time.monotonic() < deadline:
            holders = [h for key in keys if (h := read_holder(grid / key)) is not None and h.alive()]
            if not holders:
                break
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    return 130


def submit(args: argparse.Namespace, sacred_args: list[str]) -> int:
    if args.cluster is None:
        reason = slurm_available()
        args.cluster = "local" if reason else "slurm"
        print(f"--cluster {args.cluster}: " + (f"{reason}" if reason else "SLURM answers here (sinfo)"))
    resources = resources_of(args)
    plugins = parse_plugins(args.plugin)
    methods = parse_methods(args.method)
    grid, runs = resolve_runs(parse_grid(args.grid, methods), sacred_args, plugins)
    dry = args.dry_run or args.measure is not None
    made = not grid.exists()
    if not dry:
        acquire(grid, "script/launch.py submit")  # one submission at a time into a grid folder
    try:
        general, per_run = check_grid(grid, runs, args.cluster, resources)
        finished = {run.key for run in runs if run_is_finished(run)}
        todo = [run for run in runs if run.key not in finished]
        per_method = ", ".join(f"{m} ({sum(r.spec.method == m for r in runs)})" for m in methods)
        print(
            f"grid folder {grid}: {len(runs)} run(s), {len(todo)} to run, {len(finished)} finished before; "
            f"method(s) {per_method}"
        )
        for run in runs:
            print("\n".join(describe_run(run, resources.gpus_per_run, run.key in finished, per_run[run.key])))
        print("checks of the grid:" if general else "checks of the grid: none (nothing to run)")
        for finding in general:
            print(f"    {finding.line()}")
        problems = [f.line() for f in general if not f.ok]
        problems += [f"{f.line()} ({key})" for key, found in per_run.items() for f in found if not f.ok]
        if problems:
            print(f"{len(problems)} problem(s), nothing submitted:", file=sys.stderr)
            print("\n".join(f"  {line}" for line in problems), file=sys.stderr)
            return 1
        if args.measure is not None:
            limit = resources.time_limit_min(args.cluster)
            lines = measure_lines(
                todo or runs, args.measure, resources.gpus_per_run, limit, resources.max_timeouts
            )
            print("\n".join(lines))
        if dry or not todo:
            print("dry run: nothing submitted" if dry else "nothing to submit: every run finished before")
            return 0
        if args.cluster == "slurm":
            jobs = submit_slurm(grid, todo, resources, args)
        else:
            jobs = submit_local(grid, todo, resources, args)
        submission = {
            "submitted": timestamp(),
            "cluster": args.cluster,
            "host": socket.gethostname(),
            "options": {key: value for key, value in vars(args).items() if key != "func"},
            "with": sacred_args,
            "jobs": jobs,
        }
        record_submission(grid, todo, submission)
    finally:
        if not dry:
            release(grid)
            if made and not (grid / MANIFEST).exists():  # nothing submitted: no folder left behind either
                (grid / GUARD_NAME).unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    grid.rmdir()
    print(f"submitted {len(todo)} run(s): jobs {', '.join(sorted(set(jobs.values())))}")
    print(f"status: python script/launch.py status {grid}\nreport: python script/summarize.py {grid}")
    if args.wait:
        poll_s = args.poll_s or (30.0 if args.cluster == "slurm" else 2.0)  # squeue on a big cluster vs files
        return wait_for(grid, set(jobs), poll_s, args.cluster)
    return 0


def status(args: argparse.Namespace) -> int:
    print(format_status(grid_status(args.grid_folder)))
    return 0


def weights(args: argparse.Namespace) -> int:
    kinds = sorted(PRETRAINED) if args.kind == "all" else [args.kind]
    for kind in kinds:
        target = Path(args.dir) / PRETRAINED[kind].file_name if args.dir else default_pretrained_path(kind)
        if target.is_file():
            print(f"{kind}: {target} is there already")
            continue
        print(f"{kind}: downloading to {target}")
        fetch_pretrained(kind, target, args.mirror)
        print(f"{kind}: {target} (SHA-256 starts with {PRETRAINED[kind].sha256_prefix}, as its name says)")
    return 0


def main(argv: list[str] | None = None) -> int:
    options, sacred_args = split_with(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    commands = parser.add_subparsers(dest="command", required=True)

    sub = commands.add_parser("submit", help="check, then submit a grid (see the module docstring)")
    sub.add_argument(
        "--grid", action="append", required=True, help="paper, or <dataset>[:<settings>[:<folds>]]"
    )
    sub.add_argument(
        "--method",
        action="append",
        help="methods, comma-separated (default difd): each runs every run of --grid",
    )
    sub.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="FILE",
        help="a .py file or module that registers further methods (train.py's plugins=); repeatable",
    )
    sub.add_argument(
        "--cluster", choices=("slurm", "local"), help="default: slurm where SLURM answers (sinfo), else local"
    )
    sub.add_argument("--partition")
    sub.add_argument("--account")
    sub.add_argument("--qos")
    sub.add_argument("--gpus-per-run", type=int, default=0, help="GPUs of each run; >1 trains with DDP")
    sub.add_argument("--cpus-per-run", type=int, help="default (num_workers + 1) per training process")
    sub.add_argument("--mem-gb", type=float)
    sub.add_argument("--timeout-min", type=float, help="time limit of a job (SLURM default 240; local none)")
    sub.add_argument("--signal-delay-s", type=int, default=90, help="warning before the time limit")
    sub.add_argument("--max-parallel", type=int, help="SLURM: the array's throttle; local: lanes at most")
    sub.add_argument("--max-timeouts", type=int, default=20, help="requeues after a time limit, per job")
    sub.add_argument("--retries", type=int, default=1, help="retries of a failed training or evaluation")
    sub.add_argument("--sbatch", action="append", default=[], metavar="OPTION", help="extra #SBATCH option")
    sub.add_argument("--dry-run", action="store_true", help="list the runs and checks, submit nothing")
    sub.add_argument(
        "--measure", type=int, metavar="N", help="time N steps here and estimate (no submission)"
    )
    sub.add_argument("--wait", action="store_true", help="wait for the runs to end")
    sub.add_argument(
        "--poll-s", type=float, help="seconds between status polls of --wait (SLURM 30, local 2)"
    )
    sub.set_defaults(func=lambda args: submit(args, sacred_args))

    stat = commands.add_parser("status", help="one row per run of a grid folder")
    stat.add_argument("grid_folder", type=Path)
    stat.set_defaults(func=status)

    fetch = commands.add_parser("weights", help="download the pretrained weights (needs internet)")
    fetch.add_argument("--kind", choices=(*sorted(PRETRAINED), "all"), default="deeplabv3")
    fetch.add_argument("--dir", help="folder to put the file in (default: torch.hub's checkpoint folder)")
    fetch.add_argument(
        "--mirror", help=f"base address instead of torchvision's (default ${WEIGHTS_MIRROR_ENV})"
    )
    fetch.set_defaults(func=weights)

    args = parser.parse_args(options)
    if sacred_args and args.command != "submit":
        parser.error(f"'with' arguments are for submit, not {args.command}")
    try:
        return args.func(args)
    except (ValueError, NotAGrid, RunLocked, DownloadError, FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    run_cli(main, "launch.py")
