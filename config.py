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

Every value is checked with its key's name before any folder is made or any volume read
(:func:`check_values` in the config hook, which runs before Sacred's observer creates the run folder):
types and ranges (``optim.lr=abc``, ``seed=-1``, ``image_size=64.7``, ``eval_fold=5`` are refused), names
(datasets, classes, modes), and, for ``train``/``test`` runs, the files the run needs
(:func:`check_run_files`: device, data root, pretrained checkpoint, snapshots; the evaluated checkpoint and
the config it records). A ``train`` run then takes the run folder's lock (:mod:`engine.runlock`: one writer
per run folder) and fetches a missing pretrained file when the network answers (:func:`fetch_pretrained`).

Run folders: ``<path.log_dir>/<exp_str>/fold<eval_fold>/`` with ``train/<id>/`` and ``test/<id>/`` (Sacred
``FileStorageObserver`` folders: resolved config, git commit, metrics, captured output, and for training
``progress.png``; under torchrun, rank 0's only) and ``snapshots/<step>.pth``. Models never import this
module.
"""

# Sacred config scopes define keys as local variables that look unused to a linter.
# ruff: noqa: F841

from __future__ import annotations

import json
import math
import os
from difflib import get_close_matches
from pathlib import Path
from typing import Any

import sacred
import torch
from sacred import Experiment
from sacred.observers import FileStorageObserver
from sacred.utils import apply_backspaces_and_linefeeds

from dataloaders.datasets import get_dataset_info
from dataloaders.train_dataset import EXCLUSION_MODES
from engine.runlock import acquire
from engine.runtime import LOSS_TERMS, PRECISIONS, SGD_IMPLS
from engine.snapshots import latest_snapshot
from models.difd import MULTI_SHOT
from models.dual_interspersion import REGION_SAMPLING
from models.encoder import PRETRAINED
from models.weights import recorded_config
from utils import DownloadError, download_checked, resolve_data_root, resolve_device

# 'sys' capture works everywhere (the default 'fd' spawns `tee`); tqdm's carriage returns are collapsed.
sacred.SETTINGS.CAPTURE_MODE = "sys"

ex = Experiment("difd", save_git_info=True)
ex.captured_out_filter = apply_backspaces_and_linefeeds

#: Commands (main functions) that own a run folder: ``train`` in train.py, ``test`` in test.py.
RUN_COMMANDS = ("train", "test")

#: Keys whose value in the evaluated snapshot must equal the evaluation's (unless ``allow_cross_eval``):
#: another fold's model would be scored on its own training volumes.
CROSS_EVAL_KEYS = ("dataset", "eval_fold", "setting", "image_size")

#: Keys a resumed run may change (train.py's resume): where the run executes, how it is watched and where
#: it writes, none of which changes the maths of a training step. Every other key must equal the
#: snapshot's, so that a new key is protected by default.
RESUME_MAY_DIFFER = (
    "label_free_episodes",
    "mode",
    "device",
    "num_workers",
    "deterministic",
    "data_root",
    "path",
    "exp_str",
    "resume",
    "print_interval",
    "save_snapshot_every",
    "validate_every",
    "validate_cases",
    "validate_labels",
    "supp_idx",
    "n_part",
    "reload_model_path",
    "allow_cross_eval",
    "pretrained_path",
)
#: Values of keys in snapshots written before those keys existed (what the runs then did).
KEYS_ADDED_LATER = {"precision": "fp32", "channels_last": False, "sgd_impl": None}


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
    eval_fold = 0  # 0-4, 5-fold cross-validation (method.md §1)
    setting = 1  # 1: supervoxels of every training volume; 2: slices holding a test class removed
    test_label = list(get_dataset_info(dataset).test_labels)  # classes evaluated (method.md §5)
    exclude_label = list(test_label) if setting == 2 else None  # setting 2: labels whose slices are removed
    exclusion = "any"  # 'any' (protocol: drop a slice holding any excluded label) or 'all' (official AND)
    use_gt = False  # train on ground-truth labels instead of supervoxels
    n_sv = get_dataset_info(dataset).n_sv  # supervoxel size: reads <data_root>/<dataset>/supervoxels_<n_sv>
    min_size = 200  # minimum class pixels on the first two episode slices (method.md §3, step 4)
    image_size = None  # None: native slices (256, SABS 257); an int resizes slices (tests, debug)
    max_volumes = None  # None: every training volume; an int keeps the first ones (debug only)

    # evaluation (method.md §5)
    supp_idx = 0  # support volume = supp_idx-th volume of the fold (official scripts: 2)
    n_part = 3  # support slices / query chunks
    reload_model_path = None  # test.py: checkpoint to evaluate; None = newest snapshot of the run folder
    allow_cross_eval = False  # test.py: True evaluates a snapshot of another dataset/fold/setting/image_size

    # validation during training, every validate_every steps and at the last step (0: no validation):
    # organ Dice on the fold's TEST volumes (for monitoring, never for choosing a snapshot), and the
    # label-free curve on the fold's held-out volumes read without labels (engine/label_free.py)
    validate_every = 0
    validate_cases = 2  # organ validation on the fold's first query volumes (None: all of them; 0: none)
    validate_labels = None  # classes validated (None: test_label)
    label_free_episodes = 40  # fixed supervoxel episodes of the label-free validation (0: none)

    # training (method.md §3 and §4.7)
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

    # model (method.md §4; models.build_difd)
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
    validate_every = 2000  # 20 validations of 2 query volumes x 4 classes: seconds each on a GPU


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
    validate_every = 0  # kept off so that the CI runs of debug stay short; validate_every=2 turns it on


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


def output_dir(_run, config: dict[str, Any], command: str) -> Path:
    """The Sacred run folder (``<command>/<id>``), or ``<command>/unobserved`` when run with ``-u``."""
    for observer in _run.observers:
        if isinstance(observer, FileStorageObserver) and observer.dir:
            return Path(observer.dir)
    return run_folder(config) / command / "unobserved"


#: Environment variable: a base address that replaces ``https://download.pytorch.org/models/`` for the
#: pretrained files (a site mirror, or a ``file://`` folder holding torchvision's files).
WEIGHTS_MIRROR_ENV = "DIFD_WEIGHTS_MIRROR"

#: The command that puts the pretrained files where :func:`resolve_pretrained_path` looks for them.
WEIGHTS_COMMAND = "python script/launch.py weights"


def default_pretrained_path(pretrained_weights: str) -> Path:
    """torchvision's file name for ``pretrained_weights`` in ``torch.hub.get_dir()/checkpoints``."""
    return Path(torch.hub.get_dir()).expanduser() / "checkpoints" / PRETRAINED[pretrained_weights].file_name


def pretrained_url(pretrained_weights: str, mirror: str | None = None) -> str:
    """Where the file of ``pretrained_weights`` is downloaded from: torchvision's address, or the same file
    name under ``mirror`` (default ``$DIFD_WEIGHTS_MIRROR``) when one is given."""
    mirror = mirror or os.environ.get(WEIGHTS_MIRROR_ENV) or None
    entry = PRETRAINED[pretrained_weights]
    return entry.url if mirror is None else f"{mirror.rstrip('/')}/{entry.file_name}"


def fetch_pretrained(pretrained_weights: str, path: str | os.PathLike, mirror: str | None = None) -> Path:
    """Download the file of ``pretrained_weights`` to ``path`` with a progress bar, its SHA-256 checked
    against the prefix in torchvision's file name (:func:`utils.download_checked`: nothing is left behind
    when the download fails or the hash differs). Raises :class:`utils.DownloadError`."""
    entry = PRETRAINED[pretrained_weights]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return download_checked(pretrained_url(pretrained_weights, mirror), path, entry.sha256_prefix)


def resolve_pretrained_path(
    pretrained_weights: str | None, pretrained_path: str | None, download: bool = False
) -> Path | None:
    """The local checkpoint file for ``pretrained_weights``, checked to exist (None when no weights).

    ``pretrained_path`` None means torchvision's file name in ``torch.hub.get_dir()/checkpoints``; with
    ``download`` that file is fetched when it is absent (:func:`fetch_pretrained`), so a machine with
    internet needs no step of its own. A missing file is a ``FileNotFoundError`` that says the one command
    to run and where the file must go.
    """
    if pretrained_weights is None:
        return None
    if pretrained_weights not in PRETRAINED:
        raise ValueError(
            f"pretrained_weights: expected None or one of {sorted(PRETRAINED)}, found {pretrained_weights!r}"
        )
    default = default_pretrained_path(pretrained_weights)
    path = Path(pretrained_path).expanduser() if pretrained_path else default
    if path.is_file():
        return path
    failed = ""
    if download and not pretrained_path:
        try:
            return fetch_pretrained(pretrained_weights, path)
        except DownloadError as err:
            failed = f"; downloading it failed: {err}"
    raise FileNotFoundError(
        f"pretrained checkpoint for pretrained_weights={pretrained_weights!r} not found: {path}{failed}. "
        f"On a machine with internet run `{WEIGHTS_COMMAND} --kind {pretrained_weights}` (it downloads "
        f"{PRETRAINED[pretrained_weights].url} to {default}) and make the file available here at {default}, "
        "or pass its location with pretrained_path=... (or run with pretrained_weights=None for a randomly "
        "initialised encoder)"
    )


def evaluated_checkpoint(config: dict[str, Any]) -> Path:
    """``reload_model_path``, or the newest snapshot of the run folder; the file must exist."""
    if config["reload_model_path"]:
        path = Path(config["reload_model_path"]).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"reload_model_path: model checkpoint not found: {path}")
        return path
    snapshots = run_folder(config) / "snapshots"
    newest = latest_snapshot(snapshots)
    if newest is None:
        raise FileNotFoundError(
            f"no snapshot in {snapshots} (train this dataset/setting/fold first, "
            "or pass reload_model_path=...)"
        )
    return newest


def cross_evaluation(recorded: dict[str, Any] | None, config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The :data:`CROSS_EVAL_KEYS` whose value in the checkpoint's ``recorded`` config differs from the
    evaluation's: ``{key: {"checkpoint": value, "evaluation": value}}`` (empty when ``recorded`` is None)."""
    if recorded is None:
        return {}
    return {
        key: {"checkpoint": recorded.get(key), "evaluation": config[key]}
        for key in CROSS_EVAL_KEYS
        if recorded.get(key) != config[key]
    }


def resume_differences(saved: dict[str, Any], config: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The keys, other than :data:`RESUME_MAY_DIFFER`, whose value in a snapshot's ``saved`` config
    differs from ``config``'s: ``{key: (snapshot's, now)}``."""
    saved = {**KEYS_ADDED_LATER, **saved}
    return {
        key: (saved.get(key), value)
        for key, value in config.items()
        if key not in RESUME_MAY_DIFFER and saved.get(key) != value
    }


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_values(config: dict[str, Any]) -> None:
    """Check every value of ``config`` with its key's name; one ``ValueError`` lists every bad value.

    Types and ranges, not files (:func:`check_run_files`). An int key refuses floats (``image_size=64.7``
    is not truncated to 64), and a number key refuses strings (``optim.lr=abc``).
    """
    problems: list[str] = []

    def need(ok: bool, key: str, expected: str) -> None:
        if not ok:
            value = config
            for part in key.split("."):
                value = value[part]
            problems.append(f"{key}: expected {expected}, got {value!r}")

    def positive_int(key: str) -> None:
        need(_is_int(config[key]) and config[key] >= 1, key, "a positive int")

    def one_of(key: str, choices: tuple) -> None:
        need(config[key] in choices, key, f"one of {choices}")

    def flag(key: str) -> None:
        need(isinstance(config[key], bool), key, "True or False")

    def optional(key: str, kind: type) -> None:
        need(config[key] is None or isinstance(config[key], kind), key, f"None or a {kind.__name__}")

    info = get_dataset_info(config["dataset"])
    need(_is_int(config["seed"]) and 0 <= config["seed"] < 2**32, "seed", "an int in [0, 2**32 - 1]")
    for key in (
        "deterministic",
        "use_gt",
        "resume",
        "decoder_extra_maps",
        "channels_last",
        "allow_cross_eval",
    ):
        flag(key)
    need(isinstance(config["device"], str), "device", "'auto', 'cpu', 'cuda' or 'cuda:N'")
    need(_is_int(config["num_workers"]) and config["num_workers"] >= 0, "num_workers", "an int >= 0")
    for key in ("data_root", "reload_model_path", "pretrained_path"):
        optional(key, str)
    fold_ok = _is_int(config["eval_fold"]) and 0 <= config["eval_fold"] < info.n_folds
    need(fold_ok, "eval_fold", f"an int in 0..{info.n_folds - 1} ({info.name} has {info.n_folds} folds)")
    one_of("setting", (1, 2))
    for key in ("test_label", "exclude_label", "validate_labels"):
        labels = config[key]
        if labels is None and key != "test_label":
            continue
        need(
            isinstance(labels, list | tuple)
            and len(labels) > 0
            and all(_is_int(v) and v in info.label_names for v in labels)
            and len(set(labels)) == len(labels),
            key,
            f"{'a' if key == 'test_label' else 'None or a'} non-empty list of distinct {info.name} class "
            f"values {dict(info.label_names)}",
        )
    if config["setting"] == 1 and config["exclude_label"]:
        problems.append(
            f"exclude_label={list(config['exclude_label'])} removes training slices, which is Setting 2: "
            "add the named config setting2 (or setting=2) so that the run folder says so"
        )
    one_of("exclusion", EXCLUSION_MODES)
    for key in ("n_sv", "n_part", "n_steps", "max_iters_per_load", "batch_size", "n_shot", "n_query"):
        positive_int(key)
    for key in ("print_interval", "save_snapshot_every"):
        positive_int(key)
    need(_is_int(config["min_size"]) and config["min_size"] >= 0, "min_size", "an int >= 0")
    for key in ("image_size", "max_volumes"):
        need(
            config[key] is None or (_is_int(config[key]) and config[key] >= 1), key, "None or a positive int"
        )
    need(
        config["validate_cases"] is None
        or (_is_int(config["validate_cases"]) and config["validate_cases"] >= 0),
        "validate_cases",
        "None or an int >= 0",
    )
    n_fold = len(info.fold(config["eval_fold"])) if fold_ok else 0
    need(
        _is_int(config["supp_idx"]) and (not fold_ok or -n_fold <= config["supp_idx"] < n_fold),
        "supp_idx",
        f"an int in {-n_fold}..{n_fold - 1} (fold {config['eval_fold']} of {info.name} has {n_fold} volumes)",
    )
    need(config["n_way"] == 1 and _is_int(config["n_way"]), "n_way", "1 (DIFD is a 1-way method)")
    need(_is_number(config["lr_step_gamma"]) and config["lr_step_gamma"] > 0, "lr_step_gamma", "a number > 0")
    optim = config["optim"]
    need(_is_number(optim.get("lr")) and optim["lr"] > 0, "optim.lr", "a number > 0")
    need(
        _is_number(optim.get("momentum")) and 0 <= optim["momentum"] < 1,
        "optim.momentum",
        "a number in [0, 1)",
    )
    need(
        _is_number(optim.get("weight_decay")) and optim["weight_decay"] >= 0,
        "optim.weight_decay",
        "a number >= 0",
    )
    for term in LOSS_TERMS[:-1]:
        if term in config["loss_weights"]:
            weight = config["loss_weights"][term]
            need(_is_number(weight) and weight >= 0, f"loss_weights.{term}", "a number >= 0")
    need(_is_int(config["validate_every"]) and config["validate_every"] >= 0, "validate_every", "an int >= 0")
    lf_episodes = config["label_free_episodes"]
    need(_is_int(lf_episodes) and lf_episodes >= 0, "label_free_episodes", "an int >= 0")
    if config["validate_every"] and config["validate_cases"] == 0 and lf_episodes == 0:
        problems.append(
            f"validate_every={config['validate_every']} validates nothing: validate_cases=0 and "
            "label_free_episodes=0 turn both validations off (set validate_every=0, or one of them > 0)"
        )
    one_of("pretrained_weights", (None, *PRETRAINED))
    one_of("region_sampling", REGION_SAMPLING)
    one_of("multi_shot", MULTI_SHOT)
    one_of("precision", PRECISIONS)
    one_of("sgd_impl", SGD_IMPLS)
    need(
        isinstance(config["path"]["log_dir"], str) and config["path"]["log_dir"] != "",
        "path.log_dir",
        "a path",
    )
    need(isinstance(config["exp_str"], str) and config["exp_str"] != "", "exp_str", "a folder name")
    if problems:
        raise ValueError("bad config value(s):\n  " + "\n  ".join(problems))


def check_run_files(config: dict[str, Any], command: str) -> None:
    """What a ``train`` or ``test`` run needs before it makes its run folder: the device, the pretrained
    checkpoint (train), the data root, no unfinished snapshots unless ``resume`` (train), the evaluated
    checkpoint and the config it records (test; see :data:`CROSS_EVAL_KEYS`)."""
    resolve_device(config["device"])
    if command == "train":
        resolve_pretrained_path(config["pretrained_weights"], config["pretrained_path"], download=True)
    resolve_data_root(config["data_root"])
    if command == "train":
        newest = latest_snapshot(run_folder(config) / "snapshots")
        if newest is not None and not config["resume"]:
            raise FileExistsError(
                f"{newest.parent} already holds snapshots (newest {newest.name}): pass resume=True to "
                "continue that run, or choose another path.log_dir"
            )
    if command == "test":
        checkpoint = evaluated_checkpoint(config)
        differs = cross_evaluation(recorded_config(checkpoint), config)
        if differs and not config["allow_cross_eval"]:
            found = ", ".join(
                f"{key}={pair['checkpoint']!r} in the checkpoint but {key}={pair['evaluation']!r} here"
                for key, pair in differs.items()
            )
            raise ValueError(
                f"{checkpoint} was trained with other settings: {found}. Its scores here would not be what "
                "results.json claims (another fold's model is scored on its own training volumes); pass "
                "allow_cross_eval=True for a deliberate cross-evaluation (results.json then says so)"
            )


@ex.config_hook
def check_keys_and_attach_observer(config: dict, command_name: str, logger) -> dict:
    """Reject unknown keys and bad values, resolve ``mode``, check the run's files and give train/test runs a
    FileStorageObserver (which makes the run folder when the run starts, after this hook).

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
    check_values(config)
    if command_name not in RUN_COMMANDS:
        return {}
    if config["mode"] not in (None, command_name):
        raise ValueError(
            f"mode={config['mode']!r} was given to the {command_name!r} script ({command_name}.py)"
        )
    check_run_files(config, command_name)
    ex.observers[:] = [obs for obs in ex.observers if not isinstance(obs, FileStorageObserver)]
    # Under torchrun only rank 0 owns the run folder (the other ranks would race for the same run id).
    if int(os.environ.get("RANK", "0")) == 0:
        if command_name == "train":
            # One writer per run folder, taken before Sacred makes train/<id> (train.py releases it).
            acquire(run_folder(config), "train.py", logger)
        ex.observers.append(FileStorageObserver(str(run_folder(config) / command_name)))
    return {"mode": command_name}


@ex.command(unobserved=True)
def print_run_root(path, exp_str):
    """Print ``<path.log_dir>/<exp_str>``, the folder of the fold<k> run folders (for the scripts)."""
    print(Path(path["log_dir"]) / exp_str)


@ex.command(unobserved=True)
def resolved_config(_config) -> dict[str, Any]:
    """The resolved config, as plain types (:func:`resolve_config`)."""
    return json.loads(json.dumps(_config))


def resolve_config(named_configs: list[str], config_updates: dict[str, Any]) -> dict[str, Any]:
    """The config that ``train.py``/``test.py`` with these named configs and updates would run with,
    checked by :func:`check_values` (the config hook); nothing is run or written. ``script/launch.py``
    resolves each run of a grid through it."""
    run = ex.run(
        "resolved_config",
        named_configs=list(named_configs),
        config_updates=config_updates,
        options={"--loglevel": "ERROR"},
    )
    return run.result


if __name__ == "__main__":
    ex.run_commandline()
