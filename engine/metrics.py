"""Overlap metrics of the evaluation protocol (specification, section 5, step 5).

For a binary prediction ``P`` and ground truth ``G`` over the labelled slices of one query volume:

* Dice = 2·TP / (2·TP + FP + FN)
* IoU  = TP / (TP + FP + FN)

**Empty versus empty.** When both masks are empty (TP + FP + FN = 0) the two masks agree perfectly and
both metrics are defined as 1.0 (nnU-Net's ``compute_metrics`` also treats this case explicitly; it
returns NaN, we return 1.0 so that per-class means never need a NaN-aware reduction). An empty prediction
against a non-empty ground truth (or the reverse) gives 0.0. In the protocol the ground truth of a query
volume is never empty (only slices holding the class are evaluated), so the case only arises for
per-slice use.
"""

from __future__ import annotations

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor


def _as_bool_array(mask: ArrayLike, name: str) -> np.ndarray:
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    if mask.dtype != np.bool_:
        values = np.unique(mask)
        if not np.isin(values, (0, 1)).all():
            raise ValueError(f"{name}: expected a binary mask (0/1 or bool), found values {values[:10]}")
        mask = mask.astype(bool)
    return mask


def confusion_counts(pred: ArrayLike, gt: ArrayLike) -> tuple[int, int, int]:
    """True positives, false positives and false negatives of two binary masks of the same shape.

    Shape: ``pred`` and ``gt`` any identical shape (e.g. ``(Z, H, W)``), values in {0, 1} or bool.
    """
    pred_b = _as_bool_array(pred, "pred")
    gt_b = _as_bool_array(gt, "gt")
    if pred_b.shape != gt_b.shape:
        raise ValueError(f"pred and gt must have the same shape, found {pred_b.shape} and {gt_b.shape}")
    tp = int(np.count_nonzero(pred_b & gt_b))
    fp = int(np.count_nonzero(pred_b & ~gt_b))
    fn = int(np.count_nonzero(~pred_b & gt_b))
    return tp, fp, fn


def dice_iou(pred: ArrayLike, gt: ArrayLike) -> tuple[float, float]:
    """Dice and IoU of two binary masks; both are 1.0 when both masks are empty (see module docstring)."""
    tp, fp, fn = confusion_counts(pred, gt)
    if tp + fp + fn == 0:
        return 1.0, 1.0
    return 2.0 * tp / (2.0 * tp + fp + fn), tp / (tp + fp + fn)
