"""Sacred experiment of ``train.py`` and ``test.py``: defaults, the method's own keys, named configs, key
checking.

Examples::

    python train.py with abd_mri setting1 official_script eval_fold=0
    python test.py  with abd_mri setting1 official_script eval_fold=0      # finds the newest snapshot
    python train.py with debug                                             # a few steps at 64 px on CPU

The base config holds the official defaults under the official key names (``dataset``, ``eval_fold``,
``supp_idx``, ``n_part``, ``n_steps``, ``test_label``, ``exclude_label``, ``use_gt``, ``reload_model_path``,
``path.log_dir``, ``seed``, ``optim.lr`` ...), so the official training and evaluation commands keep
working; the keys this project adds are documented in place. Every key is read by ``train.py`` or
``test.py``; a key that only one of them reads, given to the other (``train.py with reload_model_path=...``),
is refused by name (:data:`COMMAND_ONLY_KEYS`). ``init_from`` starts training from a checkpoint's weights.
A ``with`` override of a key that does not exist (including nested ones such as
``path.log_dri``, which Sacred itself lets through) is an error.

Every value is checked with its key's name before any folder is made or any volume read
(:func:`check_values` in the config hook, which runs before Sacred's observer creates the run folder):
types and ranges (``optim.lr=abc``, ``seed=-1``, ``image_size=64.7``, ``eval_fold=5`` are refused), names
(datasets, classes, modes), and, for ``train``/``test`` runs, the files the run needs
(:func:`check_run_files`: device, data root, pretrained checkpoint, snapshots; the evaluated checkpoint and
the config it records). A ``train`` run then takes the run folder's lock (:mod:`engine.runlock`: one writer
per run folder) and fetches a missing pretrained file when the network answers (:func:`fetch_pretrained`).

Run folders: ``<path.log_dir>/<exp_str>/fold<eval_fold>/`` with ``train/<id>/`` and ``test/<id>/`` (Sacred
file-storage folders, written by :class:`engine.observer.AtomicFileStorageObserver` so that a killed run
leaves no half-written record: resolved config, git commit, metrics, captured output, and for training
``progress.png``; under torchrun, rank 0's only) and ``snapshots/<step>.pth``. Models never import this
module.
"""

# Sacred config scopes define keys as local variables that look unused to a linter.
# ruff: noqa: F841

from __future__ import annotations

import json
import os
import sys
from difflib import get_close_matches
from pathlib import Path
from typing import Any

import sacred
from sacred import Experiment
from sacred.observers import FileStorageObserver
from sacred.utils import apply_backspaces_and_linefeeds, convert_to_nested_dict

from config.values import check_run_files, check_values, run_folder
from dataloaders.datasets import get_dataset_info
from engine.observer import AtomicFileStorageObserver
from engine.runlock import acquire
from models.methods import DEFAULT_METHOD, get_method, load_plugins, method_names, owners_of
from utils import USER_ERRORS

# 'sys' capture works everywhere (the default 'fd' spawns `tee`); tqdm's carriage returns are collapsed.
sacred.SETTINGS.CAPTURE_MODE = "sys"

#: The repository: Sacred records the sources of the modules under it with each run.
REPO = Path(__file__).resolve().parent.parent

#: Keys that only one command reads, by command: given to the other one (``with`` or ``config_updates``;
#: named configs set keys for both and are not checked), they are refused by name before any work, so that
#: ``train.py with reload_model_path=...`` does not train from random weights in silence.
COMMAND_ONLY_KEYS = {
    "test": ("reload_model_path", "allow_cross_eval"),
    "train": (
        "resume",
        "init_from",
        "pretrained_weights",
        "pretrained_path",
        "n_steps",
        "max_iters_per_load",
        "batch_size",
        "lr_step_gamma",
        "optim",
        "sgd_impl",
        "print_interval",
        "save_snapshot_every",
        "validate_every",
        "validate_cases",
        "validate_labels",
        "label_free_episodes",
        "use_gt",
        "min_size",
        "max_volumes",
        "exclude_label",
        "exclusion",
    ),
}
#: What to use instead, for the keys a user is likely to give to the wrong command.
_INSTEAD = {"reload_model_path": "; to train from a checkpoint's weights use init_from=..."}


def refuse_other_commands_keys(command: str | None, config_updates: dict[str, Any] | None) -> None:
    """A ``ValueError`` naming every key of ``config_updates`` that only another command reads
    (:data:`COMMAND_ONLY_KEYS`); other commands (``print_run_root``, ...) take every key."""
    if command not in COMMAND_ONLY_KEYS:
        return
    given = {key.split(".")[0] for key in flatten_keys(convert_to_nested_dict(dict(config_updates or {})))}
    wrong = [
        (key, other)
        for other, keys in COMMAND_ONLY_KEYS.items()
        if other != command
        for key in keys
        if key in given
    ]
    if wrong:
        named = ", ".join(f"{key!r} (read by {other}.py only{_INSTEAD.get(key, '')})" for key, other in wrong)
        raise ValueError(f"{command}.py does not use the key(s) {named}: leave them out of its arguments")


def with_args_for(command: str, with_args: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The ``with`` arguments of ``command`` among those of a grid, which runs both commands: named configs
    and ``key=value`` updates, less the updates of keys only the other command reads."""
    others = {key for other, keys in COMMAND_ONLY_KEYS.items() if other != command for key in keys}
    return tuple(arg for arg in with_args if "=" not in arg or arg.split("=")[0].split(".")[0] not in others)


class DifdExperiment(Experiment):
    """Sacred's experiment, refusing another command's keys (:func:`refuse_other_commands_keys`) before
    the config is even built: only the updates themselves say what the user gave."""

    def run(self, command_name=None, config_updates=None, named_configs=(), *args, **kwargs):
        refuse_other_commands_keys(command_name or self.default_command, config_updates)
        return super().run(command_name, config_updates, named_configs, *args, **kwargs)


ex = DifdExperiment("difd", base_dir=str(REPO), save_git_info=True)
ex.captured_out_filter = apply_backspaces_and_linefeeds

#: Commands (main functions) that own a run folder: ``train`` in train.py, ``test`` in test.py.
RUN_COMMANDS = ("train", "test")


@ex.config
def base_config():
    """Official defaults (config.py of the official release) plus this project's keys."""
    mode = None  # official key: 'train' or 'test'; None = the running script's own command
    method = DEFAULT_METHOD  # the method trained and evaluated (models.method_names(); docs/methods.md)
    plugins = []  # modules or .py files that register further methods (models.load_plugins)
    schedule = "config"  # 'config': these defaults; 'official': the method's (named config official_script)
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
    print_interval = 100  # steps between logged (and synchronised) loss values
    save_snapshot_every = 1000  # steps between snapshots (one is also written at the end)
    resume = False  # continue from the newest snapshot of this run folder
    init_from = None  # a checkpoint of the same method whose weights training starts from (fine-tuning)

    # model: the method's own keys come from its module (method_config below); the encoder initialisation
    pretrained_weights = "deeplabv3"  # 'deeplabv3' (COCO DeepLabV3-ResNet101), 'resnet101' (ImageNet), None
    pretrained_path = None  # None: torchvision's file name in torch.hub.get_dir()/checkpoints

    # speed (runtime.py); the defaults are the faithful numerics
    precision = "fp32"  # 'fp32' or 'bf16' (bfloat16 autocast of the forward; the losses stay float32)
    channels_last = False  # True: NHWC convolution weights (tensor-core friendly layout)
    sgd_impl = None  # None: torch's default SGD kernels; 'foreach' or 'fused' (falls back to 'foreach')

    # outputs
    path = {"log_dir": "./runs"}
    # run folder name under path.log_dir; the default method keeps the folder names it always had
    exp_str = (
        f"{dataset}_setting{setting}" if method == DEFAULT_METHOD else f"{method}_{dataset}_setting{setting}"
    )


def method_defaults(
    method: str, plugins: list[str] | None, base: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The keys of ``method`` at their defaults (``{}`` for an unknown method: the config hook names the
    known ones), after importing the ``plugins`` that register further methods; ``base``: the base
    config's values that an option may follow (:class:`models.Option`)."""
    load_plugins(plugins)
    return get_method(method).defaults(base) if method in method_names() else {}


@ex.config
def method_config(method, plugins, schedule, image_size, dataset):
    """The chosen method's own keys (its ``options`` and ``loss_weights``, models/<method>): they exist
    only when that method is chosen, so that another method's key is refused by name; with
    ``schedule='official'`` (named config ``official_script``) the method's official schedule and
    evaluation settings, under every value given with ``with`` (Sacred keeps those fixed)."""
    locals().update(method_defaults(method, plugins, {"image_size": image_size, "dataset": dataset}))
    if schedule == "official" and method in method_names():
        locals().update(get_method(method).official_script)


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
    """The official schedule and evaluation settings of the chosen method (its ``official_script``; DIFD's:
    what the official train.sh / evaluate.sh pass on top of the config defaults)."""
    schedule = "official"  # applied by method_config, where the chosen method is known


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


def config_keys(method: str) -> set[str]:
    """Every key of a config of ``method``: the base config's and the method's own, as dotted names."""
    own = flatten_keys(get_method(method).defaults()) if method in method_names() else set()
    return base_config_keys() | own


def output_dir(_run, config: dict[str, Any], command: str) -> Path:
    """The Sacred run folder (``<command>/<id>``), or ``<command>/unobserved`` when run with ``-u``."""
    for observer in _run.observers:
        if isinstance(observer, FileStorageObserver) and observer.dir:
            return Path(observer.dir)
    return run_folder(config) / command / "unobserved"


@ex.config_hook
def check_keys_and_attach_observer(config: dict, command_name: str, logger) -> dict:
    """Reject unknown keys and bad values, resolve ``mode``, check the run's files and give train/test runs a
    FileStorageObserver (which makes the run folder when the run starts, after this hook).

    Sacred raises for an unknown top-level key only when no captured function takes it, and never for a
    new entry inside a dict-valued key, so the check is done here against the base config and the chosen
    method's keys; another method's key is named as such.
    """
    method = config["method"]
    if method not in method_names():
        raise ValueError(f"method: expected one of {list(method_names())}, got {method!r}")
    known = config_keys(method)
    unknown = sorted(flatten_keys(config) - known - {"__doc__"})
    if unknown:
        hints = []
        for key in unknown:
            if owners := owners_of(key):
                hints.append(f"{key!r} (a key of {', '.join(owners)}, not of method={method})")
            elif close := get_close_matches(key, known, 1):
                hints.append(f"{key!r} (did you mean {close[0]!r}?)")
            else:
                hints.append(repr(key))
        raise ValueError(
            f"unknown config key(s): {', '.join(hints)}; the keys of method={method} are those of "
            f"config.base_config and its own: {sorted(known)}"
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
        ex.observers.append(AtomicFileStorageObserver(str(run_folder(config) / command_name)))
    return {"mode": command_name}


def run_commandline(prog: str, argv: list[str] | None = None):
    """``ex.run_commandline`` for ``train.py``, ``test.py`` and ``python -m config``: a user's mistake
    (:data:`utils.USER_ERRORS`, or anything the config hook refuses: the checks of keys, values and files)
    is one line ``<prog>: error: <message>`` and exit status 1 instead of Sacred's traceback; the run's
    ``run.json`` still records the whole traceback of a run that started. ``--debug`` (``-d``) shows
    Sacred's own output."""
    argv = list(sys.argv if argv is None else argv)
    if "--debug" in argv or "-d" in argv:
        return ex.run_commandline(argv)
    ex.current_run = None
    try:
        return ex.run_commandline([*argv, "--debug"])  # Sacred re-raises instead of printing a traceback
    except USER_ERRORS as err:
        sys.exit(f"{prog}: error: {err}")
    except Exception as err:
        if ex.current_run is not None:  # a failure of the run itself, not of its config: the traceback
            raise
        sys.exit(f"{prog}: error: {type(err).__name__}: {err}")


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
