"""Self-supervised episodic training of a few-shot method (DIFD by default; method.md §3 and §4.7; the
methods and their interface: docs/methods.md).

Examples::

    python train.py with abd_mri setting1 official_script eval_fold=0
    python train.py with abd_mri setting1 official_script eval_fold=0 resume=True   # after an interruption
    python train.py with debug                                                       # a few CPU steps
    python train.py with debug validate_every=2                                      # ... with validation
    python train.py with abd_mri method=qnet official_script eval_fold=0              # another method

Phases (so that a bad configuration fails before any training step): every config value and the files the
run needs are checked in the config hook (config/) before Sacred makes the run folder; :func:`set_up`
resolves the device once, seeds every generator, reads every training volume (TrainDataset) and the
validation volumes, builds the chosen method's network and loss (``models.get_method(method)``: the method's
own keys come with it), the optimiser (SGD) and MultiStepLR; :func:`resume` loads the newest
snapshot when asked; then the loop. The loss terms are accumulated on the device and synchronised only
every ``print_interval`` steps, when they and the learning rate are logged to Sacred (``metrics.json``), to
the log and to the progress bar (:class:`engine.monitor.Monitor`).

Validation (every ``validate_every`` steps, 0 = off, at the last step, and before the first step of a run
that starts at step 0), on rank 0, in eval mode, with the global RNG states restored afterwards, so a run
with validation follows the loss trajectory of one without:

* label-free (``label_free_episodes``; :mod:`engine.label_free`): fixed supervoxel episodes of the fold's
  held-out volumes, read without their labels, scored by the AUC of the foreground probability against the
  pseudo-label and by the thresholded Dice; logged as ``lf_auc`` and ``lf_dice``. No label is read, so this
  curve may guide choices without touching the test labels;
* organ Dice: the evaluation protocol of ``test.py`` (:func:`engine.evaluation.validate`) on the first
  ``validate_cases`` query volumes of the fold (0: none) for every class of ``validate_labels`` (default
  ``test_label``), at the training ``image_size``; logged as ``val_dice_<CLASS>`` and ``val_dice_mean``.
  These are the fold's TEST volumes: the curve is for monitoring, never for choosing the snapshot of a
  reported number.

``progress.png`` in the Sacred run folder (``fold<k>/train/<id>/``) is redrawn at every validation and every
snapshot (:mod:`engine.progress`; ``script/plot_run.py`` redraws it from ``metrics.json``).

Exact resume: episode ``i`` is a function of ``(seed, i)`` only (TrainDataset), the DataLoader's sampler
starts at ``step * batch_size`` and owns its generator, and a snapshot holds the model, optimiser,
scheduler, step and global RNG states, so a resumed run follows the loss trajectory of an uninterrupted
one; a run killed at any moment (SIGKILL: no handler runs) resumes to the same final weights, bit for bit
(tests/test_faults_kill.py), the temporaries it left being removed at the next start. A full disk stops
the run with one line naming the file and the free space; the earlier snapshots are intact. A resume
refuses a snapshot trained with other values of any key but those of
:data:`config.RESUME_MAY_DIFFER` (a new key is protected by default). The first Ctrl-C (SIGINT) finishes
the current step, writes a snapshot and stops with the one line
"stopped at step N; continue with resume=True" (Sacred status INTERRUPTED, exit by SIGINT); a second one
stops at once. SIGTERM (what SLURM sends at a time limit, on preemption or scancel, KillWait seconds before
SIGKILL) and the preemption warning of submitit (``$SUBMITIT_PREEMPT_SIGNAL``, SIGUSR2 by default) do the
same as the first Ctrl-C, also during set-up, and a repeated one changes nothing (the process then ends by
that signal). ``script/launch.py`` runs this script as the training stage of a grid's jobs.

One writer per run folder: the config hook takes ``<run folder>/.lock`` before Sacred makes ``train/<id>``
(:mod:`engine.runlock`); a second train.py on the same fold stops with an error naming the holder, and a
dead holder's successor takes the lock over with a message.

Speed switches (defaults: the faithful numerics; :mod:`engine.runtime`): ``precision='bf16'`` runs the model's
forward under bfloat16 autocast (the losses stay float32), ``channels_last=True`` stores the convolution
weights NHWC, ``sgd_impl='foreach'|'fused'`` picks SGD's multi-tensor or fused kernels.

Scale-out: ``torchrun --nproc_per_node=K train.py with ...`` trains with DistributedDataParallel (NCCL on
CUDA, one GPU per process; gloo on CPU). ``batch_size`` is per process: each step draws ``K * batch_size``
episodes, rank ``r`` takes the ``r``-th slice of ``batch_size`` of them, computes its loss exactly as a
single process would and DDP averages the K gradients. Rank 0 alone writes the Sacred run folder, the
logged losses (averaged over the ranks at the logging step, the only synchronisation), the validation and
the snapshots (of the unwrapped model). Each rank draws its dropout masks from its own stream
(engine.runtime.seed_ranks); a snapshot records the world size and every rank's RNG state, and a resume
must use the same world size. Under torchrun a SIGINT stops at the next logging step (the ranks agree on it
there).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from config import ex, output_dir, resolve_pretrained_path, resume_differences, run_folder
from config.experiment import run_commandline
from dataloaders import TestDataset, TrainDataset, get_dataset_info, list_cases, worker_init_fn
from dataloaders.test_dataset import check_fold_classes
from engine.label_free import LabelFreeEpisodes, label_free_episodes
from engine.monitor import Monitor, StopRequest, TrainingStopped
from engine.runlock import release
from engine.runtime import (
    DistributedContext,
    EpisodeIndices,
    apply_memory_format,
    build_sgd,
    init_distributed,
    seed_ranks,
    training_step,
    unwrap,
    warn_emulated_bf16,
    wrap_distributed,
)
from engine.snapshots import (
    apply_keep_policy,
    latest_snapshot,
    load_resume_snapshot,
    restore_training_state,
    save_snapshot,
)
from models import Method, get_method, load_model_weights, read_model_checkpoint
from models.loading import checkpoint_method
from utils import (
    capture_rng_state,
    disk_full,
    remove_stale_temporaries,
    resolve_data_root,
    resolve_device,
    set_seed,
)


def lr_milestones(n_steps: int, max_iters_per_load: int) -> list[int]:
    """MultiStepLR milestones: every ``max_iters_per_load`` steps strictly below ``n_steps``.

    ``lr_milestones(40000, 10000) == [10000, 20000, 30000]`` (method.md §4.7).
    """
    return list(range(max_iters_per_load, n_steps, max_iters_per_load))


def training_case_ids(
    dataset: str, data_root: Path, eval_fold: int, use_gt: bool, n_sv: int, max_volumes: int | None
) -> list[int] | None:
    """Case ids of the first ``max_volumes`` training volumes of the fold (None: all of them)."""
    if max_volumes is None:
        return None
    if max_volumes < 1:
        raise ValueError(f"max_volumes must be None or >= 1, got {max_volumes}")
    test_positions = set(get_dataset_info(dataset).fold(eval_fold))
    cases = list_cases(dataset, data_root, supervoxels=not use_gt, n_sv=n_sv)
    training = [case.case_id for pos, case in enumerate(cases) if pos not in test_positions]
    return training[:max_volumes]


def validation_sets(cfg: dict[str, Any], root: Path, _log) -> dict[str, TestDataset] | None:
    """The organ validation's TestDatasets, one per class name, their query volumes read once (preloaded);
    None with ``validate_cases=0``."""
    if cfg["validate_cases"] == 0:
        return None
    info = get_dataset_info(cfg["dataset"])
    labels = cfg["validate_labels"] or cfg["test_label"]
    key = "validate_labels" if cfg["validate_labels"] else "validate_labels (None: test_label)"
    check_fold_classes(info, root, cfg["eval_fold"], labels, cfg["supp_idx"], cfg["validate_cases"], key)
    sets = {
        info.class_name(label): TestDataset(
            info,
            root,
            cfg["eval_fold"],
            label,
            cfg["supp_idx"],
            cfg["n_part"],
            cfg["image_size"],
            n_queries=cfg["validate_cases"],
            preload=True,
        )
        for label in labels
    }
    first = next(iter(sets.values()))
    _log.info(
        f"validation every {cfg['validate_every']} steps on {list(sets)}: support case "
        f"{first.support_case.case_id}, query cases {[c.case_id for c in first.query_cases]} "
        "(the fold's test volumes: for monitoring only)"
    )
    return sets


def label_free_set(cfg: dict[str, Any], root: Path, _log) -> LabelFreeEpisodes | None:
    """The label-free validation's fixed episodes on the fold's held-out volumes (images and supervoxels
    only), or None with ``label_free_episodes=0``; a set that cannot be drawn is an error here, at
    start-up."""
    if cfg["label_free_episodes"] == 0:
        return None
    try:
        episodes = label_free_episodes(
            cfg["dataset"],
            root,
            cfg["eval_fold"],
            cfg["label_free_episodes"],
            cfg["n_shot"],
            cfg["n_query"],
            cfg["min_size"],
            cfg["image_size"],
            cfg["n_sv"],
        )
    except ValueError as err:
        raise ValueError(
            f"label-free validation (label_free_episodes={cfg['label_free_episodes']}): {err}"
        ) from err
    _log.info(
        f"label-free validation every {cfg['validate_every']} steps: {len(episodes)} fixed supervoxel "
        f"episodes of the held-out cases {sorted(set(episodes.case_ids))} (no label read)"
    )
    return episodes


@dataclass
class Job:
    """What :func:`set_up` builds for the training loop."""

    dist: DistributedContext
    device: torch.device
    train_set: TrainDataset
    val_sets: dict[str, TestDataset] | None  # rank 0 with validate_every > 0 and validate_cases > 0
    label_free: LabelFreeEpisodes | None  # rank 0 with validate_every > 0 and label_free_episodes > 0
    method: Method
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.MultiStepLR
    loss_fn: nn.Module
    snapshot_dir: Path


def set_up(cfg: dict[str, Any], _log) -> Job:
    """Device, seeds, training and validation volumes, model, optimiser and scheduler."""
    dist_context, device = init_distributed(resolve_device(cfg["device"]))
    warn_emulated_bf16(cfg["precision"], device, _log)
    # Every rank builds the model from the same seed (same initial weights), then draws its dropout masks
    # from its own stream (engine.runtime.seed_ranks); snapshots keep every rank's RNG state.
    set_seed(cfg["seed"], cfg["deterministic"])
    weights_file = resolve_pretrained_path(cfg["pretrained_weights"], cfg["pretrained_path"])
    root = resolve_data_root(cfg["data_root"])
    folder = run_folder(cfg)
    if dist_context.is_main:  # what a run killed while writing left (the run folder's lock is ours)
        remove_stale_temporaries(folder, _log)  # the lock's
        remove_stale_temporaries(folder / "snapshots", _log)
        remove_stale_temporaries(folder / "train", _log, recursive=True)
    _log.info(
        f"device {device}; data root {root}; run folder {folder}; rank {dist_context.rank} of "
        f"{dist_context.world_size}"
    )
    train_set = TrainDataset(
        cfg["dataset"],
        root,
        cfg["eval_fold"],
        n_shot=cfg["n_shot"],
        n_query=cfg["n_query"],
        use_gt=cfg["use_gt"],
        exclude_label=cfg["exclude_label"],
        exclusion=cfg["exclusion"],
        min_size=cfg["min_size"],
        image_size=cfg["image_size"],
        augment=True,
        seed=cfg["seed"],
        length=cfg["n_steps"] * cfg["batch_size"] * dist_context.world_size,
        n_sv=cfg["n_sv"],
        case_ids=training_case_ids(
            cfg["dataset"], root, cfg["eval_fold"], cfg["use_gt"], cfg["n_sv"], cfg["max_volumes"]
        ),
        test_labels=cfg["test_label"],
    )
    _log.info(f"{len(train_set.volumes)} training volumes: case ids {[v.case_id for v in train_set.volumes]}")
    val_sets, label_free = None, None
    if cfg["validate_every"] > 0 and dist_context.is_main:
        label_free = label_free_set(cfg, root, _log)
        val_sets = validation_sets(cfg, root, _log)

    method = get_method(cfg["method"])
    options = method.options_of(cfg)
    model = method.build(
        options, cfg["pretrained_weights"], None if weights_file is None else str(weights_file)
    )
    model = model.to(device)
    apply_memory_format(model, cfg["channels_last"])
    model.train()
    seed_ranks(cfg["seed"], dist_context, cfg["deterministic"])
    optim = cfg["optim"]
    optimizer = build_sgd(
        model.parameters(), optim["lr"], optim["momentum"], optim["weight_decay"], impl=cfg["sgd_impl"]
    )
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer,
        milestones=lr_milestones(cfg["n_steps"], cfg["max_iters_per_load"]),
        gamma=cfg["lr_step_gamma"],
    )
    return Job(
        dist_context,
        device,
        train_set,
        val_sets,
        label_free,
        method,
        model,
        optimizer,
        scheduler,
        method.loss(cfg["loss_weights"], options).to(device),
        folder / "snapshots",
    )


def resume(job: Job, cfg: dict[str, Any], _log) -> int:
    """With ``resume=True``, load the newest snapshot (model, optimiser, scheduler, this rank's RNG state)
    after checking that it was trained with this config; returns the step to continue from (0: start)."""
    if not cfg["resume"]:
        return 0
    newest = latest_snapshot(job.snapshot_dir)
    if newest is None:
        _log.warning(f"resume=True but {job.snapshot_dir} holds no snapshot: starting at step 0")
        return 0
    newest, payload = load_resume_snapshot(job.snapshot_dir, _log)  # skips damaged ones, with a warning
    changed = resume_differences(payload["config"], cfg)
    if payload["config"].get("world_size", 1) != job.dist.world_size:
        changed["world_size (torchrun processes)"] = (
            payload["config"].get("world_size", 1),
            job.dist.world_size,
        )
    if changed:
        raise ValueError(f"resume: these keys differ from the snapshot {newest} (snapshot, now): {changed}")
    step = restore_training_state(
        newest, payload, job.model, job.optimizer, job.scheduler, job.dist.rank if job.dist.enabled else None
    )
    _log.info(f"resumed from {newest} at step {step}")
    return step


def initialise_from(job: Job, cfg: dict[str, Any], _log) -> None:
    """``init_from``: the weights training starts from (fine-tuning; the optimiser starts afresh), read and
    loaded with the checks of every checkpoint (plain data, the run's method, strict names and shapes)."""
    checkpoint = read_model_checkpoint(cfg["init_from"])
    checkpoint_method(checkpoint, cfg["method"])
    load_model_weights(job.model, checkpoint)
    step = "" if checkpoint.step is None else f" (step {checkpoint.step})"
    _log.info(f"init_from: starting from the weights of {checkpoint.path}{step}")


def episode_loader(job: Job, cfg: dict[str, Any], start_step: int) -> DataLoader:
    """This rank's episodes from ``start_step`` on (:class:`runtime.EpisodeIndices`)."""
    if cfg["num_workers"] > 0:
        # OpenCV's thread pool, started here by resizing the validation volumes, must not be alive when the
        # workers are forked: a worker's cv2.setNumThreads (worker_init_fn) then waits forever on the copied
        # pool (1 run in 3 hung at its first step). The episodes are made in the workers, so the main
        # process needs no OpenCV threads from now on.
        cv2.setNumThreads(1)
    return DataLoader(
        job.train_set,
        batch_size=cfg["batch_size"],
        sampler=EpisodeIndices(
            start_step, cfg["n_steps"], cfg["batch_size"], job.dist.rank, job.dist.world_size
        ),
        num_workers=cfg["num_workers"],
        pin_memory=job.device.type == "cuda",
        drop_last=True,
        worker_init_fn=worker_init_fn,
        # Its own generator: creating the iterator must not draw from the global RNG, whose state the
        # snapshot restores (else a resumed run's dropout masks would shift by one draw).
        generator=torch.Generator().manual_seed(cfg["seed"]),
    )


def save_snapshot_all_ranks(job: Job, step: int, config: dict[str, Any], _log) -> None:
    """Snapshot ``<step>.pth`` of the unwrapped model, written by rank 0 with every rank's RNG state."""
    rng_ranks = None
    if job.dist.enabled:
        rng_ranks = [None] * job.dist.world_size
        dist.all_gather_object(rng_ranks, capture_rng_state())
    if job.dist.is_main:
        save_snapshot(
            job.snapshot_dir / f"{step}.pth",
            step=step,
            model=unwrap(job.model),
            optimizer=job.optimizer,
            scheduler=job.scheduler,
            config=config,
            rng_ranks=rng_ranks,
            final=step == config["n_steps"],
        )
        _log.info(f"snapshot {job.snapshot_dir / f'{step}.pth'}")


#: The stop request installed when train.py starts as a script, before Sacred reads any volume, so that a
#: SIGTERM or preemption warning during set-up is honoured too (None when ``train`` runs in-process).
EARLY_STOP: StopRequest | None = None


@ex.main
def train(_run, _log, _config) -> str:
    """Train one fold; returns the path of the final snapshot. The run folder's lock (taken by the config
    hook on rank 0) is released at the end, however the run ends."""
    cfg = json.loads(json.dumps(_config))  # plain types: Sacred's read-only containers do not pickle portably
    stop = EARLY_STOP or StopRequest(interrupt=False)
    try:
        return train_fold(_run, _log, cfg, stop)
    except OSError as err:
        if full := disk_full(err):  # one line; the snapshots before it are intact (engine.snapshots)
            raise SystemExit(f"train.py: {full}; free space, then continue with resume=True") from err
        raise
    finally:
        stop.close()
        if int(os.environ.get("RANK", "0")) == 0:
            release(run_folder(cfg))


def train_fold(_run, _log, cfg: dict[str, Any], stop: StopRequest) -> str:
    """Set-up, resume, then the loop; a stop request ends it after a snapshot (:class:`TrainingStopped`)."""
    job = set_up(cfg, _log)
    start_step, n_steps = resume(job, cfg, _log), cfg["n_steps"]
    if start_step == 0 and cfg["init_from"]:
        initialise_from(job, cfg, _log)
    final = job.snapshot_dir / f"{n_steps}.pth"
    if start_step >= n_steps:
        if job.dist.is_main:  # a run killed after its final snapshot, before the keep policy was applied
            apply_keep_policy(job.snapshot_dir, n_steps, final=True)
        _log.info(f"nothing to do: the newest snapshot is at step {start_step} of {n_steps}")
        return str(final)
    # Wrapped after loading, so the snapshot's (unprefixed) state dict loads into the plain model.
    model = job.model = wrap_distributed(job.model, job.dist, job.device)
    snapshot_config = {**cfg, "world_size": job.dist.world_size}
    monitor = Monitor(
        _run,
        _log,
        job.dist,
        job.device,
        job.val_sets,
        job.label_free,
        picture=output_dir(_run, cfg, "train") / "progress.png",
        title=f"{job.method.title} {cfg['dataset']} setting {cfg['setting']} fold {cfg['eval_fold']}",
        bar_label=f"{job.method.name} {cfg['dataset']} fold {cfg['eval_fold']}",
        n_steps=n_steps,
        start_step=start_step,
        loss_terms=job.method.loss_terms,
    )
    stop.catch_interrupt()
    try:
        if stop.requested and not job.dist.enabled:
            _log.warning(f"{stop.signum.name} during set-up: stopping before the first step")
            raise TrainingStopped(start_step, stop.signum)
        if cfg["validate_every"] and start_step == 0:  # where the curves start: the untrained model
            monitor.validate(0, unwrap(model), cfg["precision"])
        for step, batch in enumerate(episode_loader(job, cfg, start_step), start=start_step + 1):
            losses = training_step(
                model, job.loss_fn, job.optimizer, batch, job.device, cfg["precision"], job.method.loss_terms
            )
            monitor.add(losses, lr=job.optimizer.param_groups[0]["lr"])
            job.scheduler.step()
            stopping = stop.requested and not job.dist.enabled  # under torchrun the ranks agree when logging
            if step % cfg["print_interval"] == 0 or step == n_steps:
                stopping = monitor.log(step, stop.requested) or stopping
            if cfg["validate_every"] and (step % cfg["validate_every"] == 0 or step == n_steps):
                monitor.validate(step, unwrap(model), cfg["precision"])
            if step % cfg["save_snapshot_every"] == 0 or step == n_steps or stopping:
                save_snapshot_all_ranks(job, step, snapshot_config, _log)
                monitor.draw()
            if stopping and step < n_steps:
                signum = stop.signum or signal.SIGINT  # a rank that only agreed with another's request
                _log.warning(f"{signum.name}: stopped after step {step} and its snapshot")
                raise TrainingStopped(step, signum)
    finally:
        monitor.close()
        if job.dist.enabled and dist.is_initialized():
            dist.destroy_process_group()
    _run.info["final_snapshot"] = str(final)
    return str(final)


if __name__ == "__main__":
    EARLY_STOP = StopRequest(interrupt=False)
    try:
        run_commandline("train.py")
    except TrainingStopped as stopped:
        print(stopped, file=sys.stderr)
        # Die of the signal that asked for the stop, as an uncaught KeyboardInterrupt dies of SIGINT: the
        # exit status says "interrupted" to the calling shell or job (which then resumes or stops), not
        # "failed".
        signal.signal(stopped.signum, signal.SIG_DFL)
        os.kill(os.getpid(), stopped.signum)
