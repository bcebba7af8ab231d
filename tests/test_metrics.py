"""Overlap metrics of the evaluation protocol (method.md §5, step 5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.metrics import confusion_counts, dice_iou


class TestMetrics:
    def test_known_values(self):
        pred = np.zeros((2, 4, 4), dtype=np.uint8)
        gt = np.zeros((2, 4, 4), dtype=np.uint8)
        pred[0, :2, :2] = 1  # 4 pixels
        gt[0, :2, :] = 1  # 8 pixels, 4 shared
        assert confusion_counts(pred, gt) == (4, 0, 4)
        dice, iou = dice_iou(pred, gt)
        assert dice == pytest.approx(2 * 4 / (2 * 4 + 0 + 4))
        assert iou == pytest.approx(4 / 8)

    def test_empty_vs_empty_is_one(self):
        empty = np.zeros((3, 5, 5), dtype=bool)
        assert dice_iou(empty, empty) == (1.0, 1.0)

    def test_empty_prediction_vs_nonempty_is_zero(self):
        gt = np.zeros((5, 5), dtype=np.uint8)
        gt[2, 2] = 1
        assert dice_iou(np.zeros_like(gt), gt) == (0.0, 0.0)
        assert dice_iou(gt, np.zeros_like(gt)) == (0.0, 0.0)

    def test_tensor_input(self):
        mask = torch.tensor([[0, 1], [1, 1]])
        assert dice_iou(mask, mask) == (1.0, 1.0)

    def test_bad_input(self):
        with pytest.raises(ValueError, match="same shape"):
            dice_iou(np.zeros((2, 2)), np.zeros((2, 3)))
        with pytest.raises(ValueError, match="binary"):
            dice_iou(np.full((2, 2), 2), np.zeros((2, 2)))
