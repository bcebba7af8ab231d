"""SLURM and the local executor, through submitit: the executors a grid is submitted with, the sbatch script
and SLURM's verdict on it before submission, the jobs' states, and the local executor's lanes.

SLURM: one job array per submission (one task per run), ``--max-parallel`` as the array's throttle
(``%N``), ``--signal=<SUBMITIT_PREEMPT_SIGNAL>@<signal delay>`` so that a job is warned before its time
limit, and GPUs, CPUs, memory, time, partition, account, QOS and extra ``#SBATCH`` lines as given. Before
anything is submitted the script is shown to ``sbatch --test-only``, which refuses what the cluster would
refuse (an unknown partition, more GPUs or CPUs than a node has, a time over the partition's limit).
States come from ``squeue -t all`` (no accounting database needed: without one, ``sacct`` and therefore
submitit's job states say nothing); a job no longer listed has ended.

Local: submitit's local executor has no queue and gives every job the same GPUs, so the runs are dealt,
in grid order, onto lanes: one lane per ``--gpus-per-run`` visible GPUs (its GPUs fixed for its lifetime),
or one lane on the CPU, at most ``--max-parallel`` lanes; each lane is one local job that runs its runs one
after another. Its job id is its controller's process id, alive or not on this host.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit
from submitit.slurm.slurm import _make_sbatch_string

from utils import pid_alive

#: Submitit's job files, under the grid folder.
JOBS_FOLDER = "submitit"
#: squeue states of a job that is waiting to run (again).
WAITING = ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "SUSPENDED", "STOPPED")
#: squeue states of a job that runs.
RUNNING = ("RUNNING", "CONFIGURING", "COMPLETING", "SIGNALING", "RESIZING", "STAGE_OUT")
#: Minutes of a local job's time limit when none is given: a month (the executor's default is 2 minutes).
LOCAL_TIMEOUT_MIN = 60 * 24 * 30


@dataclass
class Resources:
    """What each run's job asks for, and how the submission behaves."""

    gpus_per_run: int = 0
    cpus_per_run: int | None = None  # None: (num_workers + 1) per process
    mem_gb: float | None = None
    timeout_min: float | None = None  # None: SLURM 240, local a month
    signal_delay_s: int = 90
    max_parallel: int | None = None
    max_timeouts: int = 20
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    sbatch: list[str] = field(default_factory=list)  # extra options, e.g. "--constraint=a100"

    def time_limit_min(self, cluster: str) -> float | None:
        """A job's time limit: as given, else 240 minutes on SLURM and none on this machine."""
        if self.timeout_min is not None:
            return self.timeout_min
        return 240.0 if cluster == "slurm" else None


def sbatch_options(extra: list[str]) -> dict[str, Any]:
    """``["--constraint=a100", "--exclusive"]`` → ``{"constraint": "a100", "exclusive": True}`` (submitit's
    ``additional_parameters``, written as ``#SBATCH --key=value`` lines)."""
    options: dict[str, Any] = {}
    for option in extra:
        key, equal, value = option.strip().removeprefix("#SBATCH").strip().lstrip("-").partition("=")
        if not key or " " in key:
            raise ValueError(
                f"--sbatch: expected an sbatch option such as --constraint=a100, found {option!r}"
            )
        options[key] = value if equal else True
    return options


def slurm_parameters(resources: Resources, num_workers: int, n_runs: int) -> dict[str, Any]:
    """The parameters of submitit's ``SlurmExecutor`` for a grid of ``n_runs`` runs."""
    processes = max(1, resources.gpus_per_run)
    parameters: dict[str, Any] = {
        "job_name": "difd",
        "time": int(resources.time_limit_min("slurm")),
        "nodes": 1,
        "ntasks_per_node": 1,
        "cpus_per_task": resources.cpus_per_run or processes * (num_workers + 1),
        "signal_delay_s": resources.signal_delay_s,
        "array_parallelism": resources.max_parallel or n_runs,
        "stderr_to_stdout": True,
    }
    if resources.gpus_per_run:
        parameters["gpus_per_node"] = resources.gpus_per_run
    for key in ("partition", "account", "qos"):
        if getattr(resources, key):
            parameters[key] = getattr(resources, key)
    if resources.mem_gb:
        parameters["mem"] = f"{round(resources.mem_gb * 1024)}M"  # sbatch reads a bare number as MB
    extra = sbatch_options(resources.sbatch)
    if extra:
        parameters["additional_parameters"] = extra
    return parameters


def slurm_available() -> str | None:
    """None when SLURM answers here (``sinfo``), else why not."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None or shutil.which("srun") is None:
        return "no SLURM here: sinfo, sbatch or srun is not on PATH"
    try:
        done = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 30 s"
    if done.returncode != 0:
        return f"sinfo failed: {done.stderr.strip() or done.stdout.strip()}"
    return None


def slurm_executor(folder: Path, resources: Resources, num_workers: int, n_runs: int):
    """submitit's ``SlurmExecutor`` for the grid (``max_num_timeout``: requeues after a time limit)."""
    executor = submitit.SlurmExecutor(
        folder=folder / JOBS_FOLDER / "%j", max_num_timeout=resources.max_timeouts
    )
    executor.update_parameters(**slurm_parameters(resources, num_workers, n_runs))
    return executor


def sbatch_script(executor, n_runs: int) -> str:
    """The sbatch script submitit writes for an array of ``n_runs`` tasks (a single job for one run)."""
    return _make_sbatch_string(
        command=executor._submitit_command_str,
        folder=executor.folder,
        map_count=n_runs if n_runs > 1 else None,
        **executor.parameters,
    )


def sbatch_verdict(script: str) -> str:
    """``sbatch --test-only`` on ``script``: SLURM's answer (where and when it would start); raises
    ``ValueError`` with SLURM's message when it refuses the script."""
    with tempfile.NamedTemporaryFile("w", suffix=".sh") as handle:
        handle.write(script)
        handle.flush()
        done = subprocess.run(
            ["sbatch", "--test-only", handle.name], capture_output=True, text=True, timeout=60
        )
    answer = (done.stderr.strip() + "\n" + done.stdout.strip()).strip()
    if done.returncode != 0:
        raise ValueError(f"SLURM refuses the job script (sbatch --test-only): {answer}")
    return answer


def squeue_states(job_ids: list[str]) -> dict[str, str] | None:
    """squeue's state of each listed job (``123`` or ``123_4``); jobs SLURM no longer lists are absent.
    None when squeue cannot be asked (no SLURM here)."""
    if shutil.which("squeue") is None:
        return None
    arrays = sorted({job.split("_")[0] for job in job_ids})
    if not arrays:
        return {}
    states: dict[str, str] = {}
    for array in arrays:  # one by one: squeue refuses a whole list when one id is gone
        done = subprocess.run(
            ["squeue", "-h", "-r", "-t", "all", "-j", array, "-o", "%i|%T"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if done.returncode != 0:
            continue  # "Invalid job id specified": gone
        for line in done.stdout.splitlines():
            job, _, state = line.strip().partition("|")
            states[job] = state
    return states


def visible_gpus() -> list[int]:
    """The GPU numbers this machine shows to a job: ``$CUDA_VISIBLE_DEVICES`` (numbers only, since the
    local executor passes them on as numbers), else every CUDA device; empty without CUDA."""
    import torch

    count = torch.cuda.device_count()
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return list(range(count))
    items = [item.strip() for item in listed.split(",") if item.strip()]
    if not all(item.isdigit() for item in items):
        raise ValueError(
            f"CUDA_VISIBLE_DEVICES={listed!r}: the local executor needs GPU numbers (e.g. 0,1), not UUIDs"
        )
    return [int(item) for item in items][:count]


def plan_lanes(gpus: list[int], gpus_per_run: int, max_parallel: int | None) -> list[list[int]]:
    """The GPUs of each local lane: ``gpus`` cut into groups of ``gpus_per_run``, at most ``max_parallel``
    of them; one lane with no GPU on the CPU (``max_parallel`` lanes if given)."""
    if gpus_per_run == 0:
        return [[] for _ in range(max_parallel or 1)]
    if len(gpus) < gpus_per_run:
        raise ValueError(
            f"--gpus-per-run {gpus_per_run}: this machine shows {len(gpus)} GPU(s) "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})"
        )
    lanes = [gpus[i : i + gpus_per_run] for i in range(0, len(gpus) - gpus_per_run + 1, gpus_per_run)]
    return lanes[: max_parallel or len(lanes)]


def local_executor(folder: Path, resources: Resources, lane_gpus: list[int]):
    """submitit's ``LocalExecutor`` for one lane (its GPUs, the time limit and warning delay)."""
    executor = submitit.LocalExecutor(
        folder=folder / JOBS_FOLDER / "%j", max_num_timeout=resources.max_timeouts
    )
    executor.update_parameters(
        timeout_min=resources.time_limit_min("local") or LOCAL_TIMEOUT_MIN,
        signal_delay_s=resources.signal_delay_s,
        gpus_per_node=len(lane_gpus),
        visible_gpus=lane_gpus,
        stderr_to_stdout=True,
    )
    return executor


def job_active(cluster: str, job: str, host: str, states: dict[str, str] | None) -> tuple[bool | None, str]:
    """Whether a job of an earlier submission is waiting or running, and its state's name: SLURM from
    ``states`` (:func:`squeue_states`), local from its controller process (unknown on another host)."""
    if cluster == "local":
        if host != socket.gethostname():
            return None, f"local job on {host}"
        return (True, "RUNNING") if pid_alive(int(job)) else (False, "ENDED")
    if states is None:
        return None, "UNKNOWN (no squeue here)"
    state = states.get(job)
    if state is None:
        return False, "ENDED"
    return state in WAITING + RUNNING, state
