"""``progress.png``, the picture of a training run, drawn from Sacred-style metrics.

One function, :func:`draw_progress`, serves ``train.py`` (which redraws the picture from the metrics it
logged so far at every validation and every snapshot) and ``script/plot_run.py`` (which redraws it from the
``metrics.json`` of a finished or running run). Metrics have the layout of Sacred's ``metrics.json``:
``{name: {"steps": [...], "values": [...], ...}}`` with the names ``train.py`` logs: ``lr``,
``val_dice_<CLASS>`` and ``val_dice_mean`` (fractions), the label-free scores ``lf_auc`` and ``lf_dice``
(:data:`LABEL_FREE_METRICS`, :mod:`engine.label_free`), and the loss terms (every other series; ``total``
is drawn thicker). No torch here, so that ``script/plot_run.py`` starts quickly.

Four panels against the training step: the four loss terms and their total (raw, thin, and smoothed by a
bias-corrected exponential moving average), the learning rate (log scale), the label-free validation (AUC
and thresholded Dice on the held-out volumes; chance AUC 0.5 marked), and the organ validation Dice per
class and their mean (in %). matplotlib's Agg canvas is used directly (no pyplot, no display, no global
state); the file is written through :func:`utils.write_atomically`, so a reader never sees a half-written
picture. matplotlib is imported only when drawing: a GPU host without it still trains
(train.py warns that it draws no picture, :func:`missing_matplotlib`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from utils import write_atomically

Metrics = dict[str, dict[str, list]]
VAL_PREFIX = "val_dice_"
#: The label-free validation's scores (fractions): the AUC of p_fg, the Dice of p_fg > 0.5.
LABEL_FREE_METRICS = ("lf_auc", "lf_dice")
#: Their column names in the tables (``plot_run.py --table``, ``summarize.py``).
LABEL_FREE_COLUMNS = dict(zip(LABEL_FREE_METRICS, ("lf AUC", "lf Dice"), strict=True))


def missing_matplotlib() -> str | None:
    """None when matplotlib can be imported, else why not."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        return f"matplotlib is not installed ({err})"
    return None


def read_metrics(run_dir: str | os.PathLike) -> Metrics:
    """The series of ``<run_dir>/metrics.json``, checked; errors name the file (and the series)."""
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"no metrics.json in {Path(run_dir)}: expected a Sacred training run folder "
            "(<log_dir>/<exp_str>/fold<k>/train/<id>/) that has logged at least one step"
        )
    try:
        metrics = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); if the run is writing it, try again") from err
    if not isinstance(metrics, dict):
        raise ValueError(f"{path}: expected an object of series, found a {type(metrics).__name__}")
    for name, series in metrics.items():
        ok = (
            isinstance(series, dict)
            and isinstance(series.get("steps"), list)
            and isinstance(series.get("values"), list)
            and len(series["steps"]) == len(series["values"])
        )
        if not ok:
            raise ValueError(f"{path}: series {name!r} needs 'steps' and 'values' lists of the same length")
    return metrics


def merge_metrics(runs: Sequence[Metrics]) -> Metrics:
    """Series of several runs (e.g. a run and its resumption) in order; a later run's value wins a step."""
    merged: dict[str, dict[int, float]] = {}
    for metrics in runs:
        for name, series in metrics.items():
            merged.setdefault(name, {}).update(zip(series["steps"], series["values"], strict=True))
    return {
        name: {"steps": sorted(points), "values": [points[step] for step in sorted(points)]}
        for name, points in merged.items()
    }


def validation_table(metrics: Metrics) -> str:
    """Plain-text table of the validation curves: one row per validated step, the label-free AUC and Dice
    (when logged) first, then the Dice in % per class and their mean, and the smoothed total loss logged at
    or before that step. Empty string without validation."""
    organs = sorted(name for name in metrics if name.startswith(VAL_PREFIX) and name != f"{VAL_PREFIX}mean")
    label_free = [name for name in LABEL_FREE_METRICS if metrics.get(name, {}).get("steps")]
    if not organs and not label_free:
        return ""
    columns = [*label_free, *organs] + ([f"{VAL_PREFIX}mean"] if f"{VAL_PREFIX}mean" in metrics else [])
    points = {n: dict(zip(metrics[n]["steps"], metrics[n]["values"], strict=True)) for n in columns}
    total = metrics.get("total", {"steps": [], "values": []})
    smoothed = list(zip(total["steps"], smooth(total["values"]), strict=True))
    header = ["step", *(LABEL_FREE_COLUMNS.get(name, name[len(VAL_PREFIX) :]) for name in columns), "loss"]
    lines = ["  ".join(f"{h:>8}" for h in header)]
    for step in sorted(set().union(*points.values())):
        cells = [f"{step:>8}"]
        for name in columns:
            value = points[name].get(step)
            if value is None:
                cells.append(f"{'-':>8}")
            else:
                cells.append(f"{value:8.3f}" if name == "lf_auc" else f"{100 * value:8.1f}")
        before = [value for at, value in smoothed if at <= step]
        cells.append(f"{before[-1]:8.3f}" if before else f"{'-':>8}")
        lines.append("  ".join(cells))
    return "\n".join(lines)


def label_free_summary(metrics: Metrics) -> str:
    """One line on the label-free curve: its AUC at the first and the last validation, the highest, and the
    thresholded Dice at both ends. Empty string without label-free validation."""
    auc, dice = (metrics.get(name, {}) for name in LABEL_FREE_METRICS)
    if not auc.get("steps"):
        return ""
    steps, values = auc["steps"], auc["values"]
    best = max(range(len(values)), key=values.__getitem__)
    line = (
        f"label-free AUC on the held-out volumes (no label read; chance 0.5): {values[0]:.3f} at step "
        f"{steps[0]}, {values[-1]:.3f} at step {steps[-1]} (highest {values[best]:.3f} at step {steps[best]})"
    )
    if dice.get("values"):
        line += f"; Dice of p_fg > 0.5: {100 * dice['values'][0]:.1f} % -> {100 * dice['values'][-1]:.1f} %"
    return line


def smooth(values: Sequence[float], weight: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average (TensorBoard's smoothing); ``weight`` in [0, 1)."""
    out, average = [], 0.0
    for count, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**count))
    return out


#: What an empty validation panel says: nothing validated at all, or only the other kind of validation.
NO_VALIDATION = "no validation (validate_every=0)"
NO_ORGAN_VALIDATION = "no organ validation (validate_cases=0):\nthe organ Dice comes from test.py"
NO_LABEL_FREE_VALIDATION = "no label-free validation (label_free_episodes=0)"


def _say(axes, message: str) -> None:
    """Write ``message`` in the middle of an empty panel."""
    axes.text(0.5, 0.5, message, ha="center", va="center", transform=axes.transAxes)


def draw_progress(metrics: Metrics, path: str | os.PathLike, title: str = "") -> Path:
    """Draw the four panels (see the module docstring) of ``metrics`` into the PNG ``path``, atomically.

    A metrics dict with neither a loss term nor a validation Dice is a ``ValueError`` (nothing to draw).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    terms = sorted(
        (
            name
            for name in metrics
            if name != "lr"
            and not name.startswith(VAL_PREFIX)
            and name not in LABEL_FREE_METRICS
            and metrics[name]["steps"]
        ),
        key=lambda name: (name == "total", name),
    )
    organs = sorted(name for name in metrics if name.startswith(VAL_PREFIX) and name != f"{VAL_PREFIX}mean")
    label_free = [name for name in LABEL_FREE_METRICS if metrics.get(name, {}).get("steps")]
    if not terms and not organs and not label_free:
        raise ValueError(
            f"no loss terms and no validation Dice to draw: the metrics hold only {sorted(metrics)}"
        )
    figure = Figure(figsize=(9, 13), layout="constrained")
    FigureCanvasAgg(figure)
    losses, rate, unlabelled, dice = figure.subplots(4, 1, sharex=True)
    colours = {name: f"C{i}" for i, name in enumerate(terms)}
    for name in terms:
        steps, values = metrics[name]["steps"], metrics[name]["values"]
        width = 2.0 if name == "total" else 1.2
        losses.plot(steps, values, color=colours[name], alpha=0.25, linewidth=0.8)
        losses.plot(steps, smooth(values), color=colours[name], linewidth=width, label=name)
    losses.set_ylabel("loss (thin: raw)")
    if terms:
        losses.legend(loc="upper right", fontsize="small")
    else:  # a validation ran before the first logging step (print_interval)
        _say(losses, "no loss logged yet")
    losses.grid(alpha=0.3)

    if metrics.get("lr", {}).get("steps"):
        # The rate logged at a step is the one that step used: it holds since the previous logged step.
        rate.plot(metrics["lr"]["steps"], metrics["lr"]["values"], color="k", drawstyle="steps-pre")
        rate.set_yscale("log")
    else:
        _say(rate, "no learning rate logged")
    rate.set_ylabel("learning rate")
    rate.grid(alpha=0.3)

    styles = {"lf_auc": ("o-", "C0", "AUC of p_fg"), "lf_dice": ("s-", "C3", "Dice of p_fg > 0.5")}
    for name in label_free:
        marker, colour, label = styles[name]
        unlabelled.plot(
            metrics[name]["steps"], metrics[name]["values"], marker, color=colour, markersize=3, label=label
        )
    if label_free:
        unlabelled.axhline(0.5, color="grey", linestyle=":", linewidth=1, label="chance AUC")
        unlabelled.legend(loc="upper left", fontsize="small")
        unlabelled.set_ylim(-0.02, 1.02)
    else:
        _say(unlabelled, NO_LABEL_FREE_VALIDATION if organs else NO_VALIDATION)
    unlabelled.set_ylabel("label-free (held-out volumes)")
    unlabelled.grid(alpha=0.3)

    for i, name in enumerate(organs):
        series, organ = metrics[name], name[len(VAL_PREFIX) :]
        percent = [100 * v for v in series["values"]]
        dice.plot(series["steps"], percent, "o-", color=f"C{i}", markersize=3, label=organ)
    if f"{VAL_PREFIX}mean" in metrics:
        series = metrics[f"{VAL_PREFIX}mean"]
        dice.plot(series["steps"], [100 * v for v in series["values"]], "s--", color="k", label="mean")
    if organs:
        dice.legend(loc="upper left", fontsize="small")
        dice.set_ylim(-2, 102)
    else:
        _say(dice, NO_ORGAN_VALIDATION if label_free else NO_VALIDATION)
    dice.set_ylabel("validation Dice % (test volumes)")
    dice.set_xlabel("training step")
    dice.grid(alpha=0.3)
    if title:
        figure.suptitle(title)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomically(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100), what="picture")
