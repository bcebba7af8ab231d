"""Gather the folds' ``results.json`` (written by ``test.py``) into the paper's table layout.

Per organ: Dice (in %) of every fold and the mean ± standard deviation over the folds; the ``mean`` column
is the mean over organs (per fold, then mean ± std over folds). The standard deviation is the population
one (``numpy.std``, ``ddof=0``) over the folds present. The ``evaluation`` column names the folder of the
``results.json`` each row comes from.

Examples::

    python script/summarize.py runs/CHAOST2_setting1            # newest test run of every fold
    python script/summarize.py a/results.json b/results.json --out-md table.md --out-csv table.csv
    python script/summarize.py runs                                 # a grid: report.{md,csv,png}
    python script/summarize.py runs --reference colleague.csv       # ... beside another reference

A directory argument is searched for ``test.py`` runs (Sacred folders ``fold<k>/test/<id>/`` with their
``run.json``, and ``results.json`` files of unobserved runs). Per fold the newest run (Sacred start time)
is the one reported; when it FAILED, was INTERRUPTED or never finished (status RUNNING: still running, or
killed), the fold is flagged (⚠ in the table and a warning line under it and on stderr) and its row, if
any, comes from the newest run that completed, named in the ``evaluation`` column; a fold with no completed
run has no row. Older runs that were left out are listed on stderr.

When the directory holds training runs (``fold<k>/train/<id>/metrics.json``) that validated during
training, the table also shows, beside the test Dice, each fold's final validation Dice (``val`` columns:
per class, their mean and the step; the fold's test volumes, for monitoring only).

With a single directory and no ``--out-*`` option the table is written to ``<dir>/summary.md`` and
``<dir>/summary.csv``. The Markdown table is always printed.

The report of a grid (``python script/summarize.py runs``: a folder whose ``<dataset>_setting<k>/``
subfolders hold the folds, as ``script/launch.py`` leaves them; or one such subfolder with
``--reference``): per dataset and setting, the paper's table (Dice per organ and their mean as mean ± std
over the folds), beside each method of a reference CSV (default ``docs/reference/difd_paper.csv``; any
other with ``--reference``; an empty reference cell shows "–" and no difference) and the difference, then
the per-fold table above. Written to ``<dir>/report.md``, ``report.csv`` (one row per class and reference
method, with every fold's value) and ``report.png`` (a bar per organ at the folds' mean, a dot per fold,
the reference as a horizontal mark).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from utils import write_atomically

#: Sacred's status of a run that ended normally.
COMPLETED = "COMPLETED"
#: Prefix of the validation metrics train.py logs.
VAL_PREFIX = "val_dice_"
#: The label-free validation's metrics (engine.progress.LABEL_FREE_METRICS) and their column names.
LABEL_FREE = {"lf_auc": "lf AUC", "lf_dice": "lf Dice"}
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
            LABEL_FREE.get(name, name[len(VAL_PREFIX) :]): dict(
                zip(value["steps"], value["values"], strict=True)
            )
            for name, value in metrics.items()
            if (name.startswith(VAL_PREFIX) or name in LABEL_FREE) and value.get("steps")
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
    label_free = list(LABEL_FREE.values())
    names.sort(key=lambda name: (name not in label_free, name == "mean"))  # label-free first, the mean last
    scale = {name: 1.0 if name == LABEL_FREE["lf_auc"] else 100.0 for name in names}
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


def _number(value: float | None, digits: int = 2) -> str:
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
        val_cells = [_number(v) for v in val[:-1]] + [_number(val[-1], 0)] if val else []
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


#: The reference shipped with the project: the DIFD paper's published Dice (docs/reference/README.md).
DEFAULT_REFERENCE = Path(__file__).resolve().parent.parent / "docs" / "reference" / "difd_paper.csv"
REFERENCE_COLUMNS = ("method", "dataset", "setting", "class", "dice", "source")


@dataclass(frozen=True)
class ReferenceValue:
    """One cell of a reference table: a method's Dice (in %, None when not known) for a class (or
    ``mean``) of a dataset and setting, and where it comes from."""

    method: str
    dataset: str
    setting: int
    name: str
    dice: float | None
    source: str


def load_reference(path: Path) -> list[ReferenceValue]:
    """A reference CSV (columns :data:`REFERENCE_COLUMNS`, Dice in %; an empty cell is an unknown value),
    checked: every error names the file, the line and what was expected."""
    from dataloaders.datasets import DATASETS

    try:
        text = path.read_text()
    except OSError as err:
        raise FileNotFoundError(f"--reference: cannot read {path}: {err}") from err
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None or set(reader.fieldnames) != set(REFERENCE_COLUMNS):
        raise ValueError(
            f"{path}: expected the columns {','.join(REFERENCE_COLUMNS)}, found {reader.fieldnames}"
        )
    values, seen = [], set()
    for line, row in enumerate(reader, start=2):
        where = f"{path} line {line}"
        info = DATASETS.get(row["dataset"])
        if info is None:
            raise ValueError(f"{where}: dataset must be one of {sorted(DATASETS)}, found {row['dataset']!r}")
        if row["setting"] not in ("1", "2"):
            raise ValueError(f"{where}: setting must be 1 or 2, found {row['setting']!r}")
        names = [*info.label_names.values(), "mean"]
        if row["class"] not in names:
            raise ValueError(f"{where}: class must be one of {names} for {info.name}, found {row['class']!r}")
        if not row["method"].strip():
            raise ValueError(f"{where}: the method is empty")
        dice = None
        if row["dice"].strip():
            try:
                dice = float(row["dice"])
            except ValueError:
                dice = float("nan")
            if not 0.0 <= dice <= 100.0:
                raise ValueError(
                    f"{where}: dice must be empty or a number in [0, 100] (%), found {row['dice']!r}"
                )
        key = (row["method"], row["dataset"], row["setting"], row["class"])
        if key in seen:
            raise ValueError(f"{where}: {', '.join(key)} is given twice")
        seen.add(key)
        values.append(
            ReferenceValue(
                row["method"], row["dataset"], int(row["setting"]), row["class"], dice, row["source"]
            )
        )
    return values


def run_roots(directory: Path) -> list[Path]:
    """The run roots (``<exp_str>/`` folders holding ``fold<k>/test/``) directly under a grid folder."""
    return sorted(
        child for child in directory.iterdir() if child.is_dir() and any(child.glob("fold*/test/*"))
    )


@dataclass
class GroupSummary:
    """One dataset and setting of a grid: its per-fold table and what the paper's table shows."""

    dataset: str
    setting: int | None
    table: SummaryTable
    folds: list[int]

    @property
    def classes(self) -> list[str]:
        return self.table.header[1:]  # the organs, then "mean"

    def values(self, name: str) -> list[float]:
        index = self.table.header.index(name)
        return [row[index] for row in self.table.rows[:-2]]

    def mean_std(self, name: str) -> tuple[float, float]:
        index = self.table.header.index(name)
        return self.table.rows[-2][index], self.table.rows[-1][index]

    def references(self, reference: list[ReferenceValue]) -> dict[str, dict[str, ReferenceValue]]:
        """Per method, its values for this dataset and setting by class name."""
        found: dict[str, dict[str, ReferenceValue]] = {}
        for value in reference:
            if value.dataset == self.dataset and value.setting == self.setting:
                found.setdefault(value.method, {})[value.name] = value
        return found


def _signed(value: float) -> str:
    return f"{value:+.2f}".replace("-", "−")


def report_markdown(groups: list[GroupSummary], reference: list[ReferenceValue], reference_path: Path) -> str:
    """Per dataset and setting: mean ± std over the folds per organ and their mean, each reference method
    and the difference (this grid − reference; "–" where the reference cell is empty), the sources, then
    the per-fold table."""
    lines = [f"# DIFD grid report (Dice %, reference: {reference_path})", ""]
    for group in groups:
        lines += [f"## {group.table.title}", ""]
        lines.append("| | " + " | ".join(group.classes) + " |")
        lines.append("|---|" + "---:|" * len(group.classes))
        cells = [f"{m:.2f} ± {s:.2f}" for m, s in (group.mean_std(name) for name in group.classes)]
        lines.append(f"| this grid ({len(group.folds)} fold(s)) | " + " | ".join(cells) + " |")
        sources = []
        for method, values in group.references(reference).items():
            known = [values.get(name) for name in group.classes]
            lines.append(f"| {method} | " + " | ".join(_number(v.dice if v else None) for v in known) + " |")
            differences = [
                "–" if v is None or v.dice is None else _signed(group.mean_std(name)[0] - v.dice)
                for name, v in zip(group.classes, known, strict=True)
            ]
            lines.append(f"| difference to {method} | " + " | ".join(differences) + " |")
            sources += sorted({f"{method}: {v.source}" for v in values.values() if v.source})
        if not group.references(reference):
            lines.append("| reference | " + " | ".join("–" for _ in group.classes) + " |")
            sources.append(
                f"no reference row for {group.dataset} setting {group.setting} in {reference_path}"
            )
        lines += ["", *(f"source: {source}" for source in sources), "", to_markdown(group.table)]
    return "\n".join(lines)


def report_csv(groups: list[GroupSummary], reference: list[ReferenceValue]) -> str:
    """One row per dataset, setting, class (and ``mean``) and reference method: the folds' Dice, their mean
    and std, the reference and the difference (empty where unknown)."""
    from dataloaders.datasets import N_FOLDS

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    fold_columns = [f"fold{k}" for k in range(N_FOLDS)]
    writer.writerow(
        [
            "dataset",
            "setting",
            "class",
            "folds",
            "mean",
            "std",
            *fold_columns,
            "method",
            "reference",
            "difference",
            "source",
        ]
    )
    for group in groups:
        methods = group.references(reference) or {"": {}}
        for name in group.classes:
            by_fold = dict(zip(group.folds, group.values(name), strict=True))
            mean, std = group.mean_std(name)
            folds = [f"{by_fold[k]:.6f}" if k in by_fold else "" for k in range(N_FOLDS)]
            for method, values in methods.items():
                value = values.get(name)
                known = value is not None and value.dice is not None
                writer.writerow(
                    [
                        group.dataset,
                        group.setting,
                        name,
                        len(group.folds),
                        f"{mean:.6f}",
                        f"{std:.6f}",
                        *folds,
                        method,
                        f"{value.dice:.6f}" if known else "",
                        f"{mean - value.dice:.6f}" if known else "",
                        value.source if value is not None else "",
                    ]
                )
    return buffer.getvalue()


def draw_report(groups: list[GroupSummary], reference: list[ReferenceValue], path: Path) -> Path:
    """One panel per dataset and setting: a bar per organ (and the mean) at the folds' mean, a dot per
    fold, each reference method's value as a horizontal mark (none where unknown); PNG, atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = min(3, len(groups))
    rows = -(-len(groups) // columns)
    figure = Figure(figsize=(5.5 * columns, 5.0 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for axis in axes[len(groups) :]:
        axis.set_axis_off()
    for axis, group in zip(axes, groups, strict=False):
        positions = list(range(len(group.classes)))
        means = [group.mean_std(name)[0] for name in group.classes]
        axis.bar(positions, means, color="0.8", edgecolor="0.4", label="mean over folds")
        for x, name in zip(positions, group.classes, strict=True):
            values = group.values(name)
            spread = [x + 0.25 * (i / max(1, len(values) - 1) - 0.5) for i in range(len(values))]
            axis.plot(spread, values, "o", color="C0", markersize=4, label="fold" if x == 0 else None)
        for index, (method, values) in enumerate(group.references(reference).items()):
            known = [
                (x, values[name].dice)
                for x, name in zip(positions, group.classes, strict=True)
                if name in values and values[name].dice is not None
            ]
            if known:
                axis.hlines(
                    [d for _, d in known],
                    [x - 0.4 for x, _ in known],
                    [x + 0.4 for x, _ in known],
                    colors=f"C{index + 1}",
                    linewidth=2.5,
                    label=method,
                )
            else:
                axis.plot([], [], color=f"C{index + 1}", label=f"{method}: no value known")
        axis.set_xticks(positions, group.classes)
        axis.set_ylim(0, 100)
        axis.set_ylabel("Dice %")
        axis.set_title(f"{group.table.title} ({len(group.folds)} fold(s))")
        axis.grid(axis="y", alpha=0.3)
        axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=3, fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomically(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100), what="picture")


def grid_report(roots: list[Path], reference_path: Path, out: Path, out_md, out_csv, out_png) -> str:
    """The report of the run roots ``roots``: Markdown (returned), CSV and PNG, written to ``out/report.*``
    unless ``--out-*`` says otherwise."""
    reference = load_reference(reference_path)
    groups = []
    for root in roots:
        table, chosen = build_table([root])
        first = next(iter(chosen.values())).results
        setting = first.get("config", {}).get("setting")
        groups.append(GroupSummary(first["dataset"], setting, table, sorted(chosen)))
    markdown = report_markdown(groups, reference, reference_path)
    for target, text in (
        (out_md or out / "report.md", markdown),
        (out_csv or out / "report.csv", report_csv(groups, reference)),
    ):
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(target, lambda tmp, text=text: tmp.write_text(text))
    picture = draw_report(groups, reference, out_png or out / "report.png")
    return markdown + f"\npicture: {picture}\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "paths",
        nargs="+",
        type=Path,
        help="run folders (runs/<dataset>_setting<k>), results.json, or one grid folder (runs)",
    )
    parser.add_argument("--out-md", type=Path, help="write the Markdown table here")
    parser.add_argument("--out-csv", type=Path, help="write the CSV table here")
    parser.add_argument("--out-png", type=Path, help="report: write the picture here")
    parser.add_argument(
        "--reference",
        type=Path,
        help=f"reference CSV ({','.join(REFERENCE_COLUMNS)}; Dice in %%) for the report (default for a grid "
        f"folder: {DEFAULT_REFERENCE})",
    )
    args = parser.parse_args(argv)

    single = args.paths[0] if len(args.paths) == 1 and args.paths[0].is_dir() else None
    grid = single is not None and not any(single.glob("fold*")) and run_roots(single)
    if grid or args.reference:
        if single is None:
            parser.error(
                "a report (--reference) takes one folder: a grid folder or one runs/<dataset>_setting<k>"
            )
        roots = run_roots(single) if grid else [single]
        if not roots:
            raise FileNotFoundError(f"no test.py run under {single} (run script/evaluate.sh first)")
        print(
            grid_report(
                roots, args.reference or DEFAULT_REFERENCE, single, args.out_md, args.out_csv, args.out_png
            ),
            end="",
        )
        return 0
    table, _ = build_table(args.paths)
    markdown, table_csv = to_markdown(table), to_csv(table)
    out_md, out_csv = args.out_md, args.out_csv
    if out_md is None and out_csv is None and single is not None:
        out_md, out_csv = single / "summary.md", single / "summary.csv"
    for target, text in ((out_md, markdown), (out_csv, table_csv)):
        if target is not None:
            target.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(target, lambda tmp, text=text: tmp.write_text(text))
    print(markdown, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
