"""Which runs a grid holds: the ``--grid`` specs, each run's resolved config and commands, and the grid
folder's manifest ``grid.json``.

A spec is ``paper`` (the paper's 25 runs: Abd-MRI and Abd-CT in Settings 1 and 2, Card-MRI in Setting 1,
folds 0-4) or ``<dataset>[:<settings>[:<folds>]]`` with a dataset named config (``abd_mri``, ``abd_ct``,
``cmr``), settings ``1``, ``2`` or ``1,2`` (default: the paper's settings of that dataset) and folds such as
``0,3`` or ``0-4`` (default: all five). Each run of the specs is run by every method of ``--method``
(:func:`parse_methods`: registered names, ``difd`` by default; ``--plugin`` files or modules register
further ones, as ``train.py``'s ``plugins=``). Every run gets the official schedule of its method (named
config ``official_script``), then the user's ``with`` arguments (named configs such as ``debug`` and
``key=value`` updates), then its own ``method`` (other than the default), ``plugins``, ``eval_fold`` and
the grid folder as ``path.log_dir``. Its config is resolved by the Sacred experiment itself
(:func:`config.resolve_config`), so every value is checked as ``train.py`` would check it (a key of
another method is refused), and its run folder is the one ``train.py``/``test.py`` use
(:func:`config.run_folder`: ``[<method>_]<DATASET>_setting<k>/fold<f>``).

The grid folder is the runs' ``path.log_dir``. ``grid.json`` records each run's arguments and resolved
config and every submission (cluster, options, job ids); a later submission into the same folder must
resolve every run it shares with the manifest to the same config (:func:`config.resume_differences`:
where a run executes may change, its maths may not).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sacred.arg_parser import get_config_updates

from config import resolve_config, resume_differences, run_folder, with_args_for
from dataloaders.datasets import N_FOLDS
from models.methods import DEFAULT_METHOD, load_plugins, method_names
from utils import write_atomically

REPO = Path(__file__).resolve().parent.parent
#: Dataset named configs and the settings the paper reports for each (its table's order).
PAPER_SETTINGS = {"abd_mri": (1, 2), "abd_ct": (1, 2), "cmr": (1,)}
SETTINGS = (1, 2)
#: The named config every run of a grid starts from.
SCHEDULE = "official_script"
MANIFEST = "grid.json"
MANIFEST_FORMAT = "difd-grid/1"
#: Keys the grid sets for each run, and the option that chooses them; a ``with`` update of one is refused
#: (``resume=True`` is allowed).
GRID_KEYS = {
    "dataset": "--grid",
    "setting": "--grid",
    "eval_fold": "--grid",
    "exp_str": "--grid",
    "mode": "--grid",
    "resume": "--grid",
    "method": "--method",
    "plugins": "--plugin",
}


class NotAGrid(ValueError):
    """A folder without ``grid.json``."""


@dataclass(frozen=True, order=True)
class RunSpec:
    """One run of a grid: dataset named config, setting, fold and method."""

    dataset_config: str
    setting: int
    fold: int
    method: str = DEFAULT_METHOD

    def __str__(self) -> str:
        return f"{self.method} {self.dataset_config}:{self.setting}:{self.fold}"


def _numbers(text: str, what: str, allowed: Sequence[int], spec: str) -> list[int]:
    """``"0,3"`` or ``"0-4"`` (or both, comma-separated) as numbers, each one of ``allowed``."""
    values: list[int] = []
    for part in text.split(","):
        low, dash, high = part.strip().partition("-")
        try:
            values += list(range(int(low), int(high) + 1)) if dash else [int(low)]
        except ValueError:
            values.append(-1)  # reported below with the text
        if not low or any(v not in allowed for v in values):
            raise ValueError(
                f"--grid {spec!r}: {what} must be among {', '.join(map(str, allowed))} (a list such as "
                f"0,3 or a range such as 0-4), found {part.strip()!r}"
            )
    return values


def parse_plugins(plugins: Sequence[str]) -> list[str]:
    """``--plugin`` entries as ``train.py``'s ``plugins=`` takes them (a ``.py`` file as an absolute path,
    so that a job finds it from any folder), each imported here: a file that is missing or fails to import
    is a ``ValueError`` naming it."""
    entries = [str(Path(p).expanduser().resolve()) if p.endswith(".py") else p for p in plugins]
    for given, entry in zip(plugins, entries, strict=True):
        try:
            load_plugins([entry])
        except ValueError as err:
            raise ValueError(f"--plugin {given}: {err}") from err
        except Exception as err:  # the user's own code: said in one line, not as a traceback
            raise ValueError(f"--plugin {given}: importing it failed: {type(err).__name__}: {err}") from err
    return entries


def parse_methods(values: Sequence[str] | None) -> list[str]:
    """The methods of ``--method`` (comma-separated names, the option repeatable; ``difd`` when absent),
    in order, each registered (after :func:`parse_plugins`); an unknown name (the known ones listed), an
    empty one or a name given twice is a ``ValueError``."""
    names = [name.strip() for value in (values or [DEFAULT_METHOD]) for name in value.split(",")]
    known = method_names()
    for name in names:
        if name not in known:
            raise ValueError(
                f"--method: expected names among {', '.join(known)} (comma-separated; a method of your own "
                f"with --plugin FILE), found {name!r}"
            )
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ValueError(f"--method: {', '.join(twice)} is named twice")
    return names


def parse_grid(specs: Sequence[str], methods: Sequence[str] = (DEFAULT_METHOD,)) -> list[RunSpec]:
    """The runs of ``--grid`` specs for each of ``methods`` (method by method, each in the specs' order;
    see the module docstring); a run named twice, an unknown dataset, setting or fold is a ``ValueError``
    saying what was expected."""
    if not specs:
        raise ValueError("--grid: expected 'paper' or <dataset>[:<settings>[:<folds>]], found nothing")
    runs: list[RunSpec] = []
    for spec in specs:
        if spec == "paper":
            runs += [
                RunSpec(name, setting, fold)
                for name, settings in PAPER_SETTINGS.items()
                for setting in settings
                for fold in range(N_FOLDS)
            ]
            continue
        name, *rest = spec.split(":")
        if name not in PAPER_SETTINGS or len(rest) > 2:
            raise ValueError(
                f"--grid {spec!r}: expected 'paper' or <dataset>[:<settings>[:<folds>]] with a dataset among "
                f"{', '.join(PAPER_SETTINGS)} (e.g. abd_mri:1:0,3), found dataset {name!r}"
                + (f" and {len(rest)} ':' parts" if len(rest) > 2 else "")
            )
        settings = _numbers(rest[0], "settings", SETTINGS, spec) if rest else PAPER_SETTINGS[name]
        folds = _numbers(rest[1], "folds", range(N_FOLDS), spec) if len(rest) > 1 else range(N_FOLDS)
        runs += [RunSpec(name, s, f) for s in settings for f in folds]
    seen: set[RunSpec] = set()
    for run in runs:
        if run in seen:
            raise ValueError(
                f"--grid: {run.dataset_config} setting {run.setting} fold {run.fold} is named twice"
            )
        seen.add(run)
    return [RunSpec(r.dataset_config, r.setting, r.fold, method) for method in methods for r in runs]


def parse_with(args: Sequence[str]) -> tuple[list[str], list[str], str | None]:
    """The user's ``with`` arguments as (named configs, ``key=value`` updates, ``path.log_dir`` or None).

    Dataset and setting named configs, and updates of :data:`GRID_KEYS`, are refused: ``--grid``,
    ``--method`` and ``--plugin`` choose them (``resume=True`` is accepted: the grid always resumes).
    """
    named, updates, log_dir = [], [], None
    for arg in args:
        values, names = get_config_updates([arg])
        for name in names:
            if name in PAPER_SETTINGS or name in ("setting1", "setting2"):
                raise ValueError(f"with {name}: the datasets and settings of a grid are chosen by --grid")
        named += names
        if not values:
            continue
        if "path" in values and "log_dir" in values["path"]:
            log_dir = str(values["path"]["log_dir"])
            continue
        for key, option in GRID_KEYS.items():
            if key in values and not (key == "resume" and values[key] is True):
                raise ValueError(f"with {arg}: the grid sets {key} for each run (choose it with {option})")
        updates.append(arg)
    return named, updates, log_dir


@dataclass
class Run:
    """One run of a grid: its spec, ``with`` arguments, resolved config and run folder."""

    spec: RunSpec
    with_args: tuple[str, ...]  # the `with` arguments of the grid (eval_fold, log dir included)
    config: dict[str, Any]  # as train.py resolves it (resume=True)

    @property
    def folder(self) -> Path:
        return run_folder(self.config)

    @property
    def key(self) -> str:
        """``<exp_str>/fold<k>``: the run folder relative to the grid folder."""
        return f"{self.config['exp_str']}/fold{self.config['eval_fold']}"

    def train_command(self, gpus_per_run: int) -> tuple[str, ...]:
        """``train.py`` (``resume=True``); with more than one GPU, under torchrun (one process per GPU)."""
        script = (str(REPO / "train.py"), "with", *with_args_for("train", self.with_args), "resume=True")
        if gpus_per_run > 1:
            launcher = ("-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus_per_run}")
            return (sys.executable, *launcher, *script)
        return (sys.executable, *script)

    def test_command(self) -> tuple[str, ...]:
        """``test.py`` on the newest snapshot of the run folder (the final one once training ended)."""
        return (sys.executable, str(REPO / "test.py"), "with", *with_args_for("test", self.with_args))


def resolve_runs(
    specs: Sequence[RunSpec], with_args: Sequence[str], plugins: Sequence[str] = ()
) -> tuple[Path, list[Run]]:
    """The grid folder (absolute ``path.log_dir``, default ``./runs``) and each run, its config resolved
    and checked (``plugins``: :func:`parse_plugins`'s entries, given to every run, so that each command
    can import its method); a bad value (a key of another method included) is a ``ValueError`` naming the
    run."""
    named, updates, log_dir = parse_with(with_args)
    default_named = (SCHEDULE, *named)
    grid = Path(log_dir or resolve_config([SCHEDULE], {})["path"]["log_dir"]).expanduser().resolve()
    runs = []
    for spec in specs:
        args = (
            spec.dataset_config,
            f"setting{spec.setting}",
            *default_named,
            *updates,
            *([f"method={spec.method}"] if spec.method != DEFAULT_METHOD else []),
            *([f"plugins={list(plugins)!r}"] if plugins else []),
            f"eval_fold={spec.fold}",
            f"path.log_dir={grid}",
        )
        values, names = get_config_updates(list(args))
        try:
            config = resolve_config(names, {**values, "resume": True})
        except ValueError as err:
            raise ValueError(f"run {spec}: {err}") from err
        runs.append(Run(spec, args, config))
    return grid, runs


def read_manifest(grid: str | os.PathLike) -> dict[str, Any]:
    """``<grid>/grid.json``; a folder without one is :class:`NotAGrid`."""
    path = Path(grid) / MANIFEST
    if not Path(grid).is_dir():
        raise NotAGrid(f"{grid} is not a grid folder: it does not exist")
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        made_by_hand = sorted(p.parent.parent.name for p in Path(grid).glob("*/fold*/snapshots"))
        hint = (
            f"; it holds run folders made without the launcher ({', '.join(sorted(set(made_by_hand)))}): "
            "script/summarize.py tabulates them"
            if made_by_hand
            else ""
        )
        raise NotAGrid(
            f"{grid} is not a grid folder: expected {path}, written by `script/launch.py submit` into the "
            f"folder given as path.log_dir{hint}"
        ) from None
    except ValueError as err:
        raise NotAGrid(f"{path} is not a grid manifest: {err}") from err
    if manifest.get("format") != MANIFEST_FORMAT:
        raise NotAGrid(f"{path}: expected format {MANIFEST_FORMAT!r}, found {manifest.get('format')!r}")
    return manifest


def other_configs(grid: Path, runs: Sequence[Run]) -> list[str]:
    """Runs that ``grid.json`` already holds with another config: one line each, naming the keys."""
    if not (grid / MANIFEST).is_file():
        return []
    recorded = read_manifest(grid)["runs"]
    problems = []
    for run in runs:
        if run.key in recorded:
            differs = resume_differences(recorded[run.key]["config"], run.config)
            if differs:
                found = ", ".join(f"{k}={old!r} there but {new!r} now" for k, (old, new) in differs.items())
                problems.append(f"{run.key}: {found}")
    return problems


def record_submission(grid: Path, runs: Sequence[Run], submission: dict[str, Any]) -> None:
    """Add ``runs`` and ``submission`` (cluster, options, ``jobs``: run key → job id) to ``grid.json``."""
    path = grid / MANIFEST
    manifest = (
        read_manifest(grid) if path.is_file() else {"format": MANIFEST_FORMAT, "runs": {}, "submissions": []}
    )
    for run in runs:
        manifest["runs"][run.key] = {
            "spec": str(run.spec),
            "method": run.config["method"],
            "dataset": run.config["dataset"],
            "setting": run.config["setting"],
            "fold": run.config["eval_fold"],
            "n_steps": run.config["n_steps"],
            "with": list(run.with_args),
            "config": run.config,
        }
    manifest["submissions"].append(submission)
    grid.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1)))


def latest_jobs(manifest: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """Per run key, the job of its latest submission and that submission."""
    found = {}
    for submission in manifest["submissions"]:
        for key, job in submission["jobs"].items():
            found[key] = (job, submission)
    return found
