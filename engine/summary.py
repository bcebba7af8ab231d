"""The paper's per-fold table of one dataset and setting, from the folds' ``results.json`` (``test.py``).

Per organ: Dice (in %) of every fold and the mean ± standard deviation over the folds; the ``mean`` column
is the mean over organs (per fold, then mean ± std over folds). The standard deviation is the population
one (``numpy.std``, ``ddof=0``) over the folds present. The ``evaluation`` column names the folder of the
``results.json`` each row comes from.

A directory is searched for ``test.py`` runs (Sacred folders ``fold<k>/test/<id>/`` with their ``run.json``,
and ``results.json`` files of unobserved runs). Per fold the newest run (Sacred start time) is the one
reported; when it FAILED, was INTERRUPTED or never finished (status RUNNING: still running, or killed), the
fold is flagged and its row, if any, comes from the newest run that completed; a fold with no completed run
has no row. When the directory holds training runs that validated during training
(``fold<k>/train/<id>/metrics.json``), each fold's final validation is shown beside its test Dice.

Used by ``script/summarize.py`` (which renders and writes the table) and :mod:`launcher.report` (the grid's
report, one such table per dataset and setting).
"""

from __future__ import annotations

import csv
import io
import json
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from engine.progress import LABEL_FREE_COLUMNS, VAL_PREFIX

#: Sacred's status of a run that ended normally.
COMPLETED = "COMPLETED"
FLAG = "⚠"


def load_results(path: Path) -> dict[str, Any]:
    """Read one ``results.json`` and check the fields the table needs."""
    with open(path) as handle:
        results = json.load(handle)
    missing = [key for key in ("dataset", "eval_fold", "classes", "mean_dice") if key not in results]
    if missing:
        raise ValueError(f"{path}: not a test.py results.json (missing {missing})")
    for name, entry in results["classes"].items():
        if "mean_dice" not in entry:
            raise ValueError(f"{path}: class {name} has no mean_dice")
    return results


def _read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object, or None when the file is missing or unreadable (a run killed while writing it)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


@dataclass
class Evaluation:
    """One ``test.py`` run: its folder, Sacred status and start time, and its results when it wrote them."""

    folder: Path
    status: str  # Sacred's status; 'unobserved' for a results.json without run.json
    started: datetime
    fold: int | None
    results: dict[str, Any] | None
    explicit: bool = False

    @property
    def usable(self) -> bool:
        return self.results is not None and self.status in (COMPLETED, "unobserved")

    def describe(self) -> str:
        if self.status == "RUNNING":
            return "never finished (Sacred status RUNNING: still running, or killed)"
        if self.status == COMPLETED and self.results is None:
            return "COMPLETED but wrote no results.json"
        return f"ended with Sacred status {self.status}"


def _file_time(path: Path) -> datetime:
    return datetime.fromtimestamp(path.stat().st_mtime, UTC).replace(tzinfo=None)


def _evaluation(folder: Path, results_file: Path | None, explicit: bool = False) -> Evaluation:
    """The evaluation in ``folder``; Sacred's ``run.json``/``config.json`` give its status, time and fold."""
    results = load_results(results_file) if results_file is not None and results_file.is_file() else None
    run = _read_json(folder / "run.json")
    if run is None:
        status, started = "unobserved", _file_time(results_file or folder)
    else:
        status = str(run.get("status", "unknown"))
        started = datetime.fromisoformat(run["start_time"]) if "start_time" in run else _file_time(folder)
    config = _read_json(folder / "config.json") or {}
    fold = results["eval_fold"] if results is not None else config.get("eval_fold")
    return Evaluation(folder, status, started, None if fold is None else int(fold), results, explicit)


def find_evaluations(directory: Path) -> list[Evaluation]:
    """Every ``test.py`` run under ``directory``: Sacred test folders and unobserved ``results.json``."""
    folders = {
        run_json.parent for run_json in directory.rglob("run.json") if run_json.parent.parent.name == "test"
    }
    folders |= {results.parent for results in directory.rglob("results.json")}
    return [_evaluation(folder, folder / "results.json") for folder in sorted(folders)]


def final_validations(directory: Path) -> dict[int, dict[str, Any]]:
    """Per fold, the last validation logged by its training runs: ``{"step", "dice": {name: fraction}}``
    with the class names, ``mean`` and the label-free ``lf AUC`` and ``lf Dice``."""
    found: dict[int, dict[str, Any]] = {}
    for metrics_file in sorted(directory.rglob("metrics.json")):
        if metrics_file.parent.parent.name != "train":
            continue
        metrics = _read_json(metrics_file) or {}
        config = _read_json(metrics_file.parent / "config.json") or {}
        series = {
            LABEL_FREE_COLUMNS.get(name, name[len(VAL_PREFIX) :]): dict(
                zip(value["steps"], value["values"], strict=True)
            )
            for name, value in metrics.items()
            if (name.startswith(VAL_PREFIX) or name in LABEL_FREE_COLUMNS) and value.get("steps")
        }
        if not series or "eval_fold" not in config:
            continue
        step = max(max(points) for points in series.values())
        fold = int(config["eval_fold"])
        if step >= found.get(fold, {}).get("step", -1):
            found[fold] = {"step": step, "dice": {name: p[step] for name, p in series.items() if step in p}}
    return found


def collect(paths: list[Path]) -> tuple[dict[int, Evaluation], dict[int, str], list[str]]:
    """The evaluation reported per fold, the flags (folds whose newest evaluation did not complete) and
    notes (runs left out).

    Two files given explicitly for the same fold are an error; inside a directory the newest run is the
    one reported (see the module docstring).
    """
    by_fold: dict[int, list[Evaluation]] = {}
    notes: list[str] = []
    for path in paths:
        if path.is_dir():
            evaluations = find_evaluations(path)
            if not evaluations:
                raise FileNotFoundError(f"no test.py run under {path} (run script/evaluate.sh first)")
        elif path.is_file():
            evaluations = [_evaluation(path.parent, path, explicit=True)]
        else:
            raise FileNotFoundError(f"not a results.json file or a run folder: {path}")
        for evaluation in evaluations:
            if evaluation.fold is None:
                notes.append(
                    f"{evaluation.folder}: cannot tell its fold (no results.json or config.json); left out"
                )
                continue
            by_fold.setdefault(evaluation.fold, []).append(evaluation)
    chosen: dict[int, Evaluation] = {}
    flags: dict[int, str] = {}
    for fold, evaluations in sorted(by_fold.items()):
        explicit = [e for e in evaluations if e.explicit]
        if len(explicit) > 1:
            raise ValueError(f"fold {fold}: several results.json given: {[str(e.folder) for e in explicit]}")
        evaluations.sort(key=lambda e: (e.explicit, e.started, str(e.folder)))
        newest = evaluations[-1]
        usable = [e for e in evaluations if e.usable]
        if usable:
            chosen[fold] = usable[-1]
        if not newest.usable:
            row = f"its row comes from {usable[-1].folder}" if usable else "no evaluation completed: no row"
            flags[fold] = f"fold {fold}: the newest evaluation, {newest.folder}, {newest.describe()}; {row}"
        notes += [f"fold {fold}: using {chosen[fold].folder}, ignoring {e.folder}" for e in usable[:-1]]
    if not chosen:
        raise ValueError("no completed evaluation to summarise:\n  " + "\n  ".join(flags.values()))
    datasets = {e.results["dataset"] for e in chosen.values()}
    class_lists = {tuple(e.results["classes"]) for e in chosen.values()}
    if len(datasets) > 1 or len(class_lists) > 1:
        raise ValueError(f"results mix datasets or class lists: {sorted(datasets)}, {sorted(class_lists)}")
    return chosen, flags, notes


def summary_rows(chosen: dict[int, dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Header and rows: one row per fold (Dice in %), then the ``mean`` and ``std`` rows over folds."""
    classes = list(next(iter(chosen.values()))["classes"])
    header = ["fold", *classes, "mean"]
    values = np.array(
        [
            [100.0 * results["classes"][name]["mean_dice"] for name in classes]
            + [100.0 * results["mean_dice"]]
            for results in chosen.values()
        ]
    )
    rows: list[list[Any]] = [[str(fold), *row] for fold, row in zip(chosen, values.tolist(), strict=True)]
    rows.append(["mean", *values.mean(axis=0).tolist()])
    rows.append(["std", *values.std(axis=0).tolist()])
    return header, rows


def validation_rows(
    folds: list[int], validations: dict[int, dict[str, Any]]
) -> tuple[list[str], list[list[float | None]]]:
    """Header and rows of the final validation, aligned with :func:`summary_rows`: one row per fold (the
    label-free AUC as a fraction and its Dice in %, then Dice in % per class, their mean, then the step; None
    where absent), then ``mean`` and ``std`` over the folds that have it (no step). No columns when no fold
    validated."""
    names: list[str] = []
    for fold in folds:
        names += [name for name in validations.get(fold, {}).get("dice", {}) if name not in names]
    if not names:
        return [], [[] for _ in range(len(folds) + 2)]
    label_free = list(LABEL_FREE_COLUMNS.values())
    names.sort(key=lambda name: (name not in label_free, name == "mean"))  # label-free first, the mean last
    scale = {name: 1.0 if name == LABEL_FREE_COLUMNS["lf_auc"] else 100.0 for name in names}
    rows: list[list[float | None]] = []
    for fold in folds:
        found = validations.get(fold, {"dice": {}, "step": None})
        rows.append(
            [scale[n] * found["dice"][n] if n in found["dice"] else None for n in names] + [found["step"]]
        )
    columns = [[row[i] for row in rows if row[i] is not None] for i in range(len(names))]
    rows.append([float(np.mean(c)) if c else None for c in columns] + [None])
    rows.append([float(np.std(c)) if c else None for c in columns] + [None])
    return [f"val {name}" for name in names] + ["val step"], rows


def format_value(value: float | None, digits: int = 2) -> str:
    """A table cell: the value with ``digits`` decimals, "–" when it is unknown."""
    return "–" if value is None else f"{value:.{digits}f}"


@dataclass
class SummaryTable:
    """What both renderings show: :func:`summary_rows` and :func:`validation_rows` (one row per fold, then
    ``mean`` and ``std``), the evaluation folder of each fold and the flags by fold name."""

    title: str
    header: list[str]
    rows: list[list[Any]]
    val_header: list[str]
    val_rows: list[list[float | None]]
    sources: list[str]
    flags: dict[str, str]


def to_markdown(table: SummaryTable) -> str:
    """Per-fold rows (test Dice, final validation, evaluation folder), a ``mean ± std`` row, the flags."""
    header, rows, val_header, val_rows = table.header, table.rows, table.val_header, table.val_rows
    sources, flags, title = table.sources, table.flags, table.title
    columns = header + val_header + ["evaluation"]
    lines = [f"**{title}** (Dice %, mean ± std over {len(rows) - 2} fold(s))", ""]
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|---|" + "---:|" * (len(columns) - 2) + "---|")
    for row, val, source in zip(rows[:-2], val_rows[:-2], sources, strict=True):
        fold = row[0] + (f" {FLAG}" if row[0] in flags else "")
        val_cells = [format_value(v) for v in val[:-1]] + [format_value(val[-1], 0)] if val else []
        lines.append("| " + " | ".join([fold, *(f"{v:.2f}" for v in row[1:]), *val_cells, source]) + " |")
    cells = [f"{m:.2f} ± {s:.2f}" for m, s in zip(rows[-2][1:], rows[-1][1:], strict=True)]
    val_mean, val_std = val_rows[-2], val_rows[-1]
    cells += [
        "–" if m is None else f"{m:.2f} ± {s:.2f}" for m, s in zip(val_mean[:-1], val_std[:-1], strict=True)
    ]
    cells += [""] * (1 if val_header else 0) + [""]
    lines.append("| **mean ± std** | " + " | ".join(cells) + " |")
    if val_header:
        lines += [
            "",
            "val: the last validation during training: organ Dice on the fold's test volumes (monitoring "
            "only); lf: label-free AUC (a fraction) and Dice (%) on held-out volumes, no label read.",
        ]
    if flags:
        lines += ["", *(f"{FLAG} {flag}" for flag in flags.values())]
    return "\n".join(lines) + "\n"


def to_csv(table: SummaryTable) -> str:
    """The same rows as CSV with full precision (``mean`` and ``std`` as separate rows), the evaluation
    folder and the flag of each fold."""
    header, rows, val_header, val_rows = table.header, table.rows, table.val_header, table.val_rows
    sources, flags = table.sources, table.flags
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header + val_header + ["evaluation", "warning"])
    sources_and_flags = [[source, flags.get(row[0], "")] for row, source in zip(rows, sources, strict=False)]
    sources_and_flags += [["", ""], ["", ""]]  # the mean and std rows
    for row, val, tail in zip(rows, val_rows, sources_and_flags, strict=True):
        val_cells = ["" if v is None else f"{v:.6f}" for v in val[:-1]]
        if val:
            val_cells.append("" if val[-1] is None else str(int(val[-1])))
        writer.writerow([row[0], *(f"{v:.6f}" for v in row[1:]), *val_cells, *tail])
    return buffer.getvalue()


def _relative(folder: Path, bases: list[Path]) -> str:
    """``folder`` relative to the directory argument that holds it (else as found)."""
    for base in bases:
        if folder.is_relative_to(base):
            return str(folder.relative_to(base))
    return str(folder)


def build_table(paths: list[Path]) -> tuple[SummaryTable, dict[int, Evaluation]]:
    """The per-fold table of ``paths`` (one dataset and setting) and the evaluation chosen per fold; notes
    and flags go to stderr."""
    chosen, flags, notes = collect(paths)
    for note in notes:
        print(note, file=sys.stderr)
    for flag in flags.values():
        print(f"warning: {flag}", file=sys.stderr)
    folds = sorted(chosen)
    validations: dict[int, dict[str, Any]] = {}
    for path in paths:
        if path.is_dir():
            validations |= final_validations(path)
    directories = [path for path in paths if path.is_dir()]
    sources = [_relative(chosen[fold].folder, directories) for fold in folds]
    first = chosen[folds[0]].results
    setting = first.get("config", {}).get("setting")
    title = f"{first['dataset']}" + (f", setting {setting}" if setting is not None else "")
    header, rows = summary_rows({fold: chosen[fold].results for fold in folds})
    val_header, val_rows = validation_rows(folds, validations)
    table = SummaryTable(
        title, header, rows, val_header, val_rows, sources, {str(fold): flag for fold, flag in flags.items()}
    )
    return table, chosen
