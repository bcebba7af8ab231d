"""Episode augmentation: random parameters drawn apart from their application (method.md §3, step 6)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from dataloaders import (
    apply_gamma,
    apply_geometry,
    identity_gamma,
    identity_geometry,
    sample_gamma,
    sample_geometry,
)
from dataloaders.augment import GeometryParams, affine_matrices


def test_identity_parameters_change_nothing() -> None:
    rng = np.random.default_rng(1)
    image = rng.normal(size=(2, 33, 40)).astype(np.float32)
    mask = (rng.random((2, 33, 40)) > 0.7).astype(np.float32)
    np.testing.assert_array_equal(apply_gamma(image, identity_gamma()), image)
    warped, warped_mask = apply_geometry(image, mask, identity_geometry(image.shape))
    np.testing.assert_array_equal(warped, image)
    np.testing.assert_array_equal(warped_mask, mask)


def test_random_parameters_in_range_and_reproducible() -> None:
    params = sample_geometry(np.random.default_rng(5), (3, 32, 32))
    again = sample_geometry(np.random.default_rng(5), (3, 32, 32))
    for field in dataclasses.fields(GeometryParams):
        np.testing.assert_array_equal(getattr(params, field.name), getattr(again, field.name))
    assert np.all(np.abs(params.rotation_deg) <= 5) and np.all(np.abs(params.shear_deg) <= 5)
    assert np.all(np.abs(params.translation) <= 5) and np.all((params.zoom >= 0.9) & (params.zoom <= 1.2))
    assert params.displacement.shape == (3, 2, 32, 32)
    assert sample_geometry(np.random.default_rng(0), (70, 16, 16)).displacement.shape == (70, 2, 16, 16)
    # smoothed U(-1,1) noise times alpha=10 stays well inside +-10 px and is not constant
    assert 0 < np.abs(params.displacement).max() < 10
    gammas = [sample_gamma(np.random.default_rng(s)).gamma for s in range(50)]
    assert min(gammas) >= 0.5 and max(gammas) <= 1.5 and np.std(gammas) > 0.1


def test_gamma_formula_keeps_range_and_order() -> None:
    image = np.linspace(-2.0, 3.0, 60, dtype=np.float32).reshape(1, 6, 10)
    out = apply_gamma(image, sample_gamma(np.random.default_rng(3)))
    g = sample_gamma(np.random.default_rng(3)).gamma
    value_range = 5.0 + 1e-5
    expected = value_range * ((image + 2.0 + 1e-5) / value_range) ** g - 2.0
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert np.all(np.diff(out.ravel()) > 0)


def test_image_and_mask_stay_aligned_under_random_transform() -> None:
    rng = np.random.default_rng(7)
    mask = np.zeros((3, 64, 64), dtype=np.float32)
    mask[:, 20:44, 16:40] = 1
    mask[1, 5:12, 50:60] = 1
    k = 37.0
    params = sample_geometry(rng, mask.shape)
    warped_image, warped_mask = apply_geometry(mask * k, mask, params)
    assert set(np.unique(warped_mask)) == {0.0, 1.0}
    assert not np.array_equal(warped_mask, mask)  # the transform did something
    agree = (warped_image / k > 0.5) == (warped_mask > 0.5)
    assert agree.mean() > 0.999
    # the forward affine moves the mask centre where the matrix says (elastic shifts are small on average)
    ys, xs = np.nonzero(warped_mask[0])
    centre = affine_matrices(params)[0] @ np.array([27.5, 31.5, 1.0])
    assert abs(xs.mean() - centre[0]) < 2.0 and abs(ys.mean() - centre[1]) < 2.0


def test_geometry_rejects_mismatched_shapes() -> None:
    params = identity_geometry((1, 8, 8))
    with pytest.raises(ValueError, match="must agree"):
        apply_geometry(np.zeros((1, 8, 9), np.float32), np.zeros((1, 8, 9), np.float32), params)
