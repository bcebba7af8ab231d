"""Evaluation protocol of method.md §5, one code path for ``test.py`` and the validation during training:
batched prediction of a query volume, scoring per class (:func:`evaluate_class`), the validation wrapper
(:func:`validate`) and the saved outputs of ``test.py`` (NIfTI prediction with the query's geometry, PNG
overlay).

Prediction of one query volume: its labelled slices are split into ``n_part`` chunks; chunk ``k`` is
predicted with support slice ``k`` in ONE forward pass holding all the chunk's slices as queries
(``Q = end - start``; the model treats the queries independently). The ``[bg, fg]`` probabilities are
upsampled bilinearly to the native ``H x W`` when the model ran at another size, then the argmax is taken.
With ``precision='bf16'`` the forward runs under bfloat16 autocast (:mod:`engine.runtime`); the
probabilities are cast to float32 before the upsampling and the argmax.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dataloaders import Geometry, TestDataset, write_volume
from engine.metrics import dice_iou
from engine.overlays import render_overlay, write_png
from engine.runtime import autocast
from utils import capture_rng_state, restore_rng_state

#: Called by :func:`evaluate_class` after each scored query volume: ``(query, pred, dice, iou)``, with
#: ``query`` a ``TestDataset`` item and ``pred`` its ``(Zc, H, W)`` int64 prediction.
QueryCallback = Callable[[dict[str, Any], torch.Tensor, float, float], None]

#: Overlay colours (BGR, as OpenCV writes them): ground truth green, prediction red.
GT_COLOUR = (0, 255, 0)
PRED_COLOUR = (0, 0, 255)


@torch.inference_mode()
def predict_query_volume(
    model: nn.Module,
    support: dict[str, torch.Tensor],
    query: dict[str, object],
    device: torch.device,
    precision: str = "fp32",
) -> torch.Tensor:
    """Binary prediction of a query volume's labelled slices (method.md §5, steps 3-4).

    Args:
        support: ``imgs (n_part, 3, h, w)`` and ``masks (n_part, h, w)`` (``TestDataset.support()``).
        query: ``imgs (Zc, 3, h, w)``, ``labels (Zc, H, W)``, ``chunks`` and ``chunk_support``
            (``TestDataset[i]``).
        precision: ``'fp32'`` or ``'bf16'`` (autocast of the forward on ``device``'s type).

    Returns:
        ``(Zc, H, W)`` int64 {0, 1} on the CPU, at the labels' (native) resolution.
    """
    imgs = query["imgs"]
    native_hw = tuple(query["labels"].shape[-2:])
    pred = torch.zeros((imgs.shape[0], *native_hw), dtype=torch.int64)
    for (start, end), k in zip(query["chunks"], query["chunk_support"], strict=True):
        if end <= start:
            continue
        supp_imgs = support["imgs"][k : k + 1].unsqueeze(0).to(device)  # (1, 1, 3, h, w)
        supp_masks = support["masks"][k : k + 1].unsqueeze(0).to(device)  # (1, 1, h, w)
        qry_imgs = imgs[start:end].unsqueeze(0).to(device)  # (1, Q, 3, h, w)
        with autocast(device, precision):
            probs = model(supp_imgs, supp_masks, qry_imgs).query_probs[0].float()  # (Q, 2, h, w)
        if tuple(probs.shape[-2:]) != native_hw:
            probs = F.interpolate(probs, size=native_hw, mode="bilinear", align_corners=False)
        pred[start:end] = probs.argmax(dim=1).cpu()
    return pred


def evaluate_class(
    model: nn.Module,
    test_set: TestDataset,
    device: torch.device,
    precision: str = "fp32",
    on_query: QueryCallback | None = None,
) -> dict[str, Any]:
    """method.md §5 for one class: predict every query volume of ``test_set`` and score it.

    ``model`` must already be in eval mode. Query volumes without the class are skipped (listed under
    ``skipped``); a class that no query volume holds is a ``ValueError`` (``check_fold_classes`` finds it
    earlier). Returns ``label``, ``support_case``, ``support_slices``, ``dice`` and ``iou`` (per query case
    id, as strings), ``skipped``, ``mean_dice`` and ``mean_iou``.
    """
    support = test_set.support()
    entry: dict[str, Any] = {
        "label": test_set.test_label,
        "support_case": support["case_id"],
        "support_slices": support["slice_indices"].tolist(),
        "dice": {},
        "iou": {},
        "skipped": [],
    }
    for query in test_set:
        if query["labels"].shape[0] == 0:
            entry["skipped"].append(query["case_id"])
            continue
        pred = predict_query_volume(model, support, query, device, precision)
        dice, iou = dice_iou(pred.numpy(), query["labels"].numpy())
        entry["dice"][str(query["case_id"])] = dice
        entry["iou"][str(query["case_id"])] = iou
        if on_query is not None:
            on_query(query, pred, dice, iou)
    if not entry["dice"]:
        name = test_set.info.class_name(test_set.test_label)
        raise ValueError(f"{name}: none of the query volumes {entry['skipped']} contains the class")
    entry["mean_dice"] = sum(entry["dice"].values()) / len(entry["dice"])
    entry["mean_iou"] = sum(entry["iou"].values()) / len(entry["iou"])
    return entry


@contextlib.contextmanager
def monitoring(model: nn.Module) -> Iterator[None]:
    """Eval mode inside the block, the previous mode after it; the global RNG states (Python, NumPy, torch,
    CUDA) saved before and restored after, so that forward passes that may draw
    (``region_sampling='random'``) leave a training run's trajectory exactly as it would be without them."""
    was_training = model.training
    rng = capture_rng_state()
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
        restore_rng_state(rng)


def validate(
    model: nn.Module, test_sets: Mapping[str, TestDataset], device: torch.device, precision: str = "fp32"
) -> dict[str, float]:
    """Mean Dice per class name, and their ``'mean'``, by :func:`evaluate_class` (validation in training),
    under :func:`monitoring`."""
    with monitoring(model):
        dice = {
            name: evaluate_class(model, ts, device, precision)["mean_dice"] for name, ts in test_sets.items()
        }
    dice["mean"] = sum(dice.values()) / len(dice)
    return dice


def save_prediction_nifti(
    pred: torch.Tensor | np.ndarray,
    slice_indices: torch.Tensor | np.ndarray,
    native_shape: tuple[int, int, int],
    geometry: Geometry,
    path: str | os.PathLike,
) -> Path:
    """Write a ``(Z, H, W)`` uint8 volume: the ``(Zc, H, W)`` prediction at ``slice_indices``, 0 elsewhere,
    with the query volume's spacing, origin and direction."""
    pred = np.asarray(pred, dtype=np.uint8)
    slice_indices = np.asarray(slice_indices, dtype=np.int64)
    if pred.shape != (len(slice_indices), *native_shape[1:]):
        raise ValueError(
            f"prediction shape {pred.shape} does not match {len(slice_indices)} slices of {native_shape[1:]}"
        )
    volume = np.zeros(native_shape, dtype=np.uint8)
    volume[slice_indices] = pred
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_volume(volume, geometry, path)
    return path


def save_overlay(
    image: np.ndarray, gt: np.ndarray, pred: np.ndarray, path: str | os.PathLike, scale: int = 2
) -> Path:
    """PNG of one slice: the image in grey (1st-99th percentile window), the ground-truth outline in green
    and the prediction outline in red, ``scale`` times larger. Shapes: ``image``, ``gt``, ``pred``
    ``(H, W)``."""
    if not image.shape == gt.shape == pred.shape or image.ndim != 2:
        raise ValueError(
            f"save_overlay: expected three (H, W) arrays, got {image.shape}, {gt.shape}, {pred.shape}"
        )
    size = (image.shape[1] * scale, image.shape[0] * scale)
    picture = render_overlay(image, [(gt, GT_COLOUR), (pred, PRED_COLOUR)], size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_png(picture, path)
