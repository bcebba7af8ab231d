"""The Sacred configuration of ``train.py`` and ``test.py`` (:mod:`config.experiment`: defaults, the
method's own keys, named configs, key checking), the checks of its values and the run folders
(:mod:`config.values`) and the pretrained encoder files (:mod:`config.pretrained`). Models never import
this package. ``python -m config print_run_root with ...`` prints a run's folder (for the scripts).
"""

from config.experiment import (
    COMMAND_ONLY_KEYS,
    RUN_COMMANDS,
    base_config_keys,
    config_keys,
    ex,
    flatten_keys,
    output_dir,
    resolve_config,
    with_args_for,
)
from config.pretrained import (
    WEIGHTS_COMMAND,
    WEIGHTS_MIRROR_ENV,
    default_pretrained_path,
    fetch_pretrained,
    pretrained_url,
    resolve_pretrained_path,
)
from config.values import (
    CROSS_EVAL_KEYS,
    KEYS_ADDED_LATER,
    RESUME_MAY_DIFFER,
    check_run_files,
    check_values,
    cross_evaluation,
    evaluated_checkpoint,
    resume_differences,
    run_folder,
)

__all__ = [
    "COMMAND_ONLY_KEYS",
    "CROSS_EVAL_KEYS",
    "KEYS_ADDED_LATER",
    "RESUME_MAY_DIFFER",
    "RUN_COMMANDS",
    "WEIGHTS_COMMAND",
    "WEIGHTS_MIRROR_ENV",
    "base_config_keys",
    "check_run_files",
    "check_values",
    "config_keys",
    "cross_evaluation",
    "default_pretrained_path",
    "evaluated_checkpoint",
    "ex",
    "fetch_pretrained",
    "flatten_keys",
    "output_dir",
    "pretrained_url",
    "resolve_config",
    "resolve_pretrained_path",
    "resume_differences",
    "run_folder",
    "with_args_for",
]
