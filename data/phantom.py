"""MR-like abdominal phantom in the CHAOST2 layout: the embedded default dataset of the quick start.

Writes ``<out>/CHAOST2/chaos_MR_T2_normalized/image_<id>.nii.gz`` and ``label_<id>.nii.gz`` (ids 1..N)
like the preprocessed CHAOS T2-SPIR volumes (method.md §1): float64 arrays ``(Z, H, W)`` in raw MR units
clipped at the 99.5th percentile (about 0..1100), spacing 1.25 x 1.25 x 7.7 mm at 256 x 256, labels
0 background, 1 liver, 2 right kidney, 3 left kidney, 4 spleen.

Array layout follows the real volumes: row 0 is posterior (spine at the top of the array), the patient's
right is the image's left (liver at small column indices), slice index grows towards the head.

Each case draws its own body size and contour, organ positions, sizes, orientations, outline harmonics and
slice ranges, and its own tissue intensities; cross-sections change smoothly along z. Non-target
structures (spine and spinal canal, paraspinal muscles, aorta, inferior vena cava, stomach, gallbladder,
bowel loops, intrahepatic vessels, subcutaneous layer) keep the task from being trivial. Image formation:
piecewise-constant tissue map, smooth multiplicative texture, slight blur (partial volume), smooth
multiplicative bias field, Rician noise, clipping.

Deterministic: case ``i`` of seed ``s`` uses ``np.random.default_rng([s, i])``, so a case does not depend on
how many cases are written. ``--size`` keeps the 320 mm field of view (in-plane spacing ``320 / size`` mm).

Command line: ``python -m data.phantom --out DIR [--n-cases 10] [--n-slices 30] [--size 256] [--seed 0]``.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from dataloaders.datasets import get_dataset_info
from dataloaders.volume import require_simpleitk
from utils import run_cli

sitk = require_simpleitk("the phantom generator (data/phantom.py)")

#: CHAOST2 label values (method.md §1).
LABELS = {"LIVER": 1, "RK": 2, "LK": 3, "SPLEEN": 4}
#: Reference matrix size and spacing (x, y, z) in mm of the preprocessed CHAOST2 volumes.
REFERENCE_SIZE = 256
REFERENCE_SPACING = (1.25, 1.25, 7.7)
#: Folder of the CHAOST2 images and labels below the data root.
IMAGE_FOLDER = Path("CHAOST2") / get_dataset_info("CHAOST2").image_folder
#: Direction cosines of the real volumes (the y axis runs posterior at row 0, as in the preprocessed data).
DIRECTION = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)

# Tissue codes of the piecewise-constant tissue map; the label map is derived from them.
AIR, BODY, SUBCUT, SKIN, MUSCLE, VERTEBRA, CANAL, AORTA, IVC = range(9)
STOMACH, STOMACH_WALL, GALLBLADDER, BOWEL0, BOWEL1, BOWEL2, BOWEL3 = range(9, 16)
LIVER, LIVER_VESSEL, RK, LK, SPLEEN, RENAL_SINUS, RK_MEDULLA, LK_MEDULLA = range(16, 24)
N_TISSUES = 24
_TISSUE_LABEL = np.zeros(N_TISSUES, dtype=np.float64)
_TISSUE_LABEL[[LIVER, LIVER_VESSEL]] = LABELS["LIVER"]
_TISSUE_LABEL[[RK, RK_MEDULLA]] = LABELS["RK"]
_TISSUE_LABEL[[LK, LK_MEDULLA]] = LABELS["LK"]
_TISSUE_LABEL[SPLEEN] = LABELS["SPLEEN"]


@dataclass(frozen=True)
class _Grid:
    """Voxel coordinates broadcastable to ``(Z, H, W)``: ``z (Z,1,1)``, ``y (1,H,1)``, ``x (1,1,W)``, in
    reference (256-grid) pixels for ``y``/``x``; ``t`` is the slice position in ``[0, 1]`` (inferior to
    superior), shape ``(Z,1,1)``."""

    z: np.ndarray
    y: np.ndarray
    x: np.ndarray
    t: np.ndarray


def _make_grid(n_slices: int, size: int) -> _Grid:
    z = np.arange(n_slices, dtype=np.float64)[:, None, None]
    # Pixel centres in reference units, so anatomy is drawn in millimetre-true proportions at any size.
    coords = (np.arange(size, dtype=np.float64) + 0.5) * (REFERENCE_SIZE / size) - 0.5
    t = z / max(n_slices - 1, 1)
    return _Grid(z=z, y=coords[None, :, None], x=coords[None, None, :], t=t)


def _z_profile(t: np.ndarray, centre: float, half_below: float, half_above: float) -> np.ndarray:
    """Cross-section scale in ``[0, 1]`` along z: an ellipsoid cap, allowed to be asymmetric. ``(Z,1,1)``."""
    half = np.where(t < centre, half_below, half_above)
    return np.sqrt(np.clip(1.0 - ((t - centre) / half) ** 2, 0.0, 1.0))


def _blob(
    grid: _Grid,
    cx: np.ndarray,
    cy: np.ndarray,
    rx: np.ndarray,
    ry: np.ndarray,
    angle: float,
    harmonics: np.ndarray,
) -> np.ndarray:
    """Mask of a rotated ellipse with a Fourier-perturbed outline, per slice.

    ``cx, cy, rx, ry``: centre and semi-axes in reference pixels, each ``(Z,1,1)`` (a radius of 0 means the
    structure is absent from that slice). ``harmonics``: ``(K, 2)`` amplitude and phase of outline harmonics
    ``k = 2..K+1``. Returns a bool mask ``(Z, H, W)``.
    """
    cx, cy, rx, ry = (np.broadcast_to(a, grid.t.shape) for a in (cx, cy, rx, ry))
    mask = np.zeros((grid.z.shape[0], grid.y.shape[1], grid.x.shape[2]), dtype=bool)
    present = np.flatnonzero(rx[:, 0, 0] > 0.5)
    if present.size == 0:
        return mask
    # Work inside the bounding box of the structure over its slices only (most structures are small).
    zs = slice(present[0], present[-1] + 1)
    outline_max = 1.0 + float(np.abs(harmonics[:, 0]).sum()) if len(harmonics) else 1.0
    reach = np.maximum(rx[zs], ry[zs]) * outline_max + 1.0
    ys = _box(grid.y[0, :, 0], (cy[zs] - reach).min(), (cy[zs] + reach).max())
    xs = _box(grid.x[0, 0, :], (cx[zs] - reach).min(), (cx[zs] + reach).max())
    dx = grid.x[:, :, xs] - cx[zs]
    dy = grid.y[:, ys, :] - cy[zs]
    cos_a, sin_a = np.cos(angle), np.sin(angle)
    on = rx[zs] > 0.5
    a = (dx * cos_a + dy * sin_a) / np.where(on, rx[zs], 1.0)
    b = (-dx * sin_a + dy * cos_a) / np.where(on, np.maximum(ry[zs], 0.5), 1.0)
    rho2 = a * a + b * b
    if len(harmonics):
        theta = np.arctan2(b, a)
        outline = np.ones_like(theta)
        for k, (amp, phase) in enumerate(harmonics, start=2):
            outline += amp * np.cos(k * theta + phase)
        inside = rho2 < outline * outline
    else:
        inside = rho2 < 1.0
    mask[zs, ys, xs] = inside & on
    return mask


def _box(coords: np.ndarray, low: float, high: float) -> slice:
    """Index range of the sorted ``coords`` that lie in ``[low, high]`` (possibly empty)."""
    start = int(np.searchsorted(coords, low, side="left"))
    return slice(start, int(np.searchsorted(coords, high, side="right")))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: tuple[float, ...]) -> np.ndarray:
    """Gaussian-smoothed white noise rescaled to unit standard deviation, ``shape``."""
    field = gaussian_filter(rng.standard_normal(shape), sigma=sigma, mode="reflect")
    return field / max(float(field.std()), 1e-12)


def _tissue_means(rng: np.random.Generator) -> np.ndarray:
    """Per-case mean intensity of every tissue in raw T2-SPIR-like units, ``(N_TISSUES,)``.

    Orders of magnitude follow the CHAOST2 volumes: background ~0, fat-suppressed soft tissue ~200,
    liver ~300-400, kidneys and spleen ~550-800 (so spleen and kidneys overlap in intensity, as in the real
    data), fluid (CSF, gallbladder, stomach content) brightest, vessels dark flow voids.
    """
    means = np.empty(N_TISSUES)
    means[AIR] = 0.0
    means[BODY] = rng.uniform(170, 250)
    means[SUBCUT] = rng.uniform(90, 160)
    means[SKIN] = rng.uniform(280, 380)
    means[MUSCLE] = rng.uniform(100, 160)
    means[VERTEBRA] = rng.uniform(230, 330)
    means[CANAL] = rng.uniform(800, 1000)
    means[AORTA] = rng.uniform(40, 90)
    means[IVC] = rng.uniform(60, 400)
    # Stomach holds fluid (bright) or air (dark) depending on the case.
    means[STOMACH] = rng.uniform(700, 950) if rng.random() < 0.6 else rng.uniform(20, 60)
    means[STOMACH_WALL] = rng.uniform(250, 350)
    means[GALLBLADDER] = rng.uniform(850, 1050)
    means[[BOWEL0, BOWEL1, BOWEL2, BOWEL3]] = rng.uniform(150, 750, size=4)
    means[LIVER] = rng.uniform(260, 380)
    means[LIVER_VESSEL] = means[LIVER] * rng.uniform(0.2, 0.45)
    kidney = rng.uniform(600, 820)
    means[RK] = kidney * rng.uniform(0.95, 1.05)
    means[LK] = kidney * rng.uniform(0.95, 1.05)
    means[SPLEEN] = rng.uniform(580, 780)
    means[RENAL_SINUS] = rng.uniform(150, 260)
    # Renal medulla is brighter than the cortex on T2 (corticomedullary differentiation).
    means[[RK_MEDULLA, LK_MEDULLA]] = means[[RK, LK]] * rng.uniform(1.1, 1.3)
    return means


def _harmonics(rng: np.random.Generator, n: int, amplitude: float) -> np.ndarray:
    """``(n, 2)`` outline harmonics: amplitudes ``U(0, amplitude)`` decaying with order, random phases."""
    amps = rng.uniform(0.0, amplitude, size=n) / np.arange(1, n + 1)
    return np.stack([amps, rng.uniform(0, 2 * np.pi, size=n)], axis=1)


def make_phantom_case(
    seed: int, case_id: int, n_slices: int = 30, size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one phantom volume.

    Args:
        seed: dataset seed; the case's generator is ``np.random.default_rng([seed, case_id])``.
        case_id: case number (>= 0).
        n_slices: number of slices ``Z`` (>= 8, so that every organ spans several slices).
        size: in-plane matrix size ``H = W`` (>= 32); the field of view stays 320 mm.

    Returns:
        ``image (Z, H, W)`` float64 in raw MR-like units (>= 0), ``label (Z, H, W)`` float64 in {0..4}.
    """
    if n_slices < 8:
        raise ValueError(f"n_slices: expected at least 8 slices, got {n_slices}")
    if size < 32:
        raise ValueError(f"size: expected an in-plane size of at least 32 pixels, got {size}")
    if case_id < 0 or seed < 0:
        raise ValueError(f"seed and case_id must be >= 0, got seed={seed}, case_id={case_id}")
    rng = np.random.default_rng([seed, case_id])
    grid = _make_grid(n_slices, size)
    t = grid.t
    shape = (n_slices, size, size)

    # Body: an ellipse whose semi-axes and centre drift smoothly with z, outline perturbed by harmonics.
    body_cx = 128 + rng.uniform(-4, 4) + rng.uniform(-3, 3) * (t - 0.5)
    body_cy = 128 + rng.uniform(-5, 5) + rng.uniform(-4, 4) * (t - 0.5)
    def z_trend() -> np.ndarray:
        # Smooth size change along z: linear trend plus a bulge, a few percent.
        return 1 + rng.uniform(-0.08, 0.08) * (t - 0.5) - rng.uniform(0, 0.1) * (t - 0.5) ** 2

    body_ax = rng.uniform(104, 124) * z_trend()
    body_ay = rng.uniform(76, 92) * z_trend()
    body_harm = _harmonics(rng, 3, 0.06)

    def at(u: float, v: float) -> tuple[np.ndarray, np.ndarray]:
        """Body-relative position (u: -1 image left .. 1 image right; v: -1 posterior .. 1 anterior)."""
        return body_cx + u * body_ax, body_cy + v * body_ay

    tissue = np.full(shape, AIR, dtype=np.int64)

    def paint(mask: np.ndarray, code: int) -> None:
        tissue[mask] = code

    paint(_blob(grid, body_cx, body_cy, body_ax, body_ay, 0.0, body_harm), SKIN)
    paint(_blob(grid, body_cx, body_cy, body_ax - 2.5, body_ay - 2.5, 0.0, body_harm), SUBCUT)
    fat = rng.uniform(6, 12)
    inner = _blob(grid, body_cx, body_cy, body_ax - fat, body_ay - fat, 0.0, body_harm)
    paint(inner, BODY)

    # Organ parameters: (u, v) position, semi-axes (reference px), slice-range centre and half-extents.
    def organ(u, v, du, dv, rx, ry, zc, h_lo, h_hi, angle, harm_amp, n_harm=3):
        t_c = zc + rng.uniform(-0.05, 0.05)
        prof = _z_profile(t, t_c, h_lo * rng.uniform(0.85, 1.15), h_hi * rng.uniform(0.85, 1.15))
        # Centres drift linearly along z (organs are oblique), sizes are per-case.
        cx, cy = at(u + rng.uniform(-du, du) + rng.uniform(-0.06, 0.06) * (t - t_c),
                    v + rng.uniform(-dv, dv) + rng.uniform(-0.06, 0.06) * (t - t_c))
        scale = rng.uniform(0.85, 1.15)
        return dict(
            cx=cx, cy=cy, rx=rx * scale * prof, ry=ry * scale * rng.uniform(0.9, 1.1) * prof,
            angle=angle + rng.uniform(-0.3, 0.3), harmonics=_harmonics(rng, n_harm, harm_amp),
        )

    def draw(p: dict) -> np.ndarray:
        return _blob(grid, p["cx"], p["cy"], p["rx"], p["ry"], p["angle"], p["harmonics"])

    # Liver: a large right lobe plus a left lobe reaching across the midline anteriorly in upper slices.
    right_lobe = organ(-0.45, 0.05, 0.05, 0.08, 62, 70, 0.66, 0.40, 0.42, 0.3, 0.18)
    left_lobe = organ(0.0, 0.42, 0.06, 0.05, 45, 26, 0.72, 0.22, 0.30, -0.2, 0.15)
    liver = (draw(right_lobe) | draw(left_lobe)) & inner
    paint(liver, LIVER)
    # Intrahepatic vessels: thin tubes running obliquely through the liver, labelled liver (as in CHAOS).
    for _ in range(int(rng.integers(3, 7))):
        vx, vy = at(rng.uniform(-0.7, -0.15) + rng.uniform(-0.3, 0.3) * t,
                    rng.uniform(-0.3, 0.4) + rng.uniform(-0.3, 0.3) * t)
        r = rng.uniform(2.0, 4.0) * np.ones_like(t)
        paint(_blob(grid, vx, vy, r, r, 0.0, np.empty((0, 2))) & liver, LIVER_VESSEL)

    # Gallbladder below the liver's right lobe, anterior-medial, lower slices.
    gb = organ(-0.3, 0.45, 0.06, 0.06, 12, 18, 0.38, 0.12, 0.12, 0.4, 0.1)
    paint(draw(gb) & inner, GALLBLADDER)

    # Stomach: left anterior upper abdomen, fluid- or air-filled, with a wall.
    st = organ(0.38, 0.25, 0.06, 0.08, 34, 26, 0.68, 0.25, 0.2, 0.5, 0.2)
    st_mask = draw(st) & inner
    paint(st_mask, STOMACH_WALL)
    st_inner = dict(st, rx=np.maximum(st["rx"] - 4, 0), ry=np.maximum(st["ry"] - 4, 0))
    paint(draw(st_inner) & st_mask, STOMACH)

    # Bowel loops: small blobs in the lower anterior abdomen.
    for code in (BOWEL0, BOWEL1, BOWEL2, BOWEL3):
        bw = organ(rng.uniform(-0.5, 0.5), rng.uniform(0.2, 0.6), 0.0, 0.0, 16, 12,
                   rng.uniform(0.1, 0.4), 0.2, 0.2, rng.uniform(0, np.pi), 0.2)
        paint(draw(bw) & inner, code)

    # Spleen: left posterior-lateral, crescent-shaped (medial concavity), upper-middle slices.
    spleen = organ(0.72, -0.3, 0.05, 0.06, 16, 32, 0.66, 0.18, 0.16, -0.5, 0.12)
    notch = dict(spleen, cx=spleen["cx"] - 14, cy=spleen["cy"] + 6, rx=spleen["rx"] * 0.7,
                 ry=spleen["ry"] * 0.6, harmonics=np.empty((0, 2)))
    paint(draw(spleen) & ~draw(notch) & inner, SPLEEN)

    # Kidneys: posterior, either side of the spine, with a medial hilum (renal sinus, not labelled kidney).
    for code, medulla, side, zc in ((RK, RK_MEDULLA, -1.0, 0.42), (LK, LK_MEDULLA, 1.0, 0.47)):
        kid = organ(side * 0.36, -0.40, 0.04, 0.05, 18, 24, zc, 0.2, 0.2, side * 0.5, 0.08)
        sinus = dict(kid, cx=kid["cx"] - side * kid["rx"] * 0.8, rx=kid["rx"] * 0.35, ry=kid["ry"] * 0.3,
                     harmonics=np.empty((0, 2)))
        paint(draw(kid) & inner, code)
        medulla_shape = dict(kid, cx=kid["cx"] - side * kid["rx"] * 0.2, rx=kid["rx"] * 0.55,
                             ry=kid["ry"] * 0.6, harmonics=_harmonics(rng, 4, 0.3))
        paint(draw(medulla_shape) & (tissue == code), medulla)
        paint(draw(sinus) & ((tissue == code) | (tissue == medulla)), RENAL_SINUS)

    # Spine (present on every slice): paraspinal muscles, vertebral body, spinal canal; great vessels.
    ones = np.ones_like(t)
    for side in (-1.0, 1.0):
        mx, my = at(side * 0.17, -0.78)
        paint(_blob(grid, mx, my, 20 * ones, 13 * ones, side * 0.3, _harmonics(rng, 2, 0.1)) & inner, MUSCLE)
    vx, vy = at(rng.uniform(-0.02, 0.02), -0.46)
    vr = rng.uniform(13, 17)
    paint(_blob(grid, vx, vy, vr * ones, 0.9 * vr * ones, 0.0, _harmonics(rng, 2, 0.08)), VERTEBRA)
    paint(_blob(grid, vx, vy - vr - 4, 5 * ones, 5 * ones, 0.0, np.empty((0, 2))), CANAL)
    ax_, ay_ = at(0.09, -0.3)
    aorta_r = rng.uniform(6, 9) * ones
    paint(_blob(grid, ax_, ay_, aorta_r, aorta_r, 0.0, np.empty((0, 2))), AORTA)
    ix, iy = at(-0.14, -0.26)
    ivc_rx, ivc_ry = rng.uniform(7, 10) * ones, rng.uniform(5, 7) * ones
    paint(_blob(grid, ix, iy, ivc_rx, ivc_ry, 0.3, np.empty((0, 2))), IVC)

    label = _TISSUE_LABEL[tissue]

    # Image formation: tissue means, smooth texture, partial volume, bias field, Rician noise, clipping.
    means = _tissue_means(rng)
    texture_amp = np.full(N_TISSUES, rng.uniform(0.08, 0.15))
    texture_amp[AIR] = 0.0
    px = size / REFERENCE_SIZE  # reference pixels -> voxels
    coarse = _smooth_noise(rng, shape, (0.8, 6 * px, 6 * px))
    fine = _smooth_noise(rng, shape, (0.4, 1.5 * px, 1.5 * px))
    image = means[tissue] * (1.0 + texture_amp[tissue] * (0.7 * coarse + 0.5 * fine))
    image = gaussian_filter(image, sigma=(0.3, 1.0 * px, 1.0 * px), mode="nearest")
    # Smooth multiplicative bias field: exp of a random low-order polynomial (about +-25 %).
    u = (grid.x - 128) / 128
    v = (grid.y - 128) / 128
    w = grid.t - 0.5
    c = rng.uniform(-1, 1, size=7) * np.array([0.15, 0.15, 0.1, 0.08, 0.08, 0.06, 0.1])
    bias = np.exp(c[0] * u + c[1] * v + c[2] * w + c[3] * u * v + c[4] * u * u + c[5] * v * v + c[6] * u * w)
    image = image * bias
    sigma_noise = rng.uniform(10, 20)
    image = np.sqrt((image + sigma_noise * rng.standard_normal(shape)) ** 2
                    + (sigma_noise * rng.standard_normal(shape)) ** 2)
    # Preprocessing of CHAOST2 clips the top 0.5 % of the histogram.
    image = np.minimum(image, np.percentile(image, 99.5))
    return image, label


def write_phantom_dataset(out: str | Path, n_cases: int = 10, n_slices: int = 30, size: int = 256,
                          seed: int = 0) -> list[Path]:
    """Write ``n_cases`` phantom cases (ids 1..n_cases) in the CHAOST2 layout below ``out``.

    Returns the list of written image paths. Geometry: spacing ``(320/size, 320/size, 7.7)`` mm (x, y, z),
    the real volumes' direction cosines, origin centring the field of view.
    """
    if n_cases < 1:
        raise ValueError(f"n_cases: expected at least 1 case, got {n_cases}")
    folder = Path(out) / IMAGE_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    in_plane = REFERENCE_SPACING[0] * REFERENCE_SIZE / size
    spacing = (in_plane, in_plane, REFERENCE_SPACING[2])
    origin = (-in_plane * size / 2, in_plane * size / 2, 0.0)
    written = []
    for case_id in range(1, n_cases + 1):
        image, label = make_phantom_case(seed, case_id, n_slices=n_slices, size=size)
        for name, array in (("image", image), ("label", label)):
            itk = sitk.GetImageFromArray(array)
            itk.SetSpacing(spacing)
            itk.SetOrigin(origin)
            itk.SetDirection(DIRECTION)
            sitk.WriteImage(itk, str(folder / f"{name}_{case_id}.nii.gz"), useCompression=True)
        written.append(folder / f"image_{case_id}.nii.gz")
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", required=True, help="data root to write CHAOST2/chaos_MR_T2_normalized into")
    parser.add_argument("--n-cases", type=int, default=10, help="number of volumes (ids 1..N)")
    parser.add_argument("--n-slices", type=int, default=30, help="slices per volume")
    parser.add_argument("--size", type=int, default=256, help="in-plane matrix size (field of view 320 mm)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    paths = write_phantom_dataset(args.out, args.n_cases, args.n_slices, args.size, args.seed)
    print(f"[phantom] wrote {len(paths)} cases ({args.n_slices} x {args.size} x {args.size}) to "
          f"{paths[0].parent} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    run_cli(main, "phantom.py")
