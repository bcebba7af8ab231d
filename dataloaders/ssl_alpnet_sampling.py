"""SSL-ALPNet's episode law (``SuperpixelDataset.__getitem__`` of its ``GenericSuperDatasetv2``), computed
exactly over the slices of the training volumes, for :class:`~dataloaders.train_dataset.TrainDataset` with
``sampling='ssl_alpnet'``.

The official loader lists the ``N`` slices of the loaded scans in load order (scans by case id, slices by
index) and, for a DataLoader index ``u``:

1. a slice whose largest pseudo-label id is below 1 passes to index ``u + 1`` (taken modulo ``N``), until a
   slice with an id is reached: slice ``f(u)``;
2. Setting 2: if ``f(u)`` holds an excluded class (its ground-truth slice index, ``classmap_1.json``), a new
   index is drawn uniformly in ``0 .. N - 2`` (``torch.randint(0, len - 1)``: high exclusive) and the two
   steps start again;
3. the id is ``randint(1, max_id)``, uniform in ``1 .. max_id - 1``: the largest id is never drawn, and an
   id in the notebook's gap (``data/superpixels/``) gives an empty mask; both are kept.

The index ``u`` is taken uniform in ``0 .. N - 1`` (the official one, under ``shuffle=True``, is uniform in
``0 .. fix_length - 1`` modulo ``N``, the same law when ``N`` divides its ``fix_length``: 1000 for CHAOST2,
``N`` itself for SABS). :func:`slice_law` gives the resulting probability of each slice in closed form, so
that a draw is one ``rng.choice``; the rejection loop of step 2 is summed, not run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class SliceVolume:
    """One training volume for the SSL-ALPNet sampler: ``image (Z, h, w)`` float32 normalised, ``ids (Z, h,
    w)`` int32 pseudo-label ids at the working size, ``max_ids (Z,)`` the largest id of each stored slice
    (before any resize, as the official reads them), ``allowed (Z,)`` the slices left by Setting 2;
    ``source`` the pseudo-label file."""

    case_id: int
    source: Path
    image: np.ndarray
    ids: np.ndarray
    max_ids: np.ndarray
    allowed: np.ndarray


def next_with_id(max_ids: np.ndarray) -> np.ndarray:
    """Step 1: ``f(u)`` for every ``u`` in ``0 .. N - 1``, the first slice at or after ``u`` (cyclically)
    whose largest id is at least 1. ``ValueError`` when no slice has one."""
    holding = np.flatnonzero(np.asarray(max_ids) >= 1)
    if len(holding) == 0:
        raise ValueError("ssl_alpnet sampling: no slice of the training volumes holds a pseudo-label id >= 1")
    position = np.searchsorted(holding, np.arange(len(max_ids)), side="left")
    return holding[position % len(holding)]


def slice_law(max_ids: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """``(N,)`` float64 probability that an episode uses each slice (steps 1 and 2 of the module docstring).

    ``max_ids (N,)`` and ``allowed (N,)`` bool over the slices in load order. With ``a`` the law of ``f(u)``
    for ``u`` uniform in ``0 .. N - 1`` and ``b`` for ``u`` uniform in ``0 .. N - 2``, ``P(s) = a(s)`` on
    allowed slices accepted at once, plus ``P(first rejected) * b(s) / b(allowed)``. ``ValueError`` when the
    official loop would never end (no allowed slice reachable by a redraw).
    """
    n = len(max_ids)
    allowed = np.asarray(allowed, dtype=bool)
    f = next_with_id(max_ids)
    first = np.bincount(f, minlength=n) / n
    redraw = np.bincount(f[: n - 1], minlength=n) / max(n - 1, 1)
    rejected = first[~allowed].sum()
    redraw_ok = (redraw * allowed).sum()
    if redraw_ok == 0 and (rejected > 0 or not (first * allowed).any()):
        raise ValueError(
            "ssl_alpnet sampling: every slice with a pseudo-label that a redraw can reach holds an excluded "
            "class (Setting 2): the official sampler would loop forever"
        )
    law = first * allowed
    if rejected > 0:
        law = law + rejected * redraw * allowed / redraw_ok
    return law / law.sum()
