"""Sacred experiment of ``train.py`` and ``test.py``: defaults, named configs, key checking, run folders.

Examples::

    python train.py with abd_mri setting1 official_script eval_fold=0
    python test.py  with abd_mri setting1 official_script eval_fold=0      # finds the newest snapshot
    python train.py with debug                                             # a few steps at 64 px on CPU

The base config holds the official defaults under the official key names (``dataset``, ``eval_fold``,
``supp_idx``, ``n_part``, ``n_steps``, ``test_label``, ``exclude_label``, ``use_gt``, ``reload_model_path``,
``path.log_dir``, ``seed``, ``optim.lr`` ...), so the official training and evaluation commands keep
working; the keys this project adds are documented in place. Every key is read by ``train.py`` or
``test.py``. A ``with`` override of a key that does not exist (including nested ones such as
``path.log_dri``, which Sacred itself lets through) is an error.

Run folders: ``<path.log_dir>/<exp_str>/fold<eval_fold>/`` with ``train/<id>/`` and ``test/<id>/`` (Sacred
``FileStorageObserver`` folders: resolved config, git commit, metrics, captured output; under torchrun,
rank 0's only) and ``snapshots/<step>.pth``. Models never import this module.
"""

# Sacred config scopes define keys as local variables that look unused to a linter.
# ruff: noqa: F841

from __future__ import annotations

import os
from difflib import get_close_matches
from pathlib import Path
from typing import Any

import sacred
from sacred import Experiment
from sacred.observers import FileStorageObserver
from sacred.utils import apply_backspaces_and_linefeeds

from dataloaders.datasets import get_dataset_info

# 'sys' capture works everywhere (the default 'fd' spawns `tee`); tqdm's carriage returns are collapsed.
sacred.SETTINGS.CAPTURE_MODE = "sys"

ex = Experiment("difd", save_git_info=True)
ex.captured_out_filter = apply_backspaces_and_linefeeds

#: Commands (main functions) that own a run folder: ``train`` in train.py, ``test`` in test.py.
RUN_COMMANDS = ("train", "test")


@ex.config
def base_config():
    """Official defaults (config.py of the official release) plus this project's keys."""
    mode = None  # official key: 'train' or 'test'; None = the running script's own command
    seed = 2023  # official config default (the official scripts pass 2025: named config official_script)
    deterministic = False  # cudnn.deterministic on and cudnn.benchmark off together (utils.set_seed)
    device = "auto"  # 'auto' (CUDA when present, else CPU), 'cpu', 'cuda', 'cuda:1'
    num_workers = 1  # DataLoader workers (0: load in the main process)

    # data
    data_root = None  # None: $DIFD_DATA_ROOT, then ../shared/data (utils.resolve_data_root)
    dataset = "CHAOST2"  # 'CHAOST2' (Abd-MRI), 'SABS' (Abd-CT), 'CMR' (Card-MRI)
    eval_fold = 0  # 0-4, 5-fold cross-validation (spec section 1)
    setting = 1  # 1: supervoxels of every training volume; 2: slices holding a test class removed
    test_label = list(get_dataset_info(dataset).test_labels)  # classes evaluated (spec section 5)
    exclude_label = list(test_label) if setting == 2 else None  # setting 2: labels whose slices are removed
    exclusion = "any"  # 'any' (protocol: drop a slice holding any excluded label) or 'all' (official AND)
    use_gt = False  # train on ground-truth labels instead of supervoxels
    n_sv = get_dataset_info(dataset).n_sv  # supervoxel size: reads <data_root>/<dataset>/supervoxels_<n_sv>
    min_size = 200  # minimum class pixels on the first two episode slices (spec section 3, step 4)
    image_size = None  # None: native slices (256, SABS 257); an int resizes slices (tests, debug)
    max_volumes = None  # None: every training volume; an int keeps the first ones (debug only)

    # evaluation (spec section 5)
    supp_idx = 0  # support volume = supp_idx-th volume of the fold (official scripts: 2)
    n_part = 3  # support slices / query chunks
    reload_model_path = None  # test.py: checkpoint to evaluate; None = newest snapshot of the run folder

    # training (spec sections 3 and 4.7)
    n_steps = 1000  # official config default (official scripts: 40000)
    max_iters_per_load = 1000  # "epoch" length: MultiStepLR milestones every max_iters_per_load steps
    batch_size = 1  # episodes per step
    n_way = 1  # DIFD is 1-way
    n_shot = 1
    n_query = 1
    lr_step_gamma = 0.95  # official config default (official scripts: 0.9)
    optim = {"lr": 1e-3, "momentum": 0.9, "weight_decay": 5e-4}  # SGD on every parameter
    loss_weights = {"query_nll": 1.0, "query_boundary": 1.0, "align_nll": 1.0, "align_boundary": 1.0}
    print_interval = 100  # steps between logged (and synchronised) loss values
    save_snapshot_every = 1000  # steps between snapshots (one is also written at the end)
    resume = False  # continue from the newest snapshot of this run folder

    # model (spec section 4; models.build_difd)
    pretrained_weights = "deeplabv3"  # 'deeplabv3' (COCO DeepLabV3-ResNet101), 'resnet101' (ImageNet), None
    pretrained_path = None  # None: torchvision's file name in torch.hub.get_dir()/checkpoints
    decoder_extra_maps = False  # True: 2C+3 decoder input, loads official 1027-channel checkpoints
    region_sampling = "official"
    multi_shot = "official"  # 'official' (shot 0 drives the prediction) or 'all'

    # speed (runtime.py); the defaults are the faithful numerics
    precision = "fp32"  # 'fp32' or 'bf16' (bfloat16 autocast of the forward; the losses stay float32)
    channels_last = False  # True: NHWC convolution weights (tensor-core friendly layout)
    sgd_impl = None  # None: torch's default SGD kernels; 'foreach' or 'fused' (falls back to 'foreach')

    # outputs
    path = {"log_dir": "./runs"}
    exp_str = f"{dataset}_setting{setting}"  # run folder name under path.log_dir


@ex.named_config
def abd_mri():
    """Abdominal MRI: CHAOS T2-SPIR."""
    dataset = "CHAOST2"


@ex.named_config
def abd_ct():
    """Abdominal CT: Synapse multi-atlas (test labels SPLEEN, RK, LK, LIVER = 1, 2, 3, 6)."""
    dataset = "SABS"


@ex.named_config
def cmr():
    """Cardiac MRI: MS-CMRSeg bSSFP."""
    dataset = "CMR"


@ex.named_config
def setting1():
    """Setting 1: supervoxels of every training volume."""
    setting = 1


@ex.named_config
def setting2():
    """Setting 2: training slices holding any test class of the dataset are removed."""
    setting = 2


@ex.named_config
def official_script():
    """What the official train.sh / evaluate.sh pass on top of the config defaults."""
    seed = 2025
    lr_step_gamma = 0.9
    n_steps = 40000
    max_iters_per_load = 10000
    save_snapshot_every = 10000
    supp_idx = 2


@ex.named_config
def debug():
    """A few steps on small slices and a few volumes, in the main process, without pretrained weights."""
    n_steps = 4
    max_iters_per_load = 2
    save_snapshot_every = 2
    print_interval = 1
    image_size = 64
    max_volumes = 3
    num_workers = 0
    pretrained_weights = None
    min_size = 20  # 200 pixels at 256 px cover about 12 at 64 px


def flatten_keys(config: dict[str, Any], prefix: str = "") -> set[str]:
    """Dotted names of the leaves of a nested config (``{'path': {'log_dir': x}}`` → ``{'path.log_dir'}``)."""
    keys = set()
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            keys |= flatten_keys(value, f"{name}.")
        else:
            keys.add(name)
    return keys


def base_config_keys() -> set[str]:
    """Every key the base config defines (``seed`` included), as dotted names."""
    return (flatten_keys(dict(base_config())) - {"__doc__"}) | {"seed"}


def run_folder(config: dict[str, Any]) -> Path:
    """``<path.log_dir>/<exp_str>/fold<eval_fold>``: one folder per dataset, setting and fold."""
    return Path(config["path"]["log_dir"]) / config["exp_str"] / f"fold{config['eval_fold']}"


@ex.config_hook
def check_keys_and_attach_observer(config: dict, command_name: str, logger) -> dict:
    """Reject unknown keys, resolve ``mode`` and give train/test runs a FileStorageObserver.

    Sacred raises for an unknown top-level key only when no captured function takes it, and never for a
    new entry inside a dict-valued key, so the check is done here against the base config.
    """
    known = base_config_keys()
    unknown = sorted(flatten_keys(config) - known - {"__doc__"})
    if unknown:
        hints = [
            f"{key!r} (did you mean {close[0]!r}?)"
            if (close := get_close_matches(key, known, 1))
            else repr(key)
            for key in unknown
        ]
        raise ValueError(
            f"unknown config key(s): {', '.join(hints)}; the keys are those of config.base_config: "
            f"{sorted(known)}"
        )
    if command_name not in RUN_COMMANDS:
        return {}
    if config["mode"] not in (None, command_name):
        raise ValueError(
            f"mode={config['mode']!r} was given to the {command_name!r} script ({command_name}.py)"
        )
    ex.observers[:] = [obs for obs in ex.observers if not isinstance(obs, FileStorageObserver)]
    # Under torchrun only rank 0 owns the run folder (the other ranks would race for the same run id).
    if int(os.environ.get("RANK", "0")) == 0:
        ex.observers.append(FileStorageObserver(str(run_folder(config) / command_name)))
    return {"mode": command_name}


@ex.command(unobserved=True)
def print_run_root(path, exp_str):
    """Print ``<path.log_dir>/<exp_str>``, the folder of the fold<k> run folders (for the scripts)."""
    print(Path(path["log_dir"]) / exp_str)


if __name__ == "__main__":
    ex.run_commandline()
