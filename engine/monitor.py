"""The training loop's companions: the monitor (logged losses, validation, ``progress.png``) and the stop
requests (the first Ctrl-C, SIGTERM, and the scheduler's preemption warning).

:class:`Monitor` accumulates the loss terms on the device and synchronises only when it logs (every
``print_interval`` steps): the mean terms and the learning rate go to Sacred's ``metrics.json``, the log and
the progress bar. At each validation it records the label-free scores (``lf_auc``, ``lf_dice``:
:mod:`engine.label_free`) and the Dice per class and their mean (``val_dice_<CLASS>``, ``val_dice_mean``),
and redraws ``progress.png`` (:mod:`engine.progress`). Rank 0 writes; under torchrun the
other ranks only take part in the synchronisation, where the ranks also agree on a stop request.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from dataloaders import TestDataset
from engine.evaluation import validate
from engine.label_free import LabelFreeEpisodes, label_free_scores
from engine.progress import draw_progress, missing_matplotlib
from engine.runtime import DistributedContext

#: Environment variable naming submitit's warning signal (submitit 1.5 reads the same one; USR2 by default).
PREEMPT_SIGNAL_ENV = "SUBMITIT_PREEMPT_SIGNAL"


def preempt_signal() -> signal.Signals:
    """The warning signal SLURM sends (through submitit's ``--signal``) before a time limit or on
    preemption: ``$SUBMITIT_PREEMPT_SIGNAL`` (a name such as ``USR2``), SIGUSR2 by default."""
    name = os.environ.get(PREEMPT_SIGNAL_ENV, "USR2").upper().removeprefix("SIG")
    found = getattr(signal, f"SIG{name}", None)
    if not isinstance(found, signal.Signals) or found in (signal.SIGKILL, signal.SIGSTOP, signal.SIGINT):
        raise ValueError(
            f"{PREEMPT_SIGNAL_ENV}: expected the name of a catchable signal other than INT (e.g. USR2), "
            f"got {os.environ[PREEMPT_SIGNAL_ENV]!r}"
        )
    return found


class TrainingStopped(KeyboardInterrupt):
    """A graceful stop after the snapshot of ``step`` was written (or before the first step), asked for by
    ``signum``.

    A ``KeyboardInterrupt``, so that Sacred records the run as INTERRUPTED; ``__main__`` prints its one line
    instead of a traceback and ends the process by ``signum``.
    """

    def __init__(self, step: int, signum: int = signal.SIGINT) -> None:
        super().__init__(f"stopped at step {step}; continue with resume=True")
        self.signum = signal.Signals(signum)


class StopRequest:
    """Stop requests of the training loop: :attr:`requested` is set by the first of them, :attr:`signum`
    says which.

    SIGTERM (a scheduler's time limit, preemption or cancel, KillWait seconds before SIGKILL) and the
    preemption warning (:func:`preempt_signal`) ask for a stop; repeats are ignored, because SLURM signals
    every process of a job step while the job's own process forwards the same request: a repeated signal
    must not turn the snapshot into a kill. SIGINT (watched from :meth:`catch_interrupt` on): the first asks
    for a stop, a second one stops at once (the handler before ours runs).
    """

    def __init__(self, interrupt: bool = True) -> None:
        self.requested = False
        self.signum: signal.Signals | None = None
        self.previous: dict[signal.Signals, object] = {}
        for signum in (signal.SIGTERM, preempt_signal()):
            if signum not in self.previous:
                self.previous[signum] = signal.signal(signum, self._request)
        if interrupt:
            self.catch_interrupt()

    def catch_interrupt(self) -> None:
        """Watch SIGINT from now on (train.py does so at its loop; earlier, Ctrl-C stops at once)."""
        if signal.SIGINT not in self.previous:
            self.previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._request)

    def _request(self, signum, frame) -> None:
        if not self.requested:
            self.requested, self.signum = True, signal.Signals(signum)
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, self.previous[signal.SIGINT])

    def close(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}


class Monitor:
    """Logging and validation phases: loss sums on the device, learning rate, Sacred metrics, log lines,
    progress bar, validation and ``progress.png`` (rank 0 writes; the others only take part in the sync)."""

    def __init__(
        self,
        _run,
        _log,
        context: DistributedContext,
        device: torch.device,
        val_sets: Mapping[str, TestDataset] | None,
        label_free: LabelFreeEpisodes | None,
        picture: Path,
        title: str,
        bar_label: str,
        n_steps: int,
        start_step: int,
        loss_terms: tuple[str, ...],
    ) -> None:
        """``loss_terms``: the names of the method's logged loss terms (``total`` last); ``val_sets``: the
        validation's test sets by class name (None or empty: no organ validation on this
        rank); ``label_free``: the label-free validation's episodes (None: none on this rank);
        ``picture``: where ``progress.png`` goes, ``title`` its title; ``bar_label``: the progress bar's."""
        self.run, self.logger, self.context = _run, _log, context
        self.device, self.val_sets, self.label_free = device, val_sets, label_free
        self.main = context.is_main
        self.loss_terms = loss_terms
        # Loss sums, then one slot that counts the ranks asking to stop (summed over ranks when logging).
        self.running = torch.zeros(len(loss_terms) + 1, device=device)
        self.n_running = 0
        self.lr = float("nan")
        self.history: dict[str, dict[str, list]] = {}  # metrics.json's layout, for progress.png
        self.undrawn = False  # values recorded since progress.png was last drawn
        self.postfix: dict[str, str] = {}
        self.picture: Path | None = picture
        if self.main and (reason := missing_matplotlib()):
            _log.warning(
                f"no progress.png: {reason}; metrics.json holds every value it would show "
                "(script/plot_run.py draws it where matplotlib is installed)"
            )
            self.picture = None
        self.title = title
        self.progress = tqdm(
            total=n_steps, initial=start_step, desc=bar_label, dynamic_ncols=True, disable=not self.main
        )

    def add(self, losses: torch.Tensor, lr: float) -> None:
        """Accumulate one step's detached loss terms ``(len(loss_terms),)`` (no sync) and the learning rate
        it used."""
        self.running[:-1] += losses
        self.n_running += 1
        self.lr = lr
        self.progress.update(1)

    def _record(self, name: str, value: float, step: int) -> None:
        self.run.log_scalar(name, value, step)
        series = self.history.setdefault(name, {"steps": [], "values": []})
        series["steps"].append(step)
        series["values"].append(value)
        self.undrawn = True

    def log(self, step: int, stop_requested: bool) -> bool:
        """Log the mean loss terms since the last logging step (the one sync); returns whether any rank
        asked to stop."""
        if self.context.enabled:
            self.running[-1] = float(stop_requested)
            dist.all_reduce(self.running)
            self.running[:-1] /= self.context.world_size
        *means, n_stop = (self.running / self.n_running).tolist()
        self.running.zero_()
        self.n_running = 0
        if self.main:
            for name, value in zip(self.loss_terms, means, strict=True):
                self._record(name, value, step)
            self._record("lr", self.lr, step)
            self.postfix.update(
                {name: f"{value:.4f}" for name, value in zip(self.loss_terms, means, strict=True)}
            )
            self.progress.set_postfix(self.postfix)
            terms = ", ".join(
                f"{name} {value:.5f}" for name, value in zip(self.loss_terms, means, strict=True)
            )
            self.logger.info(f"step {step}: {terms}, lr {self.lr:.3g}")
        return n_stop > 0

    def validate(self, step: int, model: nn.Module, precision: str) -> None:
        """The label-free validation and the organ validation that this rank runs (rank 0; the model is the
        unwrapped one), then the picture."""
        if self.label_free is not None:
            start = time.perf_counter()
            scores = label_free_scores(model, self.label_free, self.device, precision)
            for name, value in scores.items():
                self._record(name, value, step)
            self.postfix["auc"] = f"{scores['lf_auc']:.3f}"
            self.logger.info(
                f"step {step} label-free validation ({len(self.label_free)} episodes of held-out volumes, "
                f"{time.perf_counter() - start:.1f} s): AUC {scores['lf_auc']:.3f}, "
                f"Dice {100 * scores['lf_dice']:.2f} %"
            )
        if self.val_sets:
            start = time.perf_counter()
            dice = validate(model, self.val_sets, self.device, precision)
            for name, value in dice.items():
                self._record(f"val_dice_{name}", value, step)
            self.postfix["val"] = f"{100 * dice['mean']:.1f}%"
            n_cases = len(next(iter(self.val_sets.values())))
            scores = ", ".join(f"{name} {100 * value:.2f} %" for name, value in dice.items())
            self.logger.info(
                f"step {step} validation ({n_cases} query volume(s), "
                f"{time.perf_counter() - start:.1f} s): {scores}"
            )
        self.progress.set_postfix(self.postfix)
        self.draw()

    def draw(self) -> None:
        """Rewrite ``progress.png`` (atomically) from what was logged so far, unless nothing was logged since
        the last drawing (a validation and a snapshot at the same step draw once)."""
        if self.main and self.picture is not None and self.undrawn:
            draw_progress(self.history, self.picture, self.title)
            self.undrawn = False

    def close(self) -> None:
        self.progress.close()
