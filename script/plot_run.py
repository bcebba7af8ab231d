"""Redraw ``progress.png`` of a training run from its Sacred ``metrics.json`` (finished or still running).

Examples::

    python script/plot_run.py runs/CHAOST2_setting1/fold0/train/1
    python script/plot_run.py runs/CHAOST2_setting1/fold0/train/1 runs/CHAOST2_setting1/fold0/train/2
    python script/plot_run.py runs/CHAOST2_setting1/fold0/train/1 --out /tmp/fold0.png
    python script/plot_run.py runs/CHAOST2_setting1/fold0/train/1 --table     # and print the validation curve
    python script/plot_run.py RUN --require LIVER=60     # exit status 1 unless LIVER's last Dice >= 60 %

The picture (:func:`progress.draw_progress`, the function ``train.py`` uses during training): the four loss
terms and their total (raw and smoothed), the learning rate and the validation Dice per class and their
mean, against the training step. Several run folders (a run and its resumptions, in order, as in the second
example) are drawn as one curve; the picture goes to ``<last run folder>/progress.png`` unless ``--out``
says otherwise. A missing or unreadable ``metrics.json`` is an error naming the file (exit status 2).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from engine.progress import (
    VAL_PREFIX,
    draw_progress,
    label_free_summary,
    merge_metrics,
    read_metrics,
    validation_table,
)
from utils import run_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("runs", nargs="+", type=Path, help="Sacred training run folder(s) fold<k>/train/<id>")
    parser.add_argument("--out", type=Path, help="PNG to write (default: <last run folder>/progress.png)")
    parser.add_argument(
        "--table", action="store_true", help="also print the validation curve (Dice %% per class and step)"
    )
    parser.add_argument(
        "--require",
        action="append",
        default=[],
        metavar="CLASS=PERCENT",
        help="exit with status 1 unless the last validation Dice of CLASS reaches PERCENT (repeatable)",
    )
    args = parser.parse_args(argv)
    try:
        metrics = merge_metrics([read_metrics(run) for run in args.runs])
        title = " + ".join(str(run) for run in args.runs)
        path = draw_progress(metrics, args.out or args.runs[-1] / "progress.png", title)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    if args.table:
        print(validation_table(metrics) or "no validation in these runs (validate_every=0)")
        if summary := label_free_summary(metrics):
            print(summary)
    print(path)
    failed = False
    for requirement in args.require:
        name, _, percent = requirement.partition("=")
        series = metrics.get(f"{VAL_PREFIX}{name}")
        try:
            goal = float(percent)
        except ValueError:
            parser.error(f"--require {requirement!r}: expected CLASS=PERCENT, e.g. LIVER=60")
        if not series or not series["values"]:
            parser.error(f"--require {requirement!r}: no validation Dice of {name!r} in these runs")
        last = 100 * series["values"][-1]
        verdict = "reached" if last >= goal else "FAILED: below"
        step = series["steps"][-1]
        print(f"{name}: last validation Dice {last:.1f} % at step {step}; {verdict} {goal:g} %")
        failed |= last < goal
    return 1 if failed else 0


if __name__ == "__main__":
    run_cli(main, "plot_run.py")
