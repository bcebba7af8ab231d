"""The status of a grid, read off the disk (and ``squeue`` when SLURM answers), so that it works from a
login node while jobs run and after they are gone.

Per run (its method, dataset, setting and fold): the state, one of ``pending`` (submitted, not started),
``running``, ``requeued`` (waiting to run again after a time limit, preemption or failure), ``finished``
(trained and evaluated), ``failed`` (or stopped from outside, or its job ended without finishing it), ``not
submitted``; the step reached (newest snapshot or logged step) of the total; the last validation Dice; the
time spent (Sacred's start, heartbeat and stop times of its train and test runs); an estimate of the training
time left (the current run's logged steps per second); and for a failed run its log and last error line.
Sources: ``grid.json`` (runs, jobs), each run folder's ``launch.json`` (the job's record of the run),
snapshots, Sacred's ``run.json`` and ``metrics.json``, submitit's job logs, and the job's state in ``squeue``
or its local process.

Everything is read as text or JSON (snapshots as data, :mod:`models.files`): never submitit's pickled
``*_result.pkl``, whose error the job's ``*_log.err`` holds as text (docs/cluster.md, "What is trusted").
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from engine.progress import merge_metrics, read_metrics
from engine.snapshots import latest_snapshot
from launcher.clusters import JOBS_FOLDER, RUNNING, WAITING, job_active, squeue_states
from launcher.grid import latest_jobs, read_manifest
from launcher.job import FAILED, FINISHED, STOPPED, last_error_line, log_tail, read_state, sacred_run_ids
from models.methods import DEFAULT_METHOD
from utils import utc_now


@dataclass
class RunStatus:
    """One row of ``script/launch.py status``."""

    key: str
    method: str
    dataset: str
    setting: int
    fold: int
    state: str
    step: int
    total: int
    val_dice: float | None
    elapsed_s: float
    eta_s: float | None
    job: str
    note: str


def _time(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


def elapsed_seconds(folder: Path, running: bool) -> float:
    """Time spent by the run's Sacred runs (train and test): stop time, else heartbeat (now for a run
    still going), minus start time."""
    total = 0.0
    for stage in ("train", "test"):
        ids = sacred_run_ids(folder / stage)
        for run_id in ids:
            try:
                run = json.loads((folder / stage / str(run_id) / "run.json").read_text())
            except (OSError, ValueError):
                continue
            start = _time(run.get("start_time"))
            end = _time(run.get("stop_time"))
            if end is None:
                end = utc_now() if running and run_id == ids[-1] else _time(run.get("heartbeat"))
            if start and end:
                total += max(0.0, (end - start).total_seconds())
    return total


def training_progress(folder: Path) -> tuple[int, float | None, float | None]:
    """``(logged step, last validation Dice, steps per second of the newest train run)``."""
    runs = []
    for run_id in sacred_run_ids(folder / "train"):
        try:
            runs.append(read_metrics(folder / "train" / str(run_id)))
        except (FileNotFoundError, ValueError):
            continue  # nothing logged yet, or being written
    if not runs:
        return 0, None, None
    merged = merge_metrics(runs)
    steps = merged.get("total", {}).get("steps", [])
    val = merged.get("val_dice_mean", {}).get("values", [])
    newest = runs[-1].get("total", {})
    rate = None
    stamps = newest.get("timestamps") or []
    if len(stamps) >= 2 and len(newest.get("steps", [])) == len(stamps):
        seconds = (_time(stamps[-1]) - _time(stamps[0])).total_seconds()
        if seconds > 0:
            rate = (newest["steps"][-1] - newest["steps"][0]) / seconds
    return (steps[-1] if steps else 0), (val[-1] if val else None), rate


#: The line submitit logs to a job's stderr when the submitted function raised (its traceback follows).
SUBMITIT_RAISED = "Submitted job triggered an exception"


def result_error(grid: Path, job: str) -> str | None:
    """The error ``job`` raised, read off its ``*_log.err`` (the last error line after submitit's
    :data:`SUBMITIT_RAISED`); None when the job raised nothing."""
    for path in sorted((grid / JOBS_FOLDER).glob(f"{job}/{job}_*_log.err")):
        lines = log_tail(path)
        raised = [i for i, line in enumerate(lines) if SUBMITIT_RAISED in line]
        if raised:
            return last_error_line(lines[raised[-1] + 1 :]) or None
    return None


def job_log(grid: Path, job: str) -> Path | None:
    found = sorted((grid / JOBS_FOLDER).glob(f"{job}/{job}_*_log.out"))
    return found[0] if found else None


def run_status(grid: Path, key: str, entry: dict[str, Any], job_info, states) -> RunStatus:
    """The row of run ``key`` (``entry``: its record in grid.json; ``job_info``: its latest job and
    submission, or None)."""
    folder = grid / key
    state = read_state(folder) or {}
    newest = latest_snapshot(folder / "snapshots")
    logged, val, rate = training_progress(folder)
    step = max(logged, int(newest.stem) if newest is not None else 0)
    total = int(entry["n_steps"])
    job, note = "", ""
    if job_info is None:
        name, active = "not submitted", False
    else:
        job, submission = job_info
        active, queue_state = job_active(submission["cluster"], job, submission["host"], states)
        mine = state.get("job") == job
        stage = state.get("stage") if mine else None
        if stage == FINISHED:
            name = "finished"
        elif stage in (FAILED, STOPPED):
            name, note = "failed", f"{state.get('error')}; log {state.get('log')}"
        elif active and queue_state in WAITING:
            name = "requeued" if mine and state.get("attempts") else "pending"
        elif active and (queue_state in RUNNING or submission["cluster"] == "local"):
            name = "running" if mine else "pending"  # a local lane may not have reached this run yet
        elif active is None:
            name, note = "unknown", f"{queue_state}: cannot be asked from here"
        else:
            error = result_error(grid, job)
            log = state.get("log") if mine else job_log(grid, job)
            last = last_error_line(log_tail(log)) if log else ""
            name = "failed"
            note = f"job {job} ended ({queue_state}) without finishing the run: {error or last}; log {log}"
    running = name == "running"
    eta = (total - step) / rate if running and rate and state.get("stage") == "training" else None
    return RunStatus(
        key,
        entry.get("method") or entry.get("config", {}).get("method", DEFAULT_METHOD),  # older grids
        entry["dataset"],
        int(entry["setting"]),
        int(entry["fold"]),
        name,
        step,
        total,
        val,
        elapsed_seconds(folder, running),
        eta,
        job,
        note,
    )


def grid_status(grid: str | Path) -> list[RunStatus]:
    """One row per run of the grid folder (:class:`launcher.grid.NotAGrid` for any other folder)."""
    grid = Path(grid).resolve()
    manifest = read_manifest(grid)
    jobs = latest_jobs(manifest)
    states = squeue_states([job for job, sub in jobs.values() if sub["cluster"] == "slurm"])
    return [run_status(grid, key, entry, jobs.get(key), states) for key, entry in manifest["runs"].items()]


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def format_status(rows: list[RunStatus]) -> str:
    """The status table (plain text), then with several methods a count per state of each, then a count
    per state of all runs."""
    header = ["method", "dataset", "setting", "fold", "state", "step", "val Dice", "elapsed", "left", "job"]
    table = [
        [
            row.method,
            row.dataset,
            str(row.setting),
            str(row.fold),
            row.state,
            f"{row.step}/{row.total}",
            "–" if row.val_dice is None else f"{100 * row.val_dice:.1f} %",
            _duration(row.elapsed_s),
            _duration(row.eta_s),
            row.job or "–",
        ]
        for row in rows
    ]
    widths = [max(len(line[i]) for line in [header, *table]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(header, widths, strict=True)).rstrip()]
    for row, cells in zip(rows, table, strict=True):
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)).rstrip())
        if row.note:
            lines.append(f"    {row.note}")
    methods = list(dict.fromkeys(row.method for row in rows))
    if len(methods) > 1:
        lines += [f"{method}: {_counts([row for row in rows if row.method == method])}" for method in methods]
    lines.append(_counts(rows))
    return "\n".join(lines)


def _counts(rows: list[RunStatus]) -> str:
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.state] = counts.get(row.state, 0) + 1
    return ", ".join(f"{n} {state}" for state, n in counts.items())
