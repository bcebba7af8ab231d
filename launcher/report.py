"""A grid's report: per dataset and setting, each method of the grid beside its published numbers
(Markdown, CSV, PNG).

A grid folder's ``[<method>_]<dataset>_setting<k>/`` subfolders (as ``script/launch.py`` leaves them) each
give one per-fold table (:func:`engine.summary.build_table`) of one method, dataset and setting (the
method and setting read from the results' config). The report shows, per dataset and setting, one row per
method of the grid: the Dice per organ and their mean as mean ± std over its folds; beneath it the values
a reference CSV (default ``docs/reference/published_fsmis.csv``; any other with ``--reference``) gives for
that method, with their confidence tag, and the difference (this grid − reference; an empty reference
cell is an unknown value: "–" and no difference). A reference method is the grid's method whose name or
title (:class:`models.methods.Method`) it is, compared case-, space- and punctuation-blind (``Q-Net`` is
``qnet``); a reference method that names no method of the grid is listed as not run here, and compared
with the grid's method when the grid holds only one (a colleague's table, another code's numbers). Under
the table: the protocol of this grid's runs (from their config), each reference value's source and the
protocol it was obtained under where the source says so, then each method's per-fold table.
``report.csv`` has one row per method, class and compared reference with every fold's value;
``report.png`` a panel per dataset and setting (a bar per organ and method at the folds' mean, a dot per
fold, the compared reference as a horizontal mark).
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path

from engine.summary import SummaryTable, build_table, format_value, to_markdown
from models.methods import DEFAULT_METHOD, get_method, method_names
from utils import write_atomically

#: The reference shipped with the project: the published Dice of the methods (docs/reference/README.md).
DEFAULT_REFERENCE = Path(__file__).resolve().parent.parent / "docs" / "reference" / "published_fsmis.csv"
REFERENCE_COLUMNS = ("method", "dataset", "setting", "class", "dice", "source")
#: Columns a reference may add: how far to trust a value, and the protocol it was obtained under.
OPTIONAL_COLUMNS = ("confidence", "protocol")
#: Config keys of a run that say under which protocol this grid's numbers were obtained.
PROTOCOL_KEYS = ("supp_idx", "n_part", "n_steps")


@dataclass(frozen=True)
class ReferenceValue:
    """One cell of a reference table: a method's Dice (in %, None when not known) for a class (or
    ``mean``) of a dataset and setting, where it comes from, its confidence tag and the protocol it was
    obtained under (empty when the source does not say)."""

    method: str
    dataset: str
    setting: int
    name: str
    dice: float | None
    source: str
    confidence: str = ""
    protocol: str = ""


def load_reference(path: Path) -> list[ReferenceValue]:
    """A reference CSV (columns :data:`REFERENCE_COLUMNS`, optionally :data:`OPTIONAL_COLUMNS`; Dice in %;
    an empty cell is an unknown value), checked: every error names the file, the line and what was
    expected."""
    from dataloaders.datasets import DATASETS

    try:
        text = path.read_text()
    except OSError as err:
        raise FileNotFoundError(f"--reference: cannot read {path}: {err}") from err
    reader = csv.DictReader(io.StringIO(text))
    fields = set(reader.fieldnames or ())
    if not set(REFERENCE_COLUMNS) <= fields <= set(REFERENCE_COLUMNS + OPTIONAL_COLUMNS):
        raise ValueError(
            f"{path}: expected the columns {','.join(REFERENCE_COLUMNS)} (and optionally "
            f"{','.join(OPTIONAL_COLUMNS)}), found {reader.fieldnames}"
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
        extra = {name: (row.get(name) or "").strip() for name in OPTIONAL_COLUMNS}
        values.append(
            ReferenceValue(
                row["method"], row["dataset"], int(row["setting"]), row["class"], dice, row["source"], **extra
            )
        )
    return values


def run_roots(directory: Path) -> list[Path]:
    """The run roots (``<exp_str>/`` folders holding ``fold<k>/test/``) directly under a grid folder."""
    return sorted(
        child for child in directory.iterdir() if child.is_dir() and any(child.glob("fold*/test/*"))
    )


def _plain(name: str) -> str:
    """A method's name compared case-, space- and punctuation-blind."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def names_of(method: str) -> set[str]:
    """What a reference may call ``method``: its name and, when registered, its title."""
    names = {_plain(method)}
    if method in method_names():
        names.add(_plain(get_method(method).title))
    return names


@dataclass
class GroupSummary:
    """One method, dataset and setting of a grid: its per-fold table and its runs' configs."""

    method: str
    dataset: str
    setting: int | None
    table: SummaryTable
    folds: list[int]
    configs: list[dict]
    root: Path

    @property
    def classes(self) -> list[str]:
        return self.table.header[1:]  # the organs, then "mean"

    def values(self, name: str) -> list[float]:
        index = self.table.header.index(name)
        return [row[index] for row in self.table.rows[:-2]]

    def mean_std(self, name: str) -> tuple[float, float]:
        index = self.table.header.index(name)
        return self.table.rows[-2][index], self.table.rows[-1][index]

    def comparable(self, name: str) -> bool:
        """Whether this grid's value of ``name`` may be set against a reference: an organ always, the mean
        only when the runs evaluated the dataset's test classes (a mean over fewer organs is another
        number)."""
        from dataloaders.datasets import get_dataset_info

        if name != "mean":
            return True
        info = get_dataset_info(self.dataset)
        return set(self.classes[:-1]) == {info.label_names[label] for label in info.test_labels}

    def protocol(self) -> str:
        """The protocol keys of its runs' configs (a set of values where the folds differ)."""
        parts = []
        for key in PROTOCOL_KEYS:
            found = sorted({str(c[key]) for c in self.configs if key in c})
            if found:
                parts.append(f"{key}={'/'.join(found)}")
        return ", ".join(parts) or "not recorded in the results"


@dataclass
class Section:
    """One dataset and setting: its methods (in registry order) and the reference rows, by method."""

    dataset: str
    setting: int | None
    groups: list[GroupSummary]
    reference: dict[str, dict[str, ReferenceValue]]

    @property
    def title(self) -> str:
        return self.dataset + (f", setting {self.setting}" if self.setting is not None else "")

    @property
    def classes(self) -> list[str]:
        return self.groups[0].classes

    def compared(self, group: GroupSummary) -> list[str]:
        """The reference methods ``group`` is compared with: the one naming its method, and when it is the
        only method here, every reference method that names no method of this section."""
        own = [m for m in self.reference if _plain(m) in names_of(group.method)]
        return own + (self.unmatched() if len(self.groups) == 1 else [])

    def unmatched(self) -> list[str]:
        ran = set().union(*(names_of(g.method) for g in self.groups))
        return [m for m in self.reference if _plain(m) not in ran]


def _order(method: str) -> tuple[int, str]:
    known = method_names()
    return (known.index(method) if method in known else len(known), method)


def sections_of(groups: list[GroupSummary], reference: list[ReferenceValue]) -> list[Section]:
    """The groups by dataset and setting (datasets in the benchmark's order), methods in registry order;
    a method, dataset and setting given by two run roots is a ``ValueError`` naming them."""
    from dataloaders.datasets import DATASETS

    order = list(DATASETS)
    by_key: dict[tuple, list[GroupSummary]] = {}
    for group in groups:
        by_key.setdefault((group.dataset, group.setting), []).append(group)
    sections = []
    for (dataset, setting), found in sorted(
        by_key.items(), key=lambda kv: (order.index(kv[0][0]) if kv[0][0] in order else 99, kv[0][1] or 0)
    ):
        found.sort(key=lambda g: _order(g.method))
        for first, second in zip(found, found[1:], strict=False):
            if first.method == second.method:
                raise ValueError(
                    f"{first.method} {dataset} setting {setting} is in two run folders of the grid: "
                    f"{first.root} and {second.root}"
                )
        rows: dict[str, dict[str, ReferenceValue]] = {}
        for value in reference:
            if value.dataset == dataset and value.setting == setting:
                rows.setdefault(value.method, {})[value.name] = value
        sections.append(Section(dataset, setting, found, rows))
    return sections


def _signed(value: float) -> str:
    return f"{value:+.2f}".replace("-", "−")


def _tag(values: dict[str, ReferenceValue]) -> str:
    tags = sorted({v.confidence for v in values.values() if v.confidence})
    return f" [{'/'.join(tags)}]" if tags else ""


def report_markdown(sections: list[Section], reference_path: Path) -> str:
    """Per dataset and setting: a row per method (mean ± std over its folds per organ and their mean),
    beneath it each reference it is compared with and the difference ("–" where the reference cell is
    empty), the reference methods not run here; then the protocols, the sources and the per-fold tables."""
    lines = [
        f"# Grid report: the methods side by side (Dice %, reference: {reference_path})",
        "",
        "Each method's row is this grid's mean ± std over its folds; beneath it the reference values of that "
        "method (confidence tag in brackets; – where not known) and the difference (this grid − reference).",
        "",
    ]
    for section in sections:
        classes = section.classes
        lines += [f"## {section.title}", ""]
        lines.append("| | " + " | ".join(classes) + " |")
        lines.append("|---|" + "---:|" * len(classes))
        for group in section.groups:
            cells = [f"{m:.2f} ± {s:.2f}" for m, s in (group.mean_std(name) for name in classes)]
            lines.append(
                f"| {group.method}: this grid ({len(group.folds)} fold(s)) | " + " | ".join(cells) + " |"
            )
            for method in section.compared(group):
                values = section.reference[method]
                known = [values.get(name) for name in classes]
                row = [format_value(v.dice if v else None) for v in known]
                lines.append(f"| {method}{_tag(values)} | " + " | ".join(row) + " |")
                differences = [
                    "–"
                    if v is None or v.dice is None or not group.comparable(name)
                    else _signed(group.mean_std(name)[0] - v.dice)
                    for name, v in zip(classes, known, strict=True)
                ]
                lines.append(f"| difference to {method} | " + " | ".join(differences) + " |")
            if not section.compared(group):
                lines.append(
                    f"| {group.method}: no reference row | " + " | ".join("–" for _ in classes) + " |"
                )
        if len(section.groups) > 1:
            for method in section.unmatched():
                values = section.reference[method]
                row = [format_value(values[n].dice if n in values else None) for n in classes]
                lines.append(f"| {method}{_tag(values)}, not run here | " + " | ".join(row) + " |")
        lines += ["", "Protocol of this grid's runs (docs/method.md §5; config of their results):"]
        lines += [f"- {group.method}: {group.protocol()}" for group in section.groups]
        lines += [
            f"- {group.method}: its mean is over {', '.join(group.classes[:-1])} only, not the dataset's "
            "test classes: not compared with a reference mean"
            for group in section.groups
            if not group.comparable("mean")
        ]
        if section.reference:
            lines += [
                "",
                f"Reference values ({reference_path.name}): source, and the protocol where it says so:",
            ]
        else:
            lines += ["", f"No reference row for {section.title} in {reference_path}."]
        for method, values in section.reference.items():
            # The sources of the values known; for a method with none here, why its cells are empty.
            cited = [v for v in values.values() if v.dice is not None] or list(values.values())
            for confidence, text, protocol in sorted({(v.confidence, v.source, v.protocol) for v in cited}):
                tag = f"[{confidence}] " if confidence else ""
                said = f"protocol: {protocol}" if protocol else "protocol: not stated by the source"
                lines.append(f"- {method}: {tag}{text}; {said}")
        for group in section.groups:
            lines += ["", f"### {group.method}, {section.title}: per fold", "", to_markdown(group.table)]
    return "\n".join(lines)


def report_csv(sections: list[Section]) -> str:
    """One row per method, dataset, setting, class (and ``mean``) and compared reference: the folds' Dice,
    their mean and std, the reference, the difference, confidence, source and protocol (empty where
    unknown)."""
    from dataloaders.datasets import N_FOLDS

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    fold_columns = [f"fold{k}" for k in range(N_FOLDS)]
    writer.writerow(
        ["method", "dataset", "setting", "class", "folds", "mean", "std", *fold_columns,
         "reference_method", "reference", "difference", "confidence", "source", "protocol"]
    )  # fmt: skip
    for section in sections:
        for group in section.groups:
            compared = section.compared(group) or [""]
            for name in group.classes:
                by_fold = dict(zip(group.folds, group.values(name), strict=True))
                mean, std = group.mean_std(name)
                folds = [f"{by_fold[k]:.6f}" if k in by_fold else "" for k in range(N_FOLDS)]
                for method in compared:
                    value = section.reference.get(method, {}).get(name)
                    known = value is not None and value.dice is not None
                    differs = known and group.comparable(name)
                    writer.writerow(
                        [group.method, group.dataset, group.setting, name, len(group.folds),
                         f"{mean:.6f}", f"{std:.6f}", *folds, method,
                         f"{value.dice:.6f}" if known else "", f"{mean - value.dice:.6f}" if differs else "",
                         *((value.confidence, value.source, value.protocol) if value else ("", "", ""))]
                    )  # fmt: skip
    return buffer.getvalue()


def draw_report(sections: list[Section], path: Path) -> Path:
    """One panel per dataset and setting: per organ (and the mean) a bar per method at the folds' mean, a
    dot per fold, each compared reference value as a horizontal mark over its method's bar; PNG,
    atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = min(3, len(sections))
    rows = -(-len(sections) // columns)
    figure = Figure(figsize=(5.5 * columns, 5.0 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for axis in axes[len(sections) :]:
        axis.set_axis_off()
    for axis, section in zip(axes, sections, strict=False):
        width = 0.8 / len(section.groups)
        marks = 0
        for index, group in enumerate(section.groups):
            centres = [x - 0.4 + width * (index + 0.5) for x in range(len(section.classes))]
            means = [group.mean_std(name)[0] for name in section.classes]
            axis.bar(centres, means, width * 0.9, color=f"C{index}", alpha=0.35, edgecolor=f"C{index}",
                     label=f"{group.method} ({len(group.folds)} fold(s))")  # fmt: skip
            for x, name in zip(centres, section.classes, strict=True):
                values = group.values(name)
                spread = [x + 0.5 * width * (i / max(1, len(values) - 1) - 0.5) for i in range(len(values))]
                axis.plot(spread, values, "o", color=f"C{index}", markersize=3)
            for method in section.compared(group):
                values = section.reference[method]
                known = [(x, values[n].dice) for x, n in zip(centres, section.classes, strict=True)
                         if n in values and values[n].dice is not None and group.comparable(n)]  # fmt: skip
                style = ("-", "--", ":", "-.")[marks % 4]
                marks += 1
                if known:
                    axis.hlines([d for _, d in known], [x - width / 2 for x, _ in known],
                                [x + width / 2 for x, _ in known], colors="k", linestyles=style,
                                linewidth=2.0, label=f"{method} (reference)")  # fmt: skip
                else:
                    axis.plot([], [], "k", linestyle=style, label=f"{method}: no reference value known")
        axis.set_xticks(range(len(section.classes)), section.classes)
        axis.set_ylim(0, 100)
        axis.set_ylabel("Dice %")
        axis.set_title(section.title)
        axis.grid(axis="y", alpha=0.3)
        axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2, fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomically(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100), what="picture")


def grid_report(roots: list[Path], reference_path: Path, out: Path, out_md, out_csv, out_png) -> str:
    """The report of the run roots ``roots``: Markdown (returned), CSV and PNG, written to ``out/report.*``
    unless ``--out-*`` says otherwise."""
    reference = load_reference(reference_path)
    groups = []
    for root in roots:
        table, chosen = build_table([root])
        configs = [e.results.get("config", {}) for e in chosen.values()]
        first = next(iter(chosen.values())).results
        method = configs[0].get("method", DEFAULT_METHOD)  # results written before methods: DIFD's
        setting = configs[0].get("setting")
        groups.append(GroupSummary(method, first["dataset"], setting, table, sorted(chosen), configs, root))
    sections = sections_of(groups, reference)
    markdown = report_markdown(sections, reference_path)
    for target, text in (
        (out_md or out / "report.md", markdown),
        (out_csv or out / "report.csv", report_csv(sections)),
    ):
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(target, lambda tmp, text=text: tmp.write_text(text))
    picture = draw_report(sections, out_png or out / "report.png")
    return markdown + f"\npicture: {picture}\n"
