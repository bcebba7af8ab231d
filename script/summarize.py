"""Gather the folds' ``results.json`` (written by ``test.py``) into the paper's table layout.

Per organ: Dice (in %) of every fold and the mean ± standard deviation over the folds; the last column
is the mean over organs (per fold, then mean ± std over folds). The standard deviation is the population
one (``numpy.std``, ``ddof=0``) over the folds present.

Examples::

    python script/summarize.py runs/CHAOST2_setting1            # newest test run of every fold
    python script/summarize.py a/results.json b/results.json --out-md table.md --out-csv table.csv

A directory argument is searched for ``results.json`` files (``fold<k>/test/<id>/results.json``); when a
fold was evaluated several times the newest file (modification time) is used and the others are named.
With a single directory and no ``--out-*`` option the table is written to ``<dir>/summary.md`` and
``<dir>/summary.csv``. The Markdown table is always printed.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np


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


def collect(paths: list[Path]) -> tuple[dict[int, dict[str, Any]], list[str]]:
    """One results dict per fold (keyed by ``eval_fold``) and notes about files that were skipped.

    Two files given explicitly for the same fold are an error; inside a directory the newest one wins.
    """
    by_fold: dict[int, list[tuple[bool, float, Path, dict[str, Any]]]] = {}
    for path in paths:
        if path.is_dir():
            files, explicit = sorted(path.rglob("results.json")), False
            if not files:
                raise FileNotFoundError(f"no results.json under {path} (run script/evaluate.sh first)")
        elif path.is_file():
            files, explicit = [path], True
        else:
            raise FileNotFoundError(f"not a results.json file or a run folder: {path}")
        for file in files:
            results = load_results(file)
            by_fold.setdefault(int(results["eval_fold"]), []).append(
                (explicit, file.stat().st_mtime, file, results)
            )
    chosen, notes = {}, []
    for fold, entries in sorted(by_fold.items()):
        explicit_files = [file for explicit, _, file, _ in entries if explicit]
        if len(explicit_files) > 1:
            raise ValueError(f"fold {fold}: several results.json given: {[str(f) for f in explicit_files]}")
        entries.sort(key=lambda entry: (entry[0], entry[1], str(entry[2])))
        chosen[fold] = entries[-1][3]
        notes += [f"fold {fold}: using {entries[-1][2]}, ignoring {entry[2]}" for entry in entries[:-1]]
    datasets = {results["dataset"] for results in chosen.values()}
    class_lists = {tuple(results["classes"]) for results in chosen.values()}
    if len(datasets) > 1 or len(class_lists) > 1:
        raise ValueError(f"results mix datasets or class lists: {sorted(datasets)}, {sorted(class_lists)}")
    return chosen, notes


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


def to_markdown(header: list[str], rows: list[list[Any]], title: str) -> str:
    """Per-fold rows and a ``mean ± std`` row, numbers with two decimals."""
    lines = [f"**{title}** (Dice %, mean ± std over {len(rows) - 2} fold(s))", ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|")
    for row in rows[:-2]:
        lines.append("| " + " | ".join([row[0]] + [f"{v:.2f}" for v in row[1:]]) + " |")
    mean, std = rows[-2][1:], rows[-1][1:]
    lines.append(
        "| **mean ± std** | "
        + " | ".join(f"{m:.2f} ± {s:.2f}" for m, s in zip(mean, std, strict=True))
        + " |"
    )
    return "\n".join(lines) + "\n"


def to_csv(header: list[str], rows: list[list[Any]]) -> str:
    """The same rows as CSV with full precision (``mean`` and ``std`` as separate rows)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow([row[0]] + [f"{v:.6f}" for v in row[1:]])
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "paths", nargs="+", type=Path, help="run folders (runs/<dataset>_setting<k>) or results.json"
    )
    parser.add_argument("--out-md", type=Path, help="write the Markdown table here")
    parser.add_argument("--out-csv", type=Path, help="write the CSV table here")
    args = parser.parse_args(argv)

    chosen, notes = collect(args.paths)
    for note in notes:
        print(note, file=sys.stderr)
    first = next(iter(chosen.values()))
    setting = first.get("config", {}).get("setting")
    title = f"{first['dataset']}" + (f", setting {setting}" if setting is not None else "")
    header, rows = summary_rows(chosen)
    markdown, table_csv = to_markdown(header, rows, title), to_csv(header, rows)
    out_md, out_csv = args.out_md, args.out_csv
    if out_md is None and out_csv is None and len(args.paths) == 1 and args.paths[0].is_dir():
        out_md, out_csv = args.paths[0] / "summary.md", args.paths[0] / "summary.csv"
    for target, text in ((out_md, markdown), (out_csv, table_csv)):
        if target is not None:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
    print(markdown, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
