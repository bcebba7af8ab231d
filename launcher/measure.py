"""``--measure N``: N training steps of one run of each method of a grid timed on this machine, and what
the grid then needs: device-hours of training (evaluation not included) and disk for the snapshots (the
sizes written, under the keep policy), per method (methods differ in step time and snapshot size) and in
all.

The run's own ``train.py`` command trains ``N + 1`` steps into a scratch folder (``print_interval=1``, no
validation, a snapshot at step N and the final one at N + 1, which gives the full and the weights-only
size); the step time is the mean of steps 2 to N + 1, from the timestamps Sacred records with each logged
value (step 1 holds the warm-up and is reported apart). The times are this machine's device's: on a CPU
they are CPU-hours, not GPU-hours.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from engine.progress import read_metrics
from engine.snapshots import snapshot_disk_use
from launcher.grid import Run
from launcher.job import last_error_line


@dataclass
class Measurement:
    """What ``N`` steps of a run took on this machine, and its snapshot sizes."""

    device: str
    steps: int
    step_s: float
    first_step_s: float
    full_bytes: int
    weights_bytes: int


def measure_run(run: Run, n_steps: int, gpus_per_run: int) -> Measurement:
    """Train ``run``'s config for ``n_steps + 1`` steps in a scratch folder (removed afterwards)."""
    if n_steps < 2:
        raise ValueError(f"--measure: expected at least 2 steps (the first is warm-up), found {n_steps}")
    scratch = Path(tempfile.mkdtemp(prefix="difd-measure-"))
    try:
        overrides = (
            f"n_steps={n_steps + 1}",
            f"save_snapshot_every={n_steps}",
            "print_interval=1",
            "validate_every=0",
            f"path.log_dir={scratch}",
        )
        argv = (*run.train_command(gpus_per_run), *overrides)
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.returncode != 0:
            lines = done.stderr.splitlines()
            raise RuntimeError(
                f"--measure: {' '.join(argv)} failed ({done.returncode}): {last_error_line(lines)}\n"
                + "\n".join(lines[-15:])
            )
        folder = scratch / run.config["exp_str"] / f"fold{run.config['eval_fold']}"
        total = read_metrics(folder / "train" / "1")["total"]
        stamps = [datetime.fromisoformat(t) for t in total["timestamps"]]
        found = re.search(r"device (\S+);", done.stderr)
        return Measurement(
            device=found.group(1) if found else "unknown",
            steps=n_steps,
            step_s=(stamps[-1] - stamps[0]).total_seconds() / (len(stamps) - 1),
            first_step_s=(stamps[0] - _start_time(folder)).total_seconds(),
            full_bytes=(folder / "snapshots" / f"{n_steps}.pth").stat().st_size,
            weights_bytes=(folder / "snapshots" / f"{n_steps + 1}.pth").stat().st_size,
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _start_time(folder: Path) -> datetime:
    import json

    return datetime.fromisoformat(json.loads((folder / "train" / "1" / "run.json").read_text())["start_time"])


def device_name(device: str) -> str:
    """``cuda:0 (NVIDIA H200)`` for a CUDA device, ``cpu`` otherwise."""
    if device.startswith("cuda"):
        import torch

        index = int(device.split(":")[1]) if ":" in device else 0
        return f"{device} ({torch.cuda.get_device_name(index)})"
    return device


def grid_needs(runs: list[Run], measured: Measurement, gpus_per_run: int) -> tuple[float, int, int]:
    """``(device-hours of training, snapshot bytes when finished, most snapshot bytes while training)``
    of ``runs`` at ``measured``'s speed and sizes."""
    hours = sum(run.config["n_steps"] for run in runs) * measured.step_s * max(1, gpus_per_run) / 3600
    final = peak = 0
    for run in runs:
        end, most = snapshot_disk_use(
            run.config["n_steps"],
            run.config["save_snapshot_every"],
            measured.full_bytes,
            measured.weights_bytes,
        )
        final, peak = final + end, peak + most
    return hours, final, peak


def estimate_lines(
    runs: list[Run], measured: Measurement, gpus_per_run: int, timeout_min: float | None, max_timeouts: int
) -> list[str]:
    """The grid's estimate from ``measured``: device-hours of training, disk for snapshots, and jobs per
    run under a time limit (with a warning when they exceed ``max_timeouts`` requeues)."""
    kind = "GPU" if measured.device.startswith("cuda") else "CPU"
    per_device = max(1, gpus_per_run)
    hours, final, peak = grid_needs(runs, measured, gpus_per_run)
    name, mean, first = device_name(measured.device), measured.step_s, measured.first_step_s
    lines = [
        f"measured on THIS machine's device, {name}: {mean:.3f} s per training step (mean of steps "
        f"2-{measured.steps + 1}; step 1 with set-up and warm-up: {first:.1f} s)",
        f"snapshots written: {measured.full_bytes / 1e6:.1f} MB full, "
        f"{measured.weights_bytes / 1e6:.1f} MB weights-only",
        f"estimate for the {len(runs)} run(s) to train, at this device's speed ({per_device} device(s) per "
        f"run): {hours:.2f} {kind}-hours of training ({hours / per_device:.2f} h per device in all; "
        "evaluation not included)",
        f"disk for their snapshots (keep policy): {final / 1e9:.1f} GB when finished, "
        f"{peak / 1e9:.1f} GB at most while training",
    ]
    if timeout_min:
        longest = max(run.config["n_steps"] for run in runs) * measured.step_s / 60
        jobs = int(longest // timeout_min) + 1
        lines.append(
            f"with --timeout-min {timeout_min:g}: the longest run trains about {longest:.0f} min, so about "
            f"{jobs} job(s) per run (requeued at each time limit)"
        )
        if jobs - 1 > max_timeouts:
            lines.append(
                f"warning: that is more requeues than --max-timeouts {max_timeouts} allows; raise it, or the "
                "time limit, or runs end FAILED after that many time limits"
            )
    return lines


def measure_lines(
    runs: list[Run], n_steps: int, gpus_per_run: int, timeout_min: float | None, max_timeouts: int
) -> list[str]:
    """``--measure``: the first run of each method of ``runs`` timed (:func:`measure_run`), each method's
    estimate (:func:`estimate_lines`) under a heading, and with several methods the grid's total."""
    by_method: dict[str, list[Run]] = {}
    for run in runs:
        by_method.setdefault(run.config["method"], []).append(run)
    lines, total = [], [0.0, 0, 0]
    kinds = set()
    for method, group in by_method.items():
        measured = measure_run(group[0], n_steps, gpus_per_run)
        kinds.add("GPU" if measured.device.startswith("cuda") else "CPU")
        needs = grid_needs(group, measured, gpus_per_run)
        total = [a + b for a, b in zip(total, needs, strict=True)]
        lines.append(f"method {method}: {len(group)} run(s), {n_steps} steps of {group[0].key} timed")
        estimate = estimate_lines(group, measured, gpus_per_run, timeout_min, max_timeouts)
        lines += [f"    {line}" for line in estimate]
    if len(by_method) > 1:
        hours, final, peak = total
        kind = "/".join(sorted(kinds))
        lines.append(
            f"all {len(runs)} run(s) of the {len(by_method)} methods: {hours:.2f} {kind}-hours "
            f"of training at this machine's speed, snapshots {final / 1e9:.1f} GB when finished, "
            f"{peak / 1e9:.1f} GB at most while training"
        )
    return lines
