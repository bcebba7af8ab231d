"""The values of a config: every check of a value (:func:`check_values`), the files a run needs
(:func:`check_run_files`), run folders, and the comparisons with the config a snapshot records (resume,
cross-evaluation)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from config.pretrained import resolve_pretrained_path
from dataloaders.datasets import get_dataset_info
from dataloaders.train_dataset import EXCLUSION_MODES
from engine.runtime import PRECISIONS, SGD_IMPLS
from engine.snapshots import latest_snapshot
from models.encoder import PRETRAINED
from models.files import check_plain_data
from models.methods import DEFAULT_METHOD, get_method, method_names
from models.weights import recorded_config
from utils import resolve_data_root, resolve_device

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
    "plugins",
    "schedule",  # a marker: the values it chose are compared key by key
)
#: Values of keys in snapshots written before those keys existed (what the runs then did).
KEYS_ADDED_LATER = {
    "precision": "fp32",
    "channels_last": False,
    "sgd_impl": None,
    "method": DEFAULT_METHOD,
    "init_from": None,
}


def run_folder(config: dict[str, Any]) -> Path:
    """``<path.log_dir>/<exp_str>/fold<eval_fold>``: one folder per method, dataset, setting and fold."""
    return Path(config["path"]["log_dir"]) / config["exp_str"] / f"fold{config['eval_fold']}"


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


def check_init_from(config: dict[str, Any]) -> Path:
    """``init_from``: a file that exists, holds plain data, and records no other method than the run's
    (a plain state dict's tensors are matched to the method when train.py loads them)."""
    path = Path(config["init_from"]).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"init_from: model checkpoint not found: {path}")
    check_plain_data(path, "init_from checkpoint")
    recorded = recorded_config(path)
    trained = None if recorded is None else recorded.get("method", DEFAULT_METHOD)
    if trained is not None and trained != config["method"]:
        raise ValueError(
            f"init_from: {path} is a snapshot of the method {trained!r}, not of method={config['method']!r}: "
            "training never starts from another method's weights"
        )
    return path


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
    for key in ("deterministic", "use_gt", "resume", "channels_last", "allow_cross_eval"):
        flag(key)
    need(isinstance(config["device"], str), "device", "'auto', 'cpu', 'cuda' or 'cuda:N'")
    need(_is_int(config["num_workers"]) and config["num_workers"] >= 0, "num_workers", "an int >= 0")
    for key in ("data_root", "reload_model_path", "pretrained_path", "init_from"):
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
    need(config["n_way"] == 1 and _is_int(config["n_way"]), "n_way", "1 (the methods here are 1-way)")
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
    need(_is_int(config["validate_every"]) and config["validate_every"] >= 0, "validate_every", "an int >= 0")
    lf_episodes = config["label_free_episodes"]
    need(_is_int(lf_episodes) and lf_episodes >= 0, "label_free_episodes", "an int >= 0")
    if config["validate_every"] and config["validate_cases"] == 0 and lf_episodes == 0:
        problems.append(
            f"validate_every={config['validate_every']} validates nothing: validate_cases=0 and "
            "label_free_episodes=0 turn both validations off (set validate_every=0, or one of them > 0)"
        )
    one_of("schedule", ("config", "official"))
    one_of("pretrained_weights", (None, *PRETRAINED))
    one_of("precision", PRECISIONS)
    one_of("sgd_impl", SGD_IMPLS)
    need(
        isinstance(config["path"]["log_dir"], str) and config["path"]["log_dir"] != "",
        "path.log_dir",
        "a path",
    )
    need(isinstance(config["exp_str"], str) and config["exp_str"] != "", "exp_str", "a folder name")
    if config["method"] in method_names():
        problems += get_method(config["method"]).problems(config)
    else:
        problems.append(f"method: expected one of {list(method_names())}, got {config['method']!r}")
    if problems:
        raise ValueError("bad config value(s):\n  " + "\n  ".join(problems))


def check_run_files(config: dict[str, Any], command: str) -> None:
    """What a ``train`` or ``test`` run needs before it makes its run folder: the device, the pretrained
    checkpoint (train), the data root, no unfinished snapshots unless ``resume`` (train), the evaluated
    checkpoint and the config it records (test; see :data:`CROSS_EVAL_KEYS`)."""
    resolve_device(config["device"])
    if command == "train":
        pretrained = resolve_pretrained_path(
            config["pretrained_weights"], config["pretrained_path"], download=True
        )
        if pretrained is not None and pretrained.is_file():
            check_plain_data(pretrained, f"pretrained checkpoint ({config['pretrained_weights']!r})")
    resolve_data_root(config["data_root"])
    if command == "train":
        newest = latest_snapshot(run_folder(config) / "snapshots")
        if newest is not None and not config["resume"]:
            raise FileExistsError(
                f"{newest.parent} already holds snapshots (newest {newest.name}): pass resume=True to "
                "continue that run, or choose another path.log_dir"
            )
        if newest is not None:
            check_plain_data(newest, "snapshot")  # refused before any work (resume would refuse it later)
        if config["init_from"]:
            check_init_from(config)
    if command == "test":
        checkpoint = evaluated_checkpoint(config)
        recorded = recorded_config(checkpoint)
        trained = None if recorded is None else recorded.get("method", DEFAULT_METHOD)
        if trained is not None and trained != config["method"]:
            raise ValueError(
                f"{checkpoint} is a snapshot of the method {trained!r}, not of method={config['method']!r}: "
                "a checkpoint of one method is never evaluated as another"
            )
        differs = cross_evaluation(recorded, config)
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
