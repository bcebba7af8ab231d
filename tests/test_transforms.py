"""Per-volume normalisation and slice resizing (method.md §1)."""

from __future__ import annotations

import numpy as np
import pytest

from dataloaders import (
    normalize_volume,
    resize_slices,
)


def test_normalize_and_resize() -> None:
    volume = np.random.default_rng(0).normal(300.0, 40.0, size=(3, 10, 12))
    normed = normalize_volume(volume)
    assert normed.dtype == np.float32
    assert abs(float(normed.mean())) < 1e-5 and abs(float(normed.std()) - 1) < 1e-5
    with pytest.raises(ValueError, match="constant"):
        normalize_volume(np.ones((2, 3, 3)))
    mask = np.zeros((2, 10, 10), dtype=np.uint16)
    mask[:, 2:8, 2:8] = 7
    small = resize_slices(mask, 5, nearest=True)
    assert small.shape == (2, 5, 5) and set(np.unique(small)) == {0, 7}
    assert resize_slices(volume.astype(np.float32), 6, nearest=False).shape == (3, 6, 6)
    # more slices than one OpenCV call takes channels: every slice resized like on its own
    many = np.random.default_rng(1).random((300, 9, 7)).astype(np.float32)
    resized = resize_slices(many, 5, nearest=False)
    np.testing.assert_allclose(
        resized[[0, 150, 299]], resize_slices(many[[0, 150, 299]], 5, nearest=False), atol=1e-6
    )
