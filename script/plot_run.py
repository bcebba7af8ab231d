"""Redraw ``progress.png`` of a training run from its Sacred ``metrics.json`` (finished or still running).

Examples::

    python script/plot_run.py runs/CHAOST2_setting1/fold0/train/1
    python script/plot_run.py runs/CHAOST2_setting1/fold0/train/1 runs/CHAOST2_setting1/fold0/train/2
    python script/plot_run.py runs/CHAOST2_setting1/fold0/train/1 --out /tmp/fold0.png
    python script/plot_run.py runs/CHAOST2_setting1/fold0/train/1 --table     # and print the validation curve

The picture (:func:`progress.draw_progress`, the function ``train.py`` uses during training): the four loss
terms and their total (raw and smoothed), the learning rate and the validation Dice per class and their
mean, against the training step. Several run folders (a run and its resumptions, in order, as in the second
example) are drawn as one curve; the picture goes to ``<last run folder>/progress.png`` unless ``--out``
says otherwise. A missing or unreadable ``metrics.json`` is an error naming the file (exit status 2).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from progress import draw_progress, merge_metrics, read_metrics, validation_table  # noqa: E402 (after the path set-up)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("runs", nargs="+", type=Path, help="Sacred training run folder(s) fold<k>/train/<id>")
    parser.add_argument("--out", type=Path, help="PNG to write (default: <last run folder>/progress.png)")
    parser.add_argument(
        "--table", action="store_true", help="also print the validation curve (Dice %% per class and step)"
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
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
