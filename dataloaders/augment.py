"""Episode augmentation of method.md §3 step 6, with random parameters drawn apart from their application.

``sample_*`` functions draw parameters from a local ``np.random.Generator``; ``apply_*`` functions are
deterministic given those parameters. Identity parameters (``identity_gamma()``, ``identity_geometry``)
leave their inputs unchanged, which is what the tests check, and the intensity transform never sees labels.

Shapes: ``N`` slices of ``H x W`` (``N = S`` supports or ``Q`` queries), single channel; the caller repeats
the channel to 3 after augmenting (the 3 channels are equal, so this equals augmenting all three).

Geometry: per slice an affine (rotation ``U(-5, 5)`` deg, translation ``U(-5, 5)`` px per axis, shear
``U(-5, 5)`` deg, isotropic zoom ``U(0.9, 1.2)``, composed rotation -> translation -> shear -> zoom, i.e.
``M = Zoom @ Shear @ Translation @ Rotation``; rotation, shear and zoom act about the slice centre), then an
elastic deformation whose displacement fields are uniform ``U(-1, 1)`` noise smoothed by a Gaussian
(``sigma = 5``, kernel ``int(4 sigma) | 1``) and scaled by ``alpha = 10``. The two warps are composed into
one sampling grid, ``out(p) = in(M^-1 (p + d(p)))``, and applied with one bilinear resampling (the official
code resamples twice); outside the slice reads 0 (the normalised volume's mean). The mask is warped with the
image by the same grid and rounded back to {0, 1}.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .transforms import CV_MAX_CHANNELS

GAMMA_RANGE = (0.5, 1.5)
GAMMA_EPS = 1e-5
ROTATION_DEG = 5.0
TRANSLATION_PX = 5.0
SHEAR_DEG = 5.0
ZOOM_RANGE = (0.9, 1.2)
ELASTIC_ALPHA = 10.0
ELASTIC_SIGMA = 5.0


@dataclass(frozen=True)
class GammaParams:
    """Gamma exponent ``g`` applied to a group of slices."""

    gamma: float


def identity_gamma() -> GammaParams:
    return GammaParams(gamma=1.0)


def sample_gamma(rng: np.random.Generator) -> GammaParams:
    """Draw ``g ~ U(0.5, 1.5)``."""
    return GammaParams(gamma=float(rng.uniform(*GAMMA_RANGE)))


def apply_gamma(image: np.ndarray, params: GammaParams) -> np.ndarray:
    """Gamma transform of a group of slices, ``(N, H, W) -> (N, H, W)`` float32.

    ``v' = range * ((v - min + 1e-5) / range) ** g + min`` with ``range = max - min + 1e-5``, where min and
    max are taken over the whole group (all shots together, as the official code does). ``g = 1`` returns the
    input unchanged (the formula would add its 1e-5 offset).
    """
    if image.size == 0:
        raise ValueError("apply_gamma: empty image")
    if params.gamma == 1.0:
        return image.copy()
    low = float(image.min())
    value_range = float(image.max()) - low + GAMMA_EPS
    out = value_range * np.power((image - low + GAMMA_EPS) / value_range, params.gamma) + low
    return out.astype(np.float32, copy=False)


@dataclass(frozen=True)
class GeometryParams:
    """Per-slice geometric parameters for ``N`` slices of ``H x W``.

    ``rotation_deg (N,)``, ``translation (N, 2)`` in pixels as (x, y), ``shear_deg (N,)``, ``zoom (N,)``,
    ``displacement (N, 2, H, W)`` float32 elastic fields in pixels as (dx, dy).
    """

    rotation_deg: np.ndarray
    translation: np.ndarray
    shear_deg: np.ndarray
    zoom: np.ndarray
    displacement: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        n, _, h, w = self.displacement.shape
        return n, h, w


def identity_geometry(shape: tuple[int, int, int]) -> GeometryParams:
    """Parameters that leave ``(N, H, W)`` slices unchanged."""
    n, h, w = shape
    return GeometryParams(
        rotation_deg=np.zeros(n),
        translation=np.zeros((n, 2)),
        shear_deg=np.zeros(n),
        zoom=np.ones(n),
        displacement=np.zeros((n, 2, h, w), dtype=np.float32),
    )


def _smoothed_noise(rng: np.random.Generator, n_fields: int, h: int, w: int) -> np.ndarray:
    """``n_fields`` Gaussian-smoothed ``U(-1, 1)`` fields, ``(n_fields, H, W)`` float32."""
    noise = rng.uniform(-1.0, 1.0, size=(h, w, n_fields)).astype(np.float32)
    ksize = int(4 * ELASTIC_SIGMA) | 1
    out = np.empty((n_fields, h, w), dtype=np.float32)
    # one cv2 call takes at most CV_MAX_CHANNELS channels: fields go in as channel chunks
    for start in range(0, n_fields, CV_MAX_CHANNELS):
        blurred = cv2.GaussianBlur(
            np.ascontiguousarray(noise[..., start : start + CV_MAX_CHANNELS]), (ksize, ksize), ELASTIC_SIGMA
        )
        out[start : start + CV_MAX_CHANNELS] = blurred.reshape(h, w, -1).transpose(2, 0, 1)
    return out


def sample_geometry(rng: np.random.Generator, shape: tuple[int, int, int]) -> GeometryParams:
    """Draw affine and elastic parameters for ``shape = (N, H, W)`` slices, one draw per slice."""
    n, h, w = (int(v) for v in shape)
    if n < 1 or h < 1 or w < 1:
        raise ValueError(f"sample_geometry: expected a non-empty (N, H, W) shape, got {shape}")
    rotation = rng.uniform(-ROTATION_DEG, ROTATION_DEG, size=n)
    translation = rng.uniform(-TRANSLATION_PX, TRANSLATION_PX, size=(n, 2))
    shear = rng.uniform(-SHEAR_DEG, SHEAR_DEG, size=n)
    zoom = rng.uniform(*ZOOM_RANGE, size=n)
    displacement = _smoothed_noise(rng, 2 * n, h, w).reshape(n, 2, h, w) * np.float32(ELASTIC_ALPHA)
    return GeometryParams(rotation, translation, shear, zoom, displacement)


def affine_matrices(params: GeometryParams) -> np.ndarray:
    """Forward affine matrices ``(N, 3, 3)`` in pixel coordinates (x = column, y = row):
    ``Zoom @ Shear @ Translation @ Rotation``, rotation/shear/zoom about the centre ``((W-1)/2, (H-1)/2)``."""
    n, h, w = params.shape
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    to_centre = np.array([[1.0, 0.0, -cx], [0.0, 1.0, -cy], [0.0, 0.0, 1.0]])
    from_centre = np.array([[1.0, 0.0, cx], [0.0, 1.0, cy], [0.0, 0.0, 1.0]])

    def batch(rows: list[list[np.ndarray | float]]) -> np.ndarray:
        return np.stack([np.stack(np.broadcast_arrays(*row), axis=-1) for row in rows], axis=-2)

    zeros, ones = np.zeros(n), np.ones(n)
    theta = np.deg2rad(params.rotation_deg)
    # cv2.getRotationMatrix2D convention: positive angle turns the content counter-clockwise on screen
    rotation = batch(
        [[np.cos(theta), np.sin(theta), zeros], [-np.sin(theta), np.cos(theta), zeros], [zeros, zeros, ones]]
    )
    translation = batch(
        [
            [ones, zeros, params.translation[:, 0]],
            [zeros, ones, params.translation[:, 1]],
            [zeros, zeros, ones],
        ]
    )
    phi = np.deg2rad(params.shear_deg)
    shear = batch([[ones, -np.sin(phi), zeros], [zeros, np.cos(phi), zeros], [zeros, zeros, ones]])
    zoom = batch([[params.zoom, zeros, zeros], [zeros, params.zoom, zeros], [zeros, zeros, ones]])

    def centred(matrix: np.ndarray) -> np.ndarray:
        return from_centre @ matrix @ to_centre

    return centred(zoom) @ centred(shear) @ translation @ centred(rotation)


def sampling_grid(params: GeometryParams) -> tuple[np.ndarray, np.ndarray]:
    """Source coordinates ``(map_x, map_y)``, each ``(N, H, W)`` float32: ``M^-1 (p + d(p))``."""
    n, h, w = params.shape
    inverse = np.linalg.inv(affine_matrices(params))  # (N, 3, 3)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    qx = xs[None] + params.displacement[:, 0]
    qy = ys[None] + params.displacement[:, 1]
    a = inverse[:, :2, :, None, None]  # (N, 2, 3, 1, 1)
    map_x = a[:, 0, 0] * qx + a[:, 0, 1] * qy + a[:, 0, 2]
    map_y = a[:, 1, 0] * qx + a[:, 1, 1] * qy + a[:, 1, 2]
    return map_x.astype(np.float32), map_y.astype(np.float32)


def apply_geometry(
    image: np.ndarray, mask: np.ndarray, params: GeometryParams
) -> tuple[np.ndarray, np.ndarray]:
    """Warp image and mask together: ``(N, H, W), (N, H, W) -> (N, H, W), (N, H, W)`` float32, mask {0,1}."""
    if image.shape != mask.shape or image.shape != params.shape:
        raise ValueError(
            f"apply_geometry: image {image.shape}, mask {mask.shape} and parameters {params.shape} must agree"
        )
    map_x, map_y = sampling_grid(params)
    stacked = np.stack([image, mask], axis=-1).astype(np.float32)  # (N, H, W, 2)
    warped = np.empty_like(stacked)
    for i in range(stacked.shape[0]):
        warped[i] = cv2.remap(
            stacked[i],
            map_x[i],
            map_y[i],
            interpolation=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=0,
        )
    return warped[..., 0], np.clip(np.rint(warped[..., 1]), 0, 1)
