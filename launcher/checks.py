"""Everything checked before a grid is submitted, so that what would fail hours later fails now, with
nothing submitted: the data of each dataset (its files, supervoxels, the fold's volumes), the pretrained
weights (present, SHA-256 prefix), free disk for the snapshots, CUDA (local) or SLURM's verdict on the job
script, each run's resume point (its newest snapshot, trained with the same config), its lock (no other
writer), jobs of an earlier submission still waiting or running, and a grid folder holding the same runs
with another config. Each finding names what was expected and what was found.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch

from config import WEIGHTS_COMMAND, resolve_pretrained_path, resume_differences
from dataloaders import get_dataset_info, list_cases
from dataloaders.test_dataset import fold_split
from engine.runlock import read_holder
from engine.snapshots import latest_snapshot, list_snapshots, snapshot_disk_use
from launcher.clusters import (
    Resources,
    job_active,
    sbatch_script,
    sbatch_verdict,
    slurm_available,
    slurm_executor,
    squeue_states,
)
from launcher.grid import Run, latest_jobs, other_configs, read_manifest
from launcher.job import FINISHED, read_state
from models import get_method
from models.encoder import PRETRAINED
from models.files import UntrustedCheckpoint
from models.weights import recorded_config
from utils import resolve_data_root, resolve_device


@dataclass
class Finding:
    """One check: what it is about, whether it passed, what was found."""

    subject: str
    ok: bool
    text: str

    def line(self) -> str:
        return f"{'ok ' if self.ok else 'ERR'} {self.subject}: {self.text}"


def run_is_finished(run: Run) -> bool:
    """The run's last job finished it (trained and evaluated) and its results are on disk."""
    state = read_state(run.folder)
    return (
        bool(state) and state.get("stage") == FINISHED and any((run.folder / "test").glob("*/results.json"))
    )


def resume_point(run: Run) -> Finding:
    """Where the run's training starts: step 0, or the newest snapshot, which must record this config."""
    newest = latest_snapshot(run.folder / "snapshots")
    if newest is None:
        return Finding("resume", True, "starts at step 0 (no snapshot)")
    try:
        recorded = recorded_config(newest)
    except UntrustedCheckpoint as err:
        return Finding("resume", False, str(err))
    except (ValueError, FileNotFoundError) as err:
        return Finding(
            "resume", True, f"newest snapshot unreadable ({err}); train.py resumes from an older one"
        )
    differs = resume_differences(recorded or {}, run.config) if recorded is not None else {}
    if differs:
        found = ", ".join(f"{k}={old!r} in the snapshot, {new!r} now" for k, (old, new) in differs.items())
        return Finding("resume", False, f"{newest} was trained with another config: {found}")
    return Finding(
        "resume", True, f"continues from {newest.name} (step {newest.stem} of {run.config['n_steps']})"
    )


@cache
def _cases(dataset: str, root: Path, supervoxels: bool, n_sv: int) -> int:
    return len(list_cases(dataset, root, supervoxels=supervoxels, n_sv=n_sv))


def data_finding(config: dict[str, Any]) -> Finding:
    """The dataset's images, labels and (unless ``use_gt``) supervoxels; the fold's support (``supp_idx``)
    and query volumes, as ``test.py`` splits them; training volumes besides. A copy with fewer volumes
    than the benchmark passes, said to be not the paper's protocol."""
    info = get_dataset_info(config["dataset"])
    try:
        root = resolve_data_root(config["data_root"])
        count = _cases(info.name, root, not config["use_gt"], config["n_sv"])
        support, queries = fold_split(info, root, config["eval_fold"], config["supp_idx"])
    except (FileNotFoundError, ValueError) as err:
        return Finding("data", False, str(err))
    if count - len(queries) - 1 < 1:
        return Finding(
            "data", False, f"{info.name} fold {config['eval_fold']}: no training volume left in {root}"
        )
    partial = (
        f"; {count} of the benchmark's {info.n_volumes}: not the paper's protocol"
        if count < info.n_volumes
        else ""
    )
    return Finding(
        "data",
        True,
        f"{count} {info.name} cases in {root}, support case {support.case_id}, "
        f"{len(queries)} query case(s){partial}",
    )


def _sha256_prefix(path: Path, length: int) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()[:length]


def weights_finding(config: dict[str, Any]) -> Finding:
    """The pretrained file exists; under torchvision's file name, its SHA-256 starts as the name says."""
    kind = config["pretrained_weights"]
    if kind is None:
        return Finding("weights", True, "none (pretrained_weights=None: randomly initialised encoder)")
    try:
        path = resolve_pretrained_path(kind, config["pretrained_path"])
    except FileNotFoundError as err:
        return Finding("weights", False, str(err))
    entry = PRETRAINED[kind]
    if path.name != entry.file_name:
        return Finding("weights", True, f"{path} (not torchvision's file name: its hash is not checked)")
    found = _sha256_prefix(path, len(entry.sha256_prefix))
    if found != entry.sha256_prefix:
        return Finding(
            "weights",
            False,
            f"{path}: SHA-256 starts with {found}, torchvision's file with {entry.sha256_prefix} (damaged or "
            f"another file: delete it and run `{WEIGHTS_COMMAND} --kind {kind}`)",
        )
    return Finding("weights", True, f"{path} (SHA-256 {found}…)")


@cache
def estimated_snapshot_bytes(method: str, options: tuple[tuple[str, Any], ...]) -> tuple[int, int]:
    """``(full, weights-only)`` bytes of a snapshot of ``method`` built with ``options``, from the model's
    tensors (built on the meta device): the weights, plus SGD's momentum for the full one."""
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore", UserWarning)
        model = get_method(method).build(dict(options), None, None)
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    momentum = sum(p.numel() * p.element_size() for p in model.parameters())
    return weights + momentum, weights


def model_of(config: dict[str, Any]) -> tuple[str, tuple[tuple[str, Any], ...]]:
    """The method of a run's config and its options (hashable): what decides the snapshots' size."""
    return config["method"], tuple(sorted(get_method(config["method"]).options_of(config).items()))


def disk_finding(grid: Path, runs: Sequence[Run], sizes: dict[Any, tuple[int, int]] | None = None) -> Finding:
    """Free space on the grid folder's disk against the snapshots still to be written (keep policy peak,
    less what each run already holds); ``sizes``: measured ``(full, weights-only)`` bytes by
    :func:`model_of`."""
    needed = 0
    for run in runs:
        model = model_of(run.config)
        full, weights = (sizes or {}).get(model) or estimated_snapshot_bytes(*model)
        _, peak = snapshot_disk_use(run.config["n_steps"], run.config["save_snapshot_every"], full, weights)
        held = sum(path.stat().st_size for _, path in list_snapshots(run.folder / "snapshots"))
        needed += max(0, peak - held)
    existing = grid
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    text = f"{needed / 1e9:.1f} GB of snapshots to write at most, {free / 1e9:.1f} GB free on {existing}"
    return Finding("disk", needed <= free, text)


def device_finding(config: dict[str, Any], cluster: str, resources: Resources) -> Finding:
    """Local: the configured device and the GPUs asked for exist here. SLURM: the nodes' GPUs are SLURM's
    business (``sbatch --test-only``)."""
    if cluster == "slurm":
        asked = f"{resources.gpus_per_run} GPU(s) per run" if resources.gpus_per_run else "no GPU (CPU runs)"
        return Finding("CUDA", True, f"{asked}: the nodes' GPUs are checked by sbatch --test-only")
    try:
        device = resolve_device(config["device"])
    except (RuntimeError, ValueError) as err:
        return Finding("CUDA", False, str(err))
    count = torch.cuda.device_count()
    if resources.gpus_per_run > count:
        return Finding(
            "CUDA", False, f"--gpus-per-run {resources.gpus_per_run}, but {count} CUDA device(s) here"
        )
    if resources.gpus_per_run == 0 and count:
        return Finding("CUDA", False, f"{count} CUDA device(s) here: pass --gpus-per-run 1 to use them")
    return Finding("CUDA", True, f"{count} CUDA device(s) visible; runs on {device.type}")


def lock_finding(run: Run) -> Finding | None:
    """A live writer of the run folder, or one on another host that cannot be checked from here."""
    holder = read_holder(run.folder)
    alive = None if holder is None else holder.alive()
    if holder is None or alive is False:
        return None
    if alive is None:
        text = f"held on another host by {holder.describe()} (delete {run.folder / '.lock'} if it is gone)"
        return Finding("lock", False, text)
    return Finding("lock", False, f"being written by {holder.describe()}")


def active_jobs(grid: Path, runs: Sequence[Run]) -> list[str]:
    """Runs of ``runs`` whose job from an earlier submission into ``grid`` is still waiting or running."""
    if not (grid / "grid.json").is_file():
        return []
    jobs = latest_jobs(read_manifest(grid))
    mine = {run.key: jobs[run.key] for run in runs if run.key in jobs}
    states = squeue_states([job for job, sub in mine.values() if sub["cluster"] == "slurm"])
    busy = []
    for key, (job, submission) in sorted(mine.items()):
        active, state = job_active(submission["cluster"], job, submission["host"], states)
        if active is not False:
            busy.append(
                f"{key}: job {job} ({submission['cluster']}, {state}, submitted {submission['submitted']})"
            )
    return busy


def slurm_finding(grid: Path, todo: Sequence[Run], resources: Resources) -> Finding:
    """SLURM answers, and ``sbatch --test-only`` accepts the job script of ``todo``."""
    reason = slurm_available()
    if reason is not None:
        return Finding("SLURM", False, reason)
    executor = slurm_executor(grid, resources, max(run.config["num_workers"] for run in todo), len(todo))
    try:
        return Finding("SLURM", True, sbatch_verdict(sbatch_script(executor, len(todo))))
    except ValueError as err:
        return Finding("SLURM", False, str(err))


def check_grid(
    grid: Path, runs: Sequence[Run], cluster: str, resources: Resources
) -> tuple[list[Finding], dict[str, list[Finding]]]:
    """The grid-wide findings (each pretrained file once) and each run's own (keyed by run key). Runs
    that finished before count for nothing that is still to come (weights, disk, SLURM)."""
    todo = [run for run in runs if not run_is_finished(run)]
    general = [
        Finding("grid folder", False, f"{grid} holds this run with another config: {line}")
        for line in other_configs(grid, runs)
    ]
    general += [
        Finding("grid folder", False, f"already submitted and not ended (wait for it, or cancel it): {line}")
        for line in active_jobs(grid, todo)
    ]
    holder = read_holder(grid)
    if holder is not None and holder.alive() is not False and holder.pid != os.getpid():
        general.append(Finding("grid folder", False, f"another submission is under way: {holder.describe()}"))
    weights = {(run.config["pretrained_weights"], run.config["pretrained_path"]): run.config for run in todo}
    general += [weights_finding(config) for config in weights.values()]
    per_run: dict[str, list[Finding]] = {}
    for run in runs:
        per_run[run.key] = [data_finding(run.config), resume_point(run)]
        lock = lock_finding(run)
        if lock is not None:
            per_run[run.key].append(lock)
    if todo:
        general.append(device_finding(todo[0].config, cluster, resources))
        general.append(disk_finding(grid, todo))
        if cluster == "slurm":
            general.append(slurm_finding(grid, todo, resources))
    return general, per_run
