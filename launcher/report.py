"""A grid's report: per dataset and setting, the paper's table beside a reference (Markdown, CSV, PNG).

A grid folder's ``<dataset>_setting<k>/`` subfolders (as ``script/launch.py`` leaves them) each give one
per-fold table (:func:`engine.summary.build_table`); the report shows, per dataset and setting, the Dice per
organ and their mean as mean ± std over the folds, each method of a reference CSV (default
``docs/reference/difd_paper.csv``; an empty reference cell is an unknown value: "–" and no difference) and the
difference, then the per-fold table. ``report.csv`` has one row per class and reference method with every
fold's value; ``report.png`` a panel per dataset and setting (a bar per organ at the folds' mean, a dot per
fold, the reference as a horizontal mark).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from engine.summary import SummaryTable, build_table, format_value, to_markdown
from utils import write_atomically

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
            reference_cells = [format_value(v.dice if v else None) for v in known]
            lines.append(f"| {method} | " + " | ".join(reference_cells) + " |")
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
