"""Self-supervised episodic training of DIFD (spec sections 3 and 4.7).

Examples::

    python train.py with abd_mri setting1 official_script eval_fold=0
    python train.py with abd_mri setting1 official_script eval_fold=0 resume=True   # after an interruption
    python train.py with debug                                                       # a few CPU steps

Order of work (so that a bad configuration fails before any training step): check the config values,
resolve the device once and seed every generator, check the pretrained checkpoint file, read every training
volume (TrainDataset), build the model, optimiser (SGD) and MultiStepLR, then train. The loss terms are
accumulated on the device and synchronised only every ``print_interval`` steps, when they are logged to
Sacred (``metrics.json``), to the log and to the progress bar.

Exact resume: episode ``i`` is a function of ``(seed, i)`` only (TrainDataset), the DataLoader's sampler
starts at ``step * batch_size`` and owns its generator, and a snapshot holds the model, optimiser,
scheduler, step and global RNG states, so a resumed run follows the loss trajectory of an uninterrupted
one. The first Ctrl-C (SIGINT) finishes the current step, writes a snapshot and stops; a second one stops
at once.

Speed switches (defaults: the faithful numerics; :mod:`runtime`): ``precision='bf16'`` runs the model's
forward under bfloat16 autocast (the losses stay float32), ``channels_last=True`` stores the convolution
weights NHWC, ``sgd_impl='foreach'|'fused'`` picks SGD's multi-tensor or fused kernels.

Scale-out: ``torchrun --nproc_per_node=K train.py with ...`` trains with DistributedDataParallel (NCCL on
CUDA, one GPU per process; gloo on CPU). ``batch_size`` is per process: each step draws ``K * batch_size``
episodes, rank ``r`` takes the ``r``-th slice of ``batch_size`` of them, computes its loss exactly as a
single process would and DDP averages the K gradients. Rank 0 alone writes the Sacred run folder, the
logged losses (averaged over the ranks at the logging step, the only synchronisation) and the snapshots
(of the unwrapped model). Each rank draws its dropout masks from its own stream (runtime.seed_ranks); a
snapshot records the world size and every rank's RNG state, and a resume must use the same world size. Under
torchrun a SIGINT stops at the next logging step (the ranks agree on it there).
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from checkpoint import (
    capture_rng_state,
    latest_snapshot,
    load_resume_snapshot,
    remove_stale_temporaries,
    restore_training_state,
    save_snapshot,
)
from config import ex, run_folder
from dataloaders import TrainDataset, get_dataset_info, list_cases, worker_init_fn
from models import DIFDLoss, build_difd
from runtime import (
    LOSS_TERMS,
    EpisodeIndices,
    apply_memory_format,
    build_sgd,
    check_precision,
    init_distributed,
    seed_ranks,
    training_step,
    unwrap,
    wrap_distributed,
)
from utils import resolve_data_root, resolve_device, set_seed

#: torchvision's checkpoints for ``pretrained_weights``: file name (in ``torch.hub.get_dir()/checkpoints``
#: when ``pretrained_path`` is None) and download address.
PRETRAINED_FILES = {
    "deeplabv3": (
        "deeplabv3_resnet101_coco-586e9e4e.pth",
        "https://download.pytorch.org/models/deeplabv3_resnet101_coco-586e9e4e.pth",
    ),
    "resnet101": ("resnet101-63fe2227.pth", "https://download.pytorch.org/models/resnet101-63fe2227.pth"),
}

#: Config keys that decide the loss trajectory: a resumed run must use the snapshot's values.
RESUME_MUST_MATCH = (
    "seed",
    "dataset",
    "eval_fold",
    "setting",
    "test_label",
    "exclude_label",
    "exclusion",
    "use_gt",
    "n_sv",
    "min_size",
    "image_size",
    "max_volumes",
    "n_steps",
    "max_iters_per_load",
    "batch_size",
    "n_shot",
    "n_query",
    "lr_step_gamma",
    "optim",
    "loss_weights",
    "pretrained_weights",
    "decoder_extra_maps",
    "region_sampling",
    "multi_shot",
    "precision",
    "channels_last",
    "sgd_impl",
)


#: Values of the speed keys in snapshots written before those keys existed (the faithful numerics).
SPEED_KEY_DEFAULTS = {"precision": "fp32", "channels_last": False, "sgd_impl": None}


def resolve_pretrained_path(pretrained_weights: str | None, pretrained_path: str | None) -> Path | None:
    """The local checkpoint file for ``pretrained_weights``, checked to exist (None when no weights).

    ``pretrained_path`` None means torchvision's file name in ``torch.hub.get_dir()/checkpoints``.
    """
    if pretrained_weights is None:
        return None
    if pretrained_weights not in PRETRAINED_FILES:
        raise ValueError(
            f"pretrained_weights: expected None or one of {sorted(PRETRAINED_FILES)}, "
            f"found {pretrained_weights!r}"
        )
    file_name, url = PRETRAINED_FILES[pretrained_weights]
    path = Path(pretrained_path or Path(torch.hub.get_dir()) / "checkpoints" / file_name).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"pretrained checkpoint for pretrained_weights={pretrained_weights!r} not found: {path}. "
            f"Download {url} and pass its location with pretrained_path=... "
            "(or run with pretrained_weights=None for a randomly initialised encoder)"
        )
    return path


def lr_milestones(n_steps: int, max_iters_per_load: int) -> list[int]:
    """MultiStepLR milestones: every ``max_iters_per_load`` steps strictly below ``n_steps``.

    ``lr_milestones(40000, 10000) == [10000, 20000, 30000]`` (spec section 4.7).
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


def _plain(config: dict[str, Any]) -> dict[str, Any]:
    """The Sacred config as plain JSON types (Sacred's read-only containers do not pickle portably)."""
    return json.loads(json.dumps(config))


def _check_values(cfg: dict[str, Any]) -> None:
    """Value checks that Sacred's key check cannot do; every message names the key."""
    positive = ("n_steps", "max_iters_per_load", "batch_size", "n_shot", "n_query", "print_interval")
    for key in (*positive, "save_snapshot_every"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ValueError(f"{key} must be a positive int, got {cfg[key]!r}")
    if cfg["n_way"] != 1:
        raise ValueError(f"n_way: DIFD is a 1-way method, got n_way={cfg['n_way']!r}")
    if cfg["setting"] not in (1, 2):
        raise ValueError(f"setting must be 1 or 2, got {cfg['setting']!r}")
    if cfg["setting"] == 1 and cfg["exclude_label"]:
        raise ValueError(
            f"exclude_label={list(cfg['exclude_label'])} removes training slices, which is Setting 2: "
            "add the named config setting2 (or setting=2) so that the run folder says so"
        )
    unknown_terms = set(cfg["loss_weights"]) - set(LOSS_TERMS)
    if unknown_terms:
        raise ValueError(f"loss_weights: unknown terms {sorted(unknown_terms)}; expected {LOSS_TERMS[:-1]}")
    check_precision(cfg["precision"])
    if not isinstance(cfg["channels_last"], bool):
        raise ValueError(f"channels_last must be true or false, got {cfg['channels_last']!r}")


@ex.main
def train(
    _run,
    _log,
    _config,
    seed: int,
    deterministic: bool,
    device: str,
    num_workers: int,
    data_root: str | None,
    dataset: str,
    eval_fold: int,
    test_label: list[int],
    exclude_label: list[int] | None,
    exclusion: str,
    use_gt: bool,
    n_sv: int,
    min_size: int,
    image_size: int | None,
    max_volumes: int | None,
    n_steps: int,
    max_iters_per_load: int,
    batch_size: int,
    n_shot: int,
    n_query: int,
    lr_step_gamma: float,
    optim: dict[str, float],
    loss_weights: dict[str, float],
    print_interval: int,
    save_snapshot_every: int,
    resume: bool,
    pretrained_weights: str | None,
    pretrained_path: str | None,
    decoder_extra_maps: bool,
    region_sampling: str,
    multi_shot: str,
    precision: str,
    channels_last: bool,
    sgd_impl: str | None,
) -> str:
    """Train one fold; returns the path of the final snapshot."""
    config = _plain(_config)
    _check_values(config)
    dist_context, torch_device = init_distributed(resolve_device(device))
    world_size = dist_context.world_size
    # Every rank builds the model from the same seed (same initial weights), then draws its dropout masks
    # from its own stream (runtime.seed_ranks); snapshots keep every rank's RNG state.
    set_seed(seed, deterministic)
    weights_file = resolve_pretrained_path(pretrained_weights, pretrained_path)
    root = resolve_data_root(data_root)

    folder = run_folder(config)
    snapshot_dir = folder / "snapshots"
    if dist_context.is_main:
        remove_stale_temporaries(snapshot_dir, _log)
    newest = latest_snapshot(snapshot_dir)
    if newest is not None and not resume:
        raise FileExistsError(
            f"{snapshot_dir} already holds snapshots (newest {newest.name}): pass resume=True to continue "
            "that run, or choose another path.log_dir"
        )

    _log.info(
        f"device {torch_device}; data root {root}; run folder {folder}; "
        f"rank {dist_context.rank} of {world_size}"
    )
    train_set = TrainDataset(
        dataset,
        root,
        eval_fold,
        n_shot=n_shot,
        n_query=n_query,
        use_gt=use_gt,
        exclude_label=exclude_label,
        exclusion=exclusion,
        min_size=min_size,
        image_size=image_size,
        augment=True,
        seed=seed,
        length=n_steps * batch_size * world_size,
        n_sv=n_sv,
        case_ids=training_case_ids(dataset, root, eval_fold, use_gt, n_sv, max_volumes),
        test_labels=test_label,
    )
    _log.info(f"{len(train_set.volumes)} training volumes: case ids {[v.case_id for v in train_set.volumes]}")

    model = build_difd(
        pretrained_weights=pretrained_weights,
        pretrained_path=None if weights_file is None else str(weights_file),
        decoder_extra_maps=decoder_extra_maps,
        region_sampling=region_sampling,
        multi_shot=multi_shot,
    ).to(torch_device)
    apply_memory_format(model, channels_last)
    model.train()
    seed_ranks(seed, dist_context, deterministic)
    optimizer = build_sgd(
        model.parameters(), optim["lr"], optim["momentum"], optim["weight_decay"], impl=sgd_impl
    )
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=lr_milestones(n_steps, max_iters_per_load), gamma=lr_step_gamma
    )
    loss_fn = DIFDLoss(**loss_weights)

    start_step = 0
    if resume and newest is not None:
        newest, payload = load_resume_snapshot(snapshot_dir, _log)
        saved = {**SPEED_KEY_DEFAULTS, **payload["config"]}
        changed = {
            key: (saved.get(key), config[key]) for key in RESUME_MUST_MATCH if saved.get(key) != config[key]
        }
        if saved.get("world_size", 1) != world_size:
            changed["world_size (torchrun processes)"] = (saved.get("world_size", 1), world_size)
        if changed:
            raise ValueError(
                f"resume: these keys differ from the snapshot {newest} (snapshot, now): {changed}"
            )
        start_step = restore_training_state(
            payload, model, optimizer, scheduler, dist_context.rank if dist_context.enabled else None
        )
        _log.info(f"resumed from {newest} at step {start_step}")
    elif resume:
        _log.warning(f"resume=True but {snapshot_dir} holds no snapshot: starting at step 0")
    if start_step >= n_steps:
        _log.info(f"nothing to do: the newest snapshot is at step {start_step} of {n_steps}")
        return str(newest)
    # Wrapped after loading, so the snapshot's (unprefixed) state dict loads into the plain model.
    model = wrap_distributed(model, dist_context, torch_device)
    snapshot_config = {**config, "world_size": world_size}

    loader = DataLoader(
        train_set,
        batch_size=batch_size,
        sampler=EpisodeIndices(start_step, n_steps, batch_size, dist_context.rank, world_size),
        num_workers=num_workers,
        pin_memory=torch_device.type == "cuda",
        drop_last=True,
        worker_init_fn=worker_init_fn,
        # Its own generator: creating the iterator must not draw from the global RNG, whose state the
        # snapshot restores (else a resumed run's dropout masks would shift by one draw).
        generator=torch.Generator().manual_seed(seed),
    )

    stop_requested = False

    def request_stop(signum, frame):
        nonlocal stop_requested
        stop_requested = True
        signal.signal(signal.SIGINT, previous_handler)  # a second Ctrl-C stops at once

    previous_handler = signal.signal(signal.SIGINT, request_stop)
    # Loss sums, then one slot that counts the ranks asking to stop (summed over ranks when logging).
    running = torch.zeros(len(LOSS_TERMS) + 1, device=torch_device)
    n_running = 0
    step = start_step
    progress = tqdm(
        total=n_steps,
        initial=start_step,
        desc=f"{dataset} fold {eval_fold}",
        dynamic_ncols=True,
        disable=not dist_context.is_main,
    )
    try:
        for batch in loader:
            running[:-1] += training_step(model, loss_fn, optimizer, batch, torch_device, precision)
            scheduler.step()
            step += 1
            progress.update(1)
            n_running += 1
            stop_now = stop_requested and not dist_context.enabled
            if step % print_interval == 0 or step == n_steps:
                if dist_context.enabled:
                    running[-1] = float(stop_requested)
                    dist.all_reduce(running)
                    running[:-1] /= world_size
                means = (running / n_running).tolist()  # the only host-device synchronisation
                stop_now = stop_now or means[-1] > 0
                means = means[:-1]
                if dist_context.is_main:
                    for name, value in zip(LOSS_TERMS, means, strict=True):
                        _run.log_scalar(name, value, step)
                    progress.set_postfix(
                        {name: f"{value:.4f}" for name, value in zip(LOSS_TERMS, means, strict=True)}
                    )
                    _log.info(
                        f"step {step}: "
                        + ", ".join(
                            f"{name} {value:.5f}" for name, value in zip(LOSS_TERMS, means, strict=True)
                        )
                        + f", lr {scheduler.get_last_lr()[0]:.3g}"
                    )
                running.zero_()
                n_running = 0
            if step % save_snapshot_every == 0 or step == n_steps or stop_now:
                rng_ranks = None
                if dist_context.enabled:
                    rng_ranks = [None] * world_size
                    dist.all_gather_object(rng_ranks, capture_rng_state())
                if dist_context.is_main:
                    path = save_snapshot(
                        snapshot_dir / f"{step}.pth",
                        step=step,
                        model=unwrap(model),
                        optimizer=optimizer,
                        scheduler=scheduler,
                        config=snapshot_config,
                        rng_ranks=rng_ranks,
                        final=step == n_steps,
                    )
                    _log.info(f"snapshot {path}")
            if stop_now:
                raise KeyboardInterrupt(f"stopped at step {step}; continue with resume=True")
    finally:
        progress.close()
        signal.signal(signal.SIGINT, previous_handler)
        if dist_context.enabled and dist.is_initialized():
            dist.destroy_process_group()
    final = snapshot_dir / f"{n_steps}.pth"
    _run.info["final_snapshot"] = str(final)
    return str(final)


if __name__ == "__main__":
    ex.run_commandline()
