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

The report of a grid (``python script/summarize.py runs``: a folder whose ``[<method>_]<dataset>_setting<k>/``
subfolders hold the folds, as ``script/launch.py`` leaves them; or one such subfolder with
``--reference``): per dataset and setting, one row per method of the grid (Dice per organ and their mean
as mean ± std over its folds), beneath it that method's values in a reference CSV (default
``docs/reference/published_fsmis.csv``: the published numbers found, with their sources and confidence
tags; any other with ``--reference``; an empty reference cell shows "–" and no difference) and the
difference; then the protocol of the grid's runs, each reference value's source and protocol where the
source says so, and each method's per-fold table above. Written to ``<dir>/report.md``, ``report.csv``
(one row per method, class and reference, with every fold's value) and ``report.png`` (a bar per organ
and method at the folds' mean, a dot per fold, the reference as a horizontal mark). ``--plugin FILE``
imports a method of one's own, so that the report knows its title (the name published tables use).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from engine.summary import build_table, to_csv, to_markdown
from launcher.report import DEFAULT_REFERENCE, REFERENCE_COLUMNS, grid_report, run_roots
from models.methods import load_plugins
from utils import run_cli, write_atomically


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
    parser.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="FILE",
        help="report: a .py file or module registering a method of your own (its title names its rows)",
    )
    args = parser.parse_args(argv)
    load_plugins(args.plugin)

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
    run_cli(main, "summarize.py")
